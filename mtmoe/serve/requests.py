"""Requests in any mix of directions, decoded one direction at a time.

A decoding batch shares one target-language tag, and a language-aware runtime
(`serve.prefetch=language`) seeds and holds each layer's cache for one direction: switching
direction sentence by sentence would reload the held experts every time. So a mixed batch is
grouped by direction (in order of first appearance), each group is decoded with the runtime set to
its direction, and the translations come back in request order.
"""

from __future__ import annotations

from typing import Sequence

from mtmoe.data.vocab import Vocab
from mtmoe.model.generation import translate


def group_by_direction(requests: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str], list[int]]:
    """{(src, tgt): indices of its requests} in order of first appearance."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (src, tgt, _) in enumerate(requests):
        groups.setdefault((src, tgt), []).append(i)
    return groups


def translate_requests(model, vocab: Vocab, requests: Sequence[tuple[str, str, str]], runtime=None,
                       beam: int = 4, length_penalty: float = 1.0, max_tokens: int = 4096) -> list[str]:
    """(src, tgt, line) requests -> translations in request order. `runtime`: the model's
    OffloadRuntime, if served with offloaded experts (set to each group's direction first)."""
    groups = group_by_direction(requests)
    for src, tgt in groups:  # an unknown language fails before anything is decoded
        vocab.tag_id(tgt)
        vocab.tag_id(src)
    out = [""] * len(requests)
    for (src, tgt), indices in groups.items():
        if runtime is not None:
            runtime.set_direction(src, tgt)
        lines = translate(model, vocab, [requests[i][2] for i in indices], tgt, beam, length_penalty, max_tokens)
        for i, line in zip(indices, lines):
            out[i] = line
    return out

