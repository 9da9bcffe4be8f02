"""Routing statistics of a model over a calibration set: which experts each language and direction uses
(what routing.json, pruning and `mtmoe-eval telemetry=true` are made of).

Each direction's sentence pairs run teacher-forced through the model in eval mode (no token is
dropped). Every MoE layer reports, per batch, the top-k choices per expert (`routed`) and the mean
gate probability (`importance`); batches hold one direction, so encoder layers are attributed to
the source language, decoder layers to the target language, and both to the direction.

Output (JSON-ready dict):
    {"layers": ["enc1", "dec1"], "num_experts": E, "experts": {"enc1": E1, "dec1": E2}, "top_k": k,
     "by_direction": {"en-de": {"enc1": {"tokens": n, "share": [E1], "prob_mass": [E1]}, ...}},
     "by_language": {"en": {"enc1": {...}}, ...},   # enc layers by source, dec layers by target
     "overall": {"enc1": {...}}}
where E is the model's number of experts as trained, E1, E2 the experts each layer has (E, or the
ones a pruned model kept: its layers may keep different numbers), share[e] the fraction of the
layer's top-k choices that went to expert e (sums to 1) and prob_mass[e] the mean gate probability
of e (sums to 1 over experts).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from mtmoe.data.batching import collate
from mtmoe.data.sampling import Direction
from mtmoe.data.vocab import Vocab


class _Accumulator:
    def __init__(self, num_experts: int):
        self.tokens = 0.0
        self.routed = np.zeros(num_experts)
        self.prob = np.zeros(num_experts)

    def add(self, stats: dict) -> None:
        n = float(stats["tokens"])
        self.tokens += n
        self.routed += stats["routed"].cpu().numpy()
        self.prob += stats["importance"].cpu().numpy() * n

    def summary(self) -> dict:
        total = max(self.routed.sum(), 1e-9)
        return {"tokens": int(self.tokens), "share": (self.routed / total).round(5).tolist(),
                "prob_mass": (self.prob / max(self.tokens, 1e-9)).round(5).tolist()}


@torch.no_grad()
def collect_routing(model, vocab: Vocab, texts: dict[str, Sequence[str]], directions: Sequence[Direction],
                    batch_sentences: int = 64, progress: Optional[str] = None) -> dict:
    """Routing telemetry of `model` on the parallel `texts` for each direction; with `progress` (a
    label), a progress bar over the directions on stderr (a pruning export's calibration takes minutes)."""
    model.eval()
    layers = model.moe_layer_names()
    accs: dict[tuple[str, str, str], _Accumulator] = {}
    ids = {lang: [np.asarray(x, dtype=np.int64) for x in vocab.encode(lines)] for lang, lines in texts.items()}

    def acc(kind: str, key: str, layer: str, size: int) -> _Accumulator:
        return accs.setdefault((kind, key, layer), _Accumulator(size))

    max_len = model.model_cfg.max_positions
    device = model.embed.weight.device
    for src, tgt in tqdm(directions, desc=progress, unit="direction", disable=progress is None):
        for start in range(0, len(ids[src]), batch_sentences):
            stop = min(len(ids[src]), start + batch_sentences)
            batch = collate(ids[src][start:stop], ids[tgt][start:stop], [vocab.tag_id(tgt)] * (stop - start), max_len)
            batch = batch.to(device, non_blocking=True)
            memory, memory_keep, _, enc_stats = model.encode(batch.src)
            _, _, dec_stats = model.decode(batch.tgt_in, memory, memory_keep, project=False)
            stats = [s for s in enc_stats + dec_stats if s is not None]
            for layer, s in zip(layers, stats):
                size = len(s["routed"])
                lang = src if layer.startswith("enc") else tgt
                for kind, key in (("by_direction", f"{src}-{tgt}"), ("by_language", lang), ("overall", "all")):
                    acc(kind, key, layer, size).add(s)
    # num_experts: the model's, as trained; experts: each layer's own (a pruned model keeps different
    # numbers per layer, and shares are indexed by its kept experts).
    out: dict = {"layers": layers, "num_experts": model.moe_cfg.num_experts,
                 "experts": {layer: len(accs[("overall", "all", layer)].routed) for layer in layers},
                 "top_k": model.moe_cfg.top_k, "by_direction": defaultdict(dict), "by_language": defaultdict(dict),
                 "overall": {}}
    for (kind, key, layer), a in accs.items():
        if kind == "overall":
            out["overall"][layer] = a.summary()
        else:
            out[kind][key][layer] = a.summary()
    out["by_direction"], out["by_language"] = dict(out["by_direction"]), dict(out["by_language"])
    return out
