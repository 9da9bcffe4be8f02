"""Periodic validation: per-direction loss (token NLL) and greedy BLEU/chrF on the val subset."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mtmoe.data.batching import collate, pack_by_tokens, padded_lengths
from mtmoe.data.prepare import TrainingData
from mtmoe.data.vocab import PAD_ID
from mtmoe.model.generation import translate_ids
from mtmoe.scoring import score_direction, summarize


@torch.no_grad()
def direction_loss(model, data: TrainingData, src: str, tgt: str, max_tokens: int, max_len: int,
                   bf16: bool = False) -> float:
    """Mean token NLL (no label smoothing) of src->tgt over the validation lines.

    Batches hold lines of similar length, each at most `max_tokens` tokens (sentences x longest
    side, as in training; a longer single line is a batch of its own): a fixed number of lines per
    batch made batches of long lines many times the budget, so that a run that trained could run
    out of device memory at its first validation. Every rank packs the same batches (an
    expert-parallel model's all-to-all needs the same number of calls on each)."""
    corpus = data.valid
    tag = data.vocab.tag_id(tgt)
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0  # the loss is read once, at the end
    src_len, tgt_len = padded_lengths(np.array([len(corpus.line(src, i)) for i in range(len(corpus))], dtype=np.int64),
                                      np.array([len(corpus.line(tgt, i)) for i in range(len(corpus))], dtype=np.int64),
                                      max_len)
    order = np.argsort(np.maximum(src_len, tgt_len), kind="stable")
    for group in pack_by_tokens(src_len[order], tgt_len[order], max_tokens):
        idx = order[group]
        batch = collate([corpus.line(src, i) for i in idx], [corpus.line(tgt, i) for i in idx],
                        [tag] * len(idx), max_len).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, _, _ = model(batch.src, batch.tgt_in)
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID,
                              reduction="sum")
        total += nll
        count += batch.num_target_tokens  # counted on the host by collate
    return float(total) / max(1, count)


def greedy_translations(model, data: TrainingData, max_tokens: int, bf16: bool = False, sync_group=None,
                        directions=None) -> dict[str, list[str]]:
    """{'en-de': greedy translations of the val lines} for every direction (or `directions`, a subset
    of them), decoded together: the sentences of all directions share batches (sorted by length,
    each tagged with its target language), so a validation runs a few decoding loops instead of one
    per direction. A decoding step of a small batch costs about what one of a full batch costs
    (launches on a GPU, Python on either device), and each sentence keeps its own length limit, so a
    translation is the one its direction decoded alone gives (`translate_ids`)."""
    src_ids, tags, spans = [], [], {}
    for src, tgt in directions or data.directions:
        start = len(src_ids)
        src_ids += [data.valid.line(src, i).astype(np.int64) for i in range(len(data.valid))]
        tags += [data.vocab.tag_id(tgt)] * len(data.valid)
        spans[f"{src}-{tgt}"] = (start, len(src_ids))
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16):
        hyps = translate_ids(model, src_ids, tags, beam=1, max_tokens=max_tokens * 4, sync_group=sync_group,
                             banned_ids=sorted(data.vocab.special_ids))
    return {name: [data.vocab.decode(h) for h in hyps[a:b]] for name, (a, b) in spans.items()}


def greedy_translations_per_direction(model, data: TrainingData, max_tokens: int, bf16: bool = False,
                                      sync_group=None) -> dict[str, list[str]]:
    """`greedy_translations`, one direction at a time (each its own decoding loops): the reference
    it is tested and benchmarked against (scripts/bench_validation.py)."""
    return {name: hyps for direction in data.directions
            for name, hyps in greedy_translations(model, data, max_tokens, bf16, sync_group, [direction]).items()}


def run_validation(model, data: TrainingData, max_tokens: int, max_len: int, with_bleu: bool,
                   bf16: bool = False, sync_group=None) -> dict:
    """{'directions': {'en-de': {'loss', 'ppl', 'bleu', 'chrf', ...}}, 'valid_loss', 'valid_bleu'}."""
    was_training = model.training
    model.eval()
    per_direction: dict[str, dict] = {}
    try:
        translations = greedy_translations(model, data, max_tokens, bf16, sync_group) if with_bleu else {}
        for src, tgt in data.directions:
            name = f"{src}-{tgt}"
            loss = direction_loss(model, data, src, tgt, max_tokens, max_len, bf16)
            per_direction[name] = {"loss": round(loss, 4), "ppl": round(math.exp(min(loss, 50)), 2)}
            if with_bleu:
                per_direction[name].update(score_direction(translations[name], data.valid.texts[tgt]))
    finally:
        model.train(was_training)
    result = {"directions": per_direction,
              "valid_loss": round(sum(d["loss"] for d in per_direction.values()) / len(per_direction), 4)}
    if with_bleu:
        mean = summarize(per_direction)
        result["valid_bleu"], result["valid_chrf"] = mean["bleu"], mean["chrf"]
    return result
