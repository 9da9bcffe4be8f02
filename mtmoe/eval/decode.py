"""Batched beam search (greedy is beam=1) with length penalty and incremental decoding.

The model is any `Seq2Seq` (plain export or the live training model). Sentences are sorted by
length and packed into token-budget batches, decoded, and returned in input order.

Expert parallelism: when the experts of the model are spread over ranks, every decoding step
runs collectives, so all ranks must take the same number of steps. `sync_group` makes the stop
decision a group-wide agreement (all_reduce MIN of "all finished").
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mtmoe.data.batching import collate, pack_by_tokens
from mtmoe.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab


def _reorder_cache(cache: list, order: torch.Tensor) -> None:
    for layer in cache:
        for part in layer.values():
            for key in ("k", "v"):
                if key in part:
                    part[key] = part[key].index_select(0, order)


def _all_agree(flag: bool, group) -> bool:
    if group is None:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


@torch.no_grad()
def beam_search(model, src: torch.Tensor, beam: int = 4, length_penalty: float = 1.0,
                max_len_a: float = 1.5, max_len_b: int = 10, sync_group=None) -> list[list[int]]:
    """src [B, S] (tagged, EOS-terminated, PAD-padded) -> best hypothesis token ids per sentence.

    A hypothesis' score is sum log p / len^length_penalty. Each step keeps 2*beam candidates;
    those ending in EOS within the top `beam` are finalized, the best `beam` others continue.
    A sentence is done once it has `beam` finalized hypotheses."""
    bsz, k = src.shape[0], beam
    memory, memory_keep, _, _ = model.encode(src)
    memory = memory.repeat_interleave(k, 0)
    memory_keep = memory_keep.repeat_interleave(k, 0)
    src_len = int((src != PAD_ID).sum(1).max())
    max_len = max(2, min(int(src_len * max_len_a + max_len_b), model.model_cfg.max_positions - 1))
    cache: list = [dict() for _ in model.decoder]
    tokens = torch.full((bsz * k, 1), BOS_ID, dtype=torch.long)
    scores = torch.zeros(bsz, k)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(bsz)]
    done = np.zeros(bsz, dtype=bool)
    base = (torch.arange(bsz) * k)[:, None]

    for step in range(max_len):
        logits, _, _ = model.decode(tokens[:, -1:], memory, memory_keep, cache=cache, offset=step)
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)  # [B*k, V]
        logp[:, [PAD_ID, BOS_ID, UNK_ID]] = float("-inf")
        if step == max_len - 1:
            eos_col = logp[:, EOS_ID].clone()
            logp.fill_(float("-inf"))
            logp[:, EOS_ID] = eos_col
        vocab = logp.shape[1]
        cand = (scores.view(-1, 1) + logp).view(bsz, k * vocab)
        top_scores, top_index = cand.topk(2 * k, dim=1)  # [B, 2k]
        top_beam, top_token = top_index // vocab, top_index % vocab
        is_eos = top_token == EOS_ID

        for b, j in zip(*torch.nonzero(is_eos[:, :k], as_tuple=True)):
            b, j = int(b), int(j)
            if done[b] or not torch.isfinite(top_scores[b, j]):
                continue
            hyp = tokens[b * k + int(top_beam[b, j]), 1:].tolist()
            finished[b].append((float(top_scores[b, j]) / (len(hyp) + 1) ** length_penalty, hyp))
            if len(finished[b]) >= k:
                done[b] = True
        if _all_agree(bool(done.all()), sync_group):
            break

        cont_scores = top_scores.masked_fill(is_eos, float("-inf"))
        cont_scores, pick = cont_scores.topk(k, dim=1)  # [B, k] positions among the 2k
        order = (base + top_beam.gather(1, pick)).view(-1)
        tokens = torch.cat([tokens.index_select(0, order), top_token.gather(1, pick).view(-1, 1)], dim=1)
        scores = cont_scores
        _reorder_cache(cache, order)

    best = []
    for b in range(bsz):
        if finished[b]:
            best.append(max(finished[b], key=lambda item: item[0])[1])
        else:  # only when max_len stopped a sentence before any EOS (cannot happen: EOS is forced)
            best.append(tokens[b * k, 1:].tolist())
    return best


def translate_ids(model, src_ids: Sequence[np.ndarray], tag_id: int, beam: int = 4,
                  length_penalty: float = 1.0, max_tokens: int = 4096, sync_group=None,
                  progress: Optional[object] = None) -> list[list[int]]:
    """Translates tokenized sentences (no tag/EOS yet) into token ids, in input order."""
    max_len = model.model_cfg.max_positions - 2
    lengths = np.array([min(len(s), max_len) + 2 for s in src_ids])
    order = np.argsort(lengths, kind="stable")
    groups = pack_by_tokens(lengths[order], lengths[order], max(max_tokens // beam, int(lengths.max())))
    out: list[list[int]] = [[] for _ in src_ids]
    was_training = model.training
    model.eval()
    try:
        for group in groups:
            idx = order[group]
            batch = collate([src_ids[i] for i in idx], [np.zeros(0, np.int64)] * len(idx), [tag_id] * len(idx),
                            max_len + 2)
            for i, hyp in zip(idx, beam_search(model, batch.src, beam, length_penalty, sync_group=sync_group)):
                out[i] = [t for t in hyp if t != EOS_ID]
            if progress is not None:
                progress.update(len(idx))
    finally:
        model.train(was_training)
    return out


def translate(model, vocab: Vocab, lines: Sequence[str], tgt_lang: str, beam: int = 4,
              length_penalty: float = 1.0, max_tokens: int = 4096, sync_group=None, progress=None) -> list[str]:
    """Source sentences -> translations into `tgt_lang` (detokenized strings)."""
    src_ids = [np.asarray(ids, dtype=np.int64) for ids in vocab.encode(lines)]
    hyps = translate_ids(model, src_ids, vocab.tag_id(tgt_lang), beam, length_penalty, max_tokens,
                         sync_group, progress)
    return [vocab.decode(h) for h in hyps]
