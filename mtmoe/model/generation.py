"""Batched beam search (greedy is beam=1) with length penalty and incremental decoding.

The model is any `Seq2Seq` (plain export or the live training model). Sentences are sorted by
length and packed into token-budget batches, decoded, and returned in input order.

Expert parallelism: when the experts of the model are spread over ranks, every decoding step
runs collectives, so all ranks must take the same number of steps. `sync_group` makes the stop
decision a group-wide agreement (all_reduce MIN of "all finished").
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mtmoe.data.batching import collate, pack_by_tokens
from mtmoe.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab
from mtmoe.device import collective_device

log = logging.getLogger("mtmoe")


def _reorder_cache(cache: list, order: torch.Tensor, beam: int, live: Optional[torch.Tensor]) -> None:
    """Self-attention caches follow the surviving beams (`order` [rows]); cross-attention keys and
    values are the same for every beam of a sentence, so they only lose finished sentences (`live`
    [sentences still decoding] indices, None when none finished)."""
    for layer in cache:
        for name, part in layer.items():
            for key in ("k", "v"):
                if key not in part:
                    continue
                if name == "cross":
                    if live is not None:
                        part[key] = _rows_of_sentences(part[key], beam, live)
                else:
                    part[key] = part[key].index_select(0, order)


def _rows_of_sentences(t: torch.Tensor, beam: int, sentences: torch.Tensor) -> torch.Tensor:
    """t [n*beam, ...] (beam rows per sentence) -> the rows of `sentences` (indices [m]) [m*beam, ...]."""
    return t.view(-1, beam, *t.shape[1:]).index_select(0, sentences).flatten(0, 1)


def _all_agree(flag: bool, group) -> bool:
    if group is None:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.long, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


Finished = list[tuple[float, list[int]]]
"""One sentence's finalized hypotheses, in the order they finished: (sum of log p, token ids
without BOS and EOS)."""


def best_hypothesis(finished: Finished, length_penalty: float) -> list[int]:
    """The hypothesis with the best sum log p / len^length_penalty (len counts the EOS; ties: the
    first to finish)."""
    return max(finished, key=lambda item: item[0] / (len(item[1]) + 1) ** length_penalty)[1]


@torch.no_grad()
def beam_search(model, src: torch.Tensor, beam: int = 4, length_penalty: float = 1.0,
                max_len_a: float = 1.5, max_len_b: int = 10, sync_group=None,
                banned_ids: Iterable[int] = ()) -> list[list[int]]:
    """src [B, S] (tagged, EOS-terminated, PAD-padded) -> best hypothesis token ids per sentence
    (`best_hypothesis` of `beam_search_finished`)."""
    return [best_hypothesis(f, length_penalty)
            for f in beam_search_finished(model, src, beam, max_len_a, max_len_b, sync_group, banned_ids)]


@torch.no_grad()
def beam_search_finished(model, src: torch.Tensor, beam: int = 4, max_len_a: float = 1.5, max_len_b: int = 10,
                         sync_group=None, banned_ids: Iterable[int] = ()) -> list[Finished]:
    """src [B, S] (tagged, EOS-terminated, PAD-padded) -> each sentence's `beam` finalized hypotheses.

    PAD, BOS and UNK are never produced, nor `banned_ids` (the vocabulary's language tags and
    <mask>, `Vocab.special_ids`, which are not text: a hypothesis spending steps and score on them
    would decode to less than its length says).

    Each step keeps 2*beam candidates by sum log p; those ending in EOS within the top `beam` are
    finalized, the best `beam` others continue. A sentence is done once it has `beam` finalized
    hypotheses. The length penalty plays no part in the search (it only ranks the finalized
    hypotheses, `best_hypothesis`), so one search serves every penalty: tuning it on a held-out set
    decodes once (mtmoe.eval.tune).

    Host and device: each step reads the device once (the 2*beam candidates' scores, beams and
    tokens, and the continuing picks, in one copy): the finished hypotheses are collected on the
    host from its copy of every beam's tokens, while the decoder's input, the masks and the
    caches' reordering stay on the device. A sentence that finishes costs one index copy to the
    device."""
    bsz, k = src.shape[0], beam
    device = src.device
    memory, memory_keep, _, _ = model.encode(src)
    memory = memory.repeat_interleave(k, 0)
    memory_keep = memory_keep.repeat_interleave(k, 0)
    # Each sentence's own length limit (not the batch's), so batching never changes a result.
    limits_host = ((src != PAD_ID).sum(1).cpu().float() * max_len_a + max_len_b).long()
    limits_host = limits_host.clamp(2, model.model_cfg.max_positions - 1)  # [B]
    limits = limits_host.to(device)
    cache: list = [dict() for _ in model.decoder]
    last = torch.full((bsz * k, 1), BOS_ID, dtype=torch.long, device=device)  # decoder input: each beam's last token
    history = np.zeros((bsz * k, 0), dtype=np.int64)  # host: each beam's tokens after BOS
    scores = torch.zeros(bsz, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    finished: list[Finished] = [[] for _ in range(bsz)]
    done = np.zeros(bsz, dtype=bool)
    active = np.arange(bsz)  # original index of each sentence still in the batch (host)
    banned = not_eos = None

    for step in range(int(limits_host.max())):
        n = len(active)
        logits, _, _ = model.decode(last, memory, memory_keep, cache=cache, offset=step)
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)  # [n*k, V]
        vocab = logp.shape[1]
        if banned is None:  # masks on the device, made once
            ids = torch.arange(vocab, device=device)
            banned = torch.isin(ids, torch.tensor([PAD_ID, BOS_ID, UNK_ID, *banned_ids], device=device))
            not_eos = ids != EOS_ID
        at_limit = (limits - 1 == step).repeat_interleave(k)  # [n*k]: must end now
        logp = logp.masked_fill(banned | (at_limit[:, None] & not_eos), float("-inf"))
        cand = (scores.view(-1, 1) + logp).view(n, k * vocab)
        top_scores, top_index = cand.topk(2 * k, dim=1)  # [n, 2k]
        top_beam, top_token = top_index // vocab, top_index % vocab
        scores, pick = top_scores.masked_fill(top_token == EOS_ID, float("-inf")).topk(k, dim=1)  # [n, k] among the 2k

        # The step's one read of the device: the candidates and the picks (float64 holds both exactly).
        host = torch.cat([top_scores.double(), top_index.double(), pick.double()], 1).cpu().numpy()
        host_scores = host[:, :2 * k]
        host_beam, host_token = np.divmod(host[:, 2 * k:4 * k].astype(np.int64), vocab)
        host_pick = host[:, 4 * k:].astype(np.int64)
        for b, j in zip(*np.nonzero(host_token[:, :k] == EOS_ID)):
            sentence = active[b]
            if done[sentence] or not np.isfinite(host_scores[b, j]):
                continue
            finished[sentence].append((float(host_scores[b, j]), history[b * k + host_beam[b, j]].tolist()))
            if len(finished[sentence]) >= k:
                done[sentence] = True
        if _all_agree(bool(done.all()), sync_group):
            break

        rows = np.arange(n)[:, None]
        order = torch.arange(n, device=device)[:, None] * k + top_beam.gather(1, pick)  # [n, k] rows to continue
        new_tokens = top_token.gather(1, pick)
        host_order = rows * k + np.take_along_axis(host_beam, host_pick, 1)
        host_new = np.take_along_axis(host_token, host_pick, 1)
        live_host = ~done[active]
        kept_sentences = None
        if sync_group is None and not live_host.all():
            # Drop finished sentences from the batch (not under expert parallelism, where every
            # rank must keep the same shapes in lock-step).
            kept_sentences = torch.from_numpy(np.flatnonzero(live_host)).to(device)
            order, new_tokens, scores, limits = (t.index_select(0, kept_sentences)
                                                 for t in (order, new_tokens, scores, limits))
            host_order, host_new, active = host_order[live_host], host_new[live_host], active[live_host]
            memory = _rows_of_sentences(memory, k, kept_sentences)
            memory_keep = _rows_of_sentences(memory_keep, k, kept_sentences)
        order = order.reshape(-1)
        history = np.concatenate([history[host_order.reshape(-1)], host_new.reshape(-1, 1)], axis=1)
        last = new_tokens.reshape(-1, 1)
        _reorder_cache(cache, order, k, kept_sentences)

    return finished


def translate_ids(model, src_ids: Sequence[np.ndarray], tag_id: int | Sequence[int], beam: int = 4,
                  length_penalty: float = 1.0, max_tokens: int = 4096, sync_group=None,
                  progress: Optional[object] = None, banned_ids: Iterable[int] = ()) -> list[list[int]]:
    """Translates tokenized sentences (no tag/EOS yet) into token ids, in input order. `tag_id`: the
    target language's tag, or one per sentence (several directions decoded in shared batches: each
    sentence's translation is the one it gets alone); `banned_ids`: tokens never produced
    (`beam_search_finished`)."""
    return translate_ids_per_penalty(model, src_ids, tag_id, beam, [length_penalty], max_tokens, sync_group,
                                     progress, banned_ids)[0]


def translate_ids_per_penalty(model, src_ids: Sequence[np.ndarray], tag_id: int | Sequence[int], beam: int,
                              length_penalties: Sequence[float], max_tokens: int = 4096, sync_group=None,
                              progress: Optional[object] = None,
                              banned_ids: Iterable[int] = ()) -> list[list[list[int]]]:
    """`translate_ids` for each of `length_penalties` from one beam search: [penalty][sentence] -> ids."""
    if not len(src_ids):  # (a batch of blank lines in mtmoe-translate)
        return [[] for _ in length_penalties]
    tags = [int(tag_id)] * len(src_ids) if isinstance(tag_id, (int, np.integer)) else [int(t) for t in tag_id]
    if len(tags) != len(src_ids):
        raise ValueError(f"{len(tags)} tag ids for {len(src_ids)} sentences")
    max_len = model.model_cfg.max_positions - 2
    lengths = np.array([min(len(s), max_len) + 2 for s in src_ids])
    order = np.argsort(lengths, kind="stable")
    groups = pack_by_tokens(lengths[order], lengths[order], max(max_tokens // beam, int(lengths.max())))
    out: list[list[list[int]]] = [[[] for _ in src_ids] for _ in length_penalties]
    was_training = model.training
    device = next(model.parameters()).device  # decode where the model is
    model.eval()
    try:
        for group in groups:
            idx = order[group]
            batch = collate([src_ids[i] for i in idx], [np.zeros(0, np.int64)] * len(idx), [tags[i] for i in idx],
                            max_len + 2)
            src = batch.src.to(device, non_blocking=True)
            for i, finished in zip(idx, beam_search_finished(model, src, beam, sync_group=sync_group,
                                                                   banned_ids=banned_ids)):
                for hyps, length_penalty in zip(out, length_penalties):
                    hyps[i] = [t for t in best_hypothesis(finished, length_penalty) if t != EOS_ID]
            if progress is not None:
                progress.update(len(idx))
    finally:
        model.train(was_training)
    return out


def warn_cut_lines(vocab: Vocab, lines: Sequence[str], max_positions: int, source: str,
                   line_numbers: Optional[Sequence[int]] = None, shown: int = 3) -> list[int]:
    """Warns (one log line naming `source`:line) about source lines longer than the model takes:
    `translate_ids` cuts them to their first max_positions - 2 tokens (tag and </s> take two), so
    their translations cover only that part. Returns the line numbers (1-based unless given)."""
    limit = max_positions - 2
    numbers = list(line_numbers) if line_numbers is not None else list(range(1, len(lines) + 1))
    cut = [(numbers[i], len(ids)) for i, ids in enumerate(vocab.encode(lines)) if len(ids) > limit]
    if cut:
        named = ", ".join(f"{source}:{n} ({tokens} tokens)" for n, tokens in cut[:shown])
        more = f" and {len(cut) - shown} more lines" if len(cut) > shown else ""
        log.warning("%s%s: longer than the model's max_positions=%d allows; cut to the first %d tokens "
                    "(the translation covers only those)", named, more, max_positions, limit)
    return [n for n, _ in cut]


def translate(model, vocab: Vocab, lines: Sequence[str], tgt_lang: str, beam: int = 4,
              length_penalty: float = 1.0, max_tokens: int = 4096, sync_group=None, progress=None) -> list[str]:
    """Source sentences -> translations into `tgt_lang` (detokenized strings)."""
    return translate_per_penalty(model, vocab, lines, tgt_lang, beam, [length_penalty], max_tokens, sync_group,
                                 progress)[0]


def translate_per_penalty(model, vocab: Vocab, lines: Sequence[str], tgt_lang: str, beam: int,
                          length_penalties: Sequence[float], max_tokens: int = 4096, sync_group=None,
                          progress=None) -> list[list[str]]:
    """`translate` for each of `length_penalties` from one beam search: [penalty][line] -> translation.
    The vocabulary's language tags and <mask> are never produced."""
    src_ids = [np.asarray(ids, dtype=np.int64) for ids in vocab.encode(lines)]
    per_penalty = translate_ids_per_penalty(model, src_ids, vocab.tag_id(tgt_lang), beam, length_penalties,
                                            max_tokens, sync_group, progress, sorted(vocab.special_ids))
    return [[vocab.decode(h) for h in hyps] for hyps in per_penalty]
