"""The `loss` pruning rule: keep the experts whose loss hurts translation least, measured.

Routing shares say how often an expert is chosen, not how much translation suffers when it is
gone: a dropped expert's tokens go to their best kept expert, and whether that expert computes
something close enough depends on the experts, not on the traffic. (On the main job's model the
decoder set that left every target language the most routing share lost the most BLEU of all 2-of-4
sets, and the set that left French only 0.27 of its share lost the least.) So this rule measures:
for each MoE layer and each candidate set of experts, the teacher-forced NLL per direction on the
calibration set with only that layer pruned to the set, and keeps the set with the smallest
mean + worst increase over the directions (the average direction and the one that suffers most
count alike, so no direction is sacrificed for the mean).

Layers are chosen one at a time with the others whole (their interactions are ignored: each
candidate costs one pass over the calibration set). Every set is tried when a layer has at most
EXHAUSTIVE_SETS of them; beyond, experts are dropped one by one, each time the one whose removal
costs least.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtmoe.data.batching import collate
from mtmoe.data.sampling import Direction
from mtmoe.data.vocab import PAD_ID, Vocab
from mtmoe.model.moe import MoEFFN, Router
from mtmoe.model.seq2seq import Seq2Seq

EXHAUSTIVE_SETS = 20


@contextmanager
def restricted(layer: MoEFFN, kept: Sequence[int]):
    """Within the block, `layer` (unpruned) computes as if pruned to `kept`: a router that picks only
    among them (sharing the gate's weights) and the kept expert modules (not copied)."""
    gate, experts = layer.gate, layer.experts
    router = Router(gate.wg.in_features, gate.wg.out_features, gate.top_k, gate.capacity_factor,
                    gate.eval_capacity_factor, gate.min_capacity, gate.use_rts, kept).to(gate.wg.weight.device)
    router.wg = gate.wg
    layer.gate, layer.experts = router, nn.ModuleList(experts[i] for i in kept)
    try:
        yield
    finally:
        layer.gate, layer.experts = gate, experts


@torch.no_grad()
def direction_nll(model: Seq2Seq, vocab: Vocab, texts: dict[str, Sequence[str]], pairs: Sequence[Direction],
                  batch_sentences: int = 64) -> dict[str, float]:
    """Teacher-forced NLL per target token of each direction (nats), the model in eval mode."""
    model.eval()
    device = model.embed.weight.device
    ids = {lang: [np.asarray(x, dtype=np.int64) for x in vocab.encode(lines)] for lang, lines in texts.items()}
    out = {}
    for src, tgt in pairs:
        total, tokens = 0.0, 0
        for start in range(0, len(ids[src]), batch_sentences):
            stop = min(len(ids[src]), start + batch_sentences)
            batch = collate(ids[src][start:stop], ids[tgt][start:stop], [vocab.tag_id(tgt)] * (stop - start),
                            model.model_cfg.max_positions)
            logits, _, _ = model(batch.src.to(device), batch.tgt_in.to(device))
            target = batch.tgt_out.to(device)
            real = target != PAD_ID
            total += float(F.cross_entropy(logits[real].float(), target[real], reduction="sum"))
            tokens += int(real.sum())
        out[f"{src}-{tgt}"] = total / max(tokens, 1)
    return out


def score(increase: dict[str, float]) -> float:
    """mean + worst NLL increase over the directions (smaller is better)."""
    values = list(increase.values())
    return float(np.mean(values) + np.max(values))


def loss_keep(model: Seq2Seq, vocab: Vocab, texts: dict[str, Sequence[str]], pairs: Sequence[Direction],
              counts: dict[str, int], progress: Callable[[str], None] = print) -> tuple[dict[str, list[int]], dict]:
    """({layer: kept experts}, report) with `counts[layer]` experts kept per MoE layer. The report
    holds the full model's NLL per direction and, per layer, the NLL increase of the chosen set."""
    base = direction_nll(model, vocab, texts, pairs)
    kept, report = {}, {"base_nll": {d: round(v, 4) for d, v in base.items()}, "increase": {}}
    for name in model.moe_layer_names():
        layer = model.get_submodule(model.moe_layer_prefix(name)[:-1])
        num, count = len(layer.experts), counts[name]
        cache: dict[tuple[int, ...], dict[str, float]] = {}

        def increase(ids: tuple[int, ...]) -> dict[str, float]:
            if ids not in cache:
                with restricted(layer, ids):
                    nll = direction_nll(model, vocab, texts, pairs)
                cache[ids] = {d: nll[d] - base[d] for d in base}
                progress(f"prune.rule=loss: {name} {list(ids)}: mean + worst NLL increase {score(cache[ids]):.4f}")
            return cache[ids]

        if count >= num:
            best = tuple(range(num))
        elif math.comb(num, count) <= EXHAUSTIVE_SETS:
            best = min(itertools.combinations(range(num), count), key=lambda ids: score(increase(ids)))
        else:
            best = tuple(range(num))
            while len(best) > count:
                best = min((tuple(e for e in best if e != drop) for drop in best), key=lambda ids: score(increase(ids)))
        kept[name] = list(best)
        report["increase"][name] = {d: round(v, 4) for d, v in (increase(best) if count < num else
                                                                 {d: 0.0 for d in base}).items()}
    return kept, report
