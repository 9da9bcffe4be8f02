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

Two ways to spend the budget (`prune.keep`):
- over the model (`budget_keep`, the default): the kept count is the model's, and experts are
  dropped one at a time, from any layer, each time the one whose removal (with every earlier removal
  in place) costs least. A layer whose experts stand in for each other gives up more of them than
  one whose experts each carry a language: on the main job's model the encoder's MoE layer can lose
  three of four experts nearly for free, the decoder's not one. Costs sum over the steps of the
  experts left (26 passes for 4 of 8).
- per layer (`prune.per_layer=true`, `loss_keep`): the same count in every layer (uniform memory per
  layer). Layers are chosen one at a time with the others whole (interactions ignored). Every set is
  tried when a layer has at most EXHAUSTIVE_SETS of them; beyond, experts are dropped one by one.
"""

from __future__ import annotations

import itertools
import math
from contextlib import ExitStack, contextmanager
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mtmoe.data.batching import collate
from mtmoe.data.sampling import Direction
from mtmoe.data.vocab import PAD_ID, Vocab
from mtmoe.model.experts import SelectedExperts
from mtmoe.model.moe import MoEFFN, Router
from mtmoe.model.seq2seq import Seq2Seq

EXHAUSTIVE_SETS = 20


@contextmanager
def restricted(layer: MoEFFN, kept: Sequence[int]):
    """Within the block, `layer` (unpruned) computes as if pruned to `kept`: a router that picks only
    among them (sharing the gate's weights; pre-gated models route with it too, one layer early) and
    a view of the kept experts (not copied)."""
    gate, experts = layer.gate, layer.experts
    router = Router(gate.wg.in_features, gate.wg.out_features, gate.top_k, gate.capacity_factor,
                    gate.eval_capacity_factor, gate.min_capacity, gate.use_rts, kept).to(gate.wg.weight.device)
    router.wg = gate.wg
    router.train(gate.training)  # a new module trains: its capacity and random token priority would apply
    layer.replace_router(router)
    layer.experts = SelectedExperts(experts, kept)
    try:
        yield
    finally:
        layer.replace_router(gate)
        layer.experts = experts


@torch.no_grad()
def direction_nll(model: Seq2Seq, vocab: Vocab, texts: dict[str, Sequence[str]], pairs: Sequence[Direction],
                  batch_sentences: int = 64) -> dict[str, float]:
    """Teacher-forced NLL per target token of each direction (nats), the model in eval mode.

    The rules call this once per candidate set (26 passes for 4 of 8 experts), so it wastes nothing:
    sentences are batched in order of length (little padding; the NLL is a sum over tokens, so the
    order does not change it beyond float rounding, and eval routing has no capacity limit that
    batch company could change), and the vocabulary projection, the largest matmul, is applied to
    the real target positions only: on the main job's model (100 lines x 6 directions, 2 threads)
    a pass took 1.6-2.0x less time than one batch of consecutive lines through the model's
    forward (interleaved runs), with NLLs equal to 4e-7."""
    model.eval()
    device = model.embed.weight.device
    ids = {lang: [np.asarray(x, dtype=np.int64) for x in vocab.encode(lines)] for lang, lines in texts.items()}
    out = {}
    for src, tgt in pairs:
        order = sorted(range(len(ids[src])), key=lambda i: (len(ids[src][i]), len(ids[tgt][i])))
        total, tokens = 0.0, 0
        for start in range(0, len(order), batch_sentences):
            rows = order[start:start + batch_sentences]
            batch = collate([ids[src][i] for i in rows], [ids[tgt][i] for i in rows], [vocab.tag_id(tgt)] * len(rows),
                            model.model_cfg.max_positions).to(device, non_blocking=True)
            memory, memory_keep, _, _ = model.encode(batch.src)
            hidden, _, _ = model.decode(batch.tgt_in, memory, memory_keep, project=False)
            real = batch.tgt_out != PAD_ID
            logits = model.project(hidden[real])
            total += float(F.cross_entropy(logits.float(), batch.tgt_out[real], reduction="sum"))
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
    for name, layer in model.moe_layer_map().items():
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


def budget_keep(model: Seq2Seq, vocab: Vocab, texts: dict[str, Sequence[str]], pairs: Sequence[Direction],
                budget: int, min_experts: int = 1, progress: Callable[[str], None] = print
                ) -> tuple[dict[str, list[int]], dict]:
    """({layer: kept experts}, report) keeping `budget` experts over all MoE layers (each keeps at
    least `min_experts`, top_k): greedy joint removal, each step the (layer, expert) whose removal
    gives the smallest mean + worst NLL increase with the earlier removals in place. The report
    holds the full model's NLL per direction, the removal steps and the final set's NLL increase."""
    layers = model.moe_layer_map()
    kept = {name: list(range(len(layer.experts))) for name, layer in layers.items()}
    if budget < min_experts * len(layers):
        raise ValueError(f"budget {budget} < {min_experts} expert(s) in each of {len(layers)} MoE layers")
    base = direction_nll(model, vocab, texts, pairs)

    def increase(sets: dict[str, list[int]]) -> dict[str, float]:
        with ExitStack() as stack:
            for name, ids in sets.items():
                if len(ids) < len(layers[name].experts):
                    stack.enter_context(restricted(layers[name], ids))
            nll = direction_nll(model, vocab, texts, pairs)
        return {d: nll[d] - base[d] for d in base}

    steps, final = [], {d: 0.0 for d in base}
    while sum(len(ids) for ids in kept.values()) > budget:
        best = None
        for name, ids in kept.items():
            if len(ids) <= min_experts:
                continue
            for drop in ids:
                trial = {**kept, name: [e for e in ids if e != drop]}
                measured = increase(trial)
                progress(f"prune.rule=loss: without {name} expert {drop} (kept {trial}): "
                         f"mean + worst NLL increase {score(measured):.4f}")
                if best is None or score(measured) < score(best[2]):
                    best = (name, drop, measured)
        name, drop, final = best
        kept[name] = [e for e in kept[name] if e != drop]
        steps.append({"layer": name, "dropped": drop, "score": round(score(final), 4)})
    return kept, {"base_nll": {d: round(v, 4) for d, v in base.items()}, "steps": steps,
                  "increase": {d: round(v, 4) for d, v in final.items()}}
