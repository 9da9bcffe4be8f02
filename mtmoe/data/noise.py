"""mBART-style noise for denoising (DAE) examples: text infilling and sentence permutation.

Works on token ids of one sentence. Text infilling masks about `mask_ratio` of the tokens in spans
whose lengths are drawn from Poisson(`poisson_lambda`); each span becomes a single `<mask>` (a span
of length 0 inserts one), so the model must also predict how many tokens are missing. Sentence
permutation shuffles the sentences of a line (split after sentence-final pieces).
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def permute_sentences(ids: np.ndarray, is_sentence_end: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`ids` [L] with its sentences (ending where `is_sentence_end[id]`) in random order."""
    ends = np.flatnonzero(is_sentence_end[ids]) + 1
    bounds = [0, *[int(e) for e in ends if e < len(ids)], len(ids)]
    pieces = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(pieces) < 2:
        return ids
    return np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])


MAX_PLACEMENT_TRIES = 8
"""Draws of a span's start before a span that overlaps the masked ones gives up a token of budget
(the loop always ends; a nearly full line masks a little under the ratio)."""


def infill_spans(ids: np.ndarray, mask_id: int, rng: np.random.Generator, mask_ratio: float = 0.35,
                 poisson_lambda: float = 3.5, max_out: Optional[int] = None) -> np.ndarray:
    """`ids` [L] -> noised [L'] (L' <= L + 1, and L' <= `max_out` when L <= max_out): spans replaced by
    one `mask_id` each.

    About `mask_ratio` x L tokens are masked (rounded stochastically, so short lines are masked
    as often as the ratio says, not never). A span of length 0 inserts a `mask_id` (anywhere,
    the end included), at most once per line: each further zero draw masks one token instead,
    which keeps L' <= L + 1, the length the batches are packed by. A line already `max_out` long gets
    no inserted mask at all (its zero draws mask a token): the batch keeps at most `max_out` source
    tokens, and an insertion there would push the line's last token out of it."""
    n = len(ids)
    may_insert = max_out is None or n < max_out
    budget = int(np.floor(n * mask_ratio + rng.random())) if n else 0
    if budget == 0:
        return ids.copy()
    masked = np.zeros(n, dtype=bool)
    span_starts: set[int] = set()
    inserted = -1  # where the one zero-length span inserts its mask (n: at the end); -1: none
    tries = 0
    while budget > 0:
        length = min(int(rng.poisson(poisson_lambda)), budget)
        if length == 0 and (inserted >= 0 or not may_insert):
            length = 1
        start = int(rng.integers(0, n - length + 1))
        if length == 0:
            inserted = start
            budget -= 1  # an inserted mask counts against the budget
            continue
        if masked[start:start + length].any():
            tries += 1
            if tries >= MAX_PLACEMENT_TRIES:
                budget, tries = budget - 1, 0
            continue
        masked[start:start + length] = True
        span_starts.add(start)
        budget -= length
        tries = 0
    out: list[int] = []
    for i in range(n + 1):
        if i == inserted:
            out.append(mask_id)
        if i == n:
            break
        if masked[i]:
            if i in span_starts:
                out.append(mask_id)
            continue
        out.append(int(ids[i]))
    return np.asarray(out, dtype=ids.dtype)
