"""Beam search on the same sentence batches with the same output-length rule.

Sentences are tokenized with the project's vocabulary, sorted by length and cut into batches of
`batch_size`; every system decodes exactly these batches (the same source tensor: `<2de>` tag,
tokens, `</s>`, right-padded).

- mtmoe: `mtmoe.model.generation.translate_ids` on the plain model (what `translate`, eval and export use
  after SentencePiece encoding), given one batch at a time.
- HF: `generate(num_beams=beam)` with `MtmoeLengthRule`, which applies mtmoe's beam-search rules:
  PAD/BOS/UNK are never generated and a sentence must end (EOS) at mtmoe's per-sentence limit,
  floor(len(src) * max_len_a + max_len_b) tokens including EOS (read from the defaults of
  `mtmoe.model.generation.beam_search`). With random weights EOS is rarely chosen before, so both
  systems generate (nearly) the same number of tokens; the counts are reported.
"""

from __future__ import annotations

import inspect
import time
from typing import Sequence

import numpy as np
import torch

from mtmoe.data.batching import collate
from mtmoe.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Vocab
from mtmoe.model.generation import beam_search, translate_ids


def sentence_batches(vocab: Vocab, lines: Sequence[str], batch_size: int) -> list[list[np.ndarray]]:
    """Token ids of `lines`, sorted by length, in batches of `batch_size` sentences."""
    ids = [np.asarray(x, dtype=np.int64) for x in vocab.encode(lines)]
    order = np.argsort([len(x) for x in ids], kind="stable")
    return [[ids[i] for i in order[s:s + batch_size]] for s in range(0, len(ids), batch_size)]


def source_tensor(batch: Sequence[np.ndarray], tag_id: int, max_positions: int) -> torch.Tensor:
    """[B, S] source ids exactly as mtmoe's decoder builds them."""
    empty = [np.zeros(0, np.int64)] * len(batch)
    return collate(batch, empty, [tag_id] * len(batch), max_positions).src


def length_limits(src: torch.Tensor, max_positions: int) -> torch.Tensor:
    """mtmoe's per-sentence output limit (tokens including EOS) for src [B, S] -> [B]."""
    params = inspect.signature(beam_search).parameters
    a, b = params["max_len_a"].default, params["max_len_b"].default
    limits = ((src != PAD_ID).sum(1).float() * a + b).long()
    return limits.clamp(2, max_positions - 1)


class MtmoeLengthRule:
    """HF logits processor: mtmoe's banned tokens and forced EOS at the sentence's limit."""

    def __init__(self, limits: torch.Tensor, beam: int):
        self.limits = limits.repeat_interleave(beam)  # one row per beam, as HF flattens them

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, [PAD_ID, BOS_ID, UNK_ID]] = float("-inf")
        at_limit = input_ids.shape[1] >= self.limits  # input_ids holds the start token + generated ones
        if at_limit.any():
            eos = scores[at_limit, EOS_ID]
            scores[at_limit] = float("-inf")
            scores[at_limit, EOS_ID] = eos
        return scores


def mtmoe_decode(model, batch: Sequence[np.ndarray], tag_id: int, beam: int) -> int:
    """Decodes one batch with mtmoe; returns the tokens generated (EOS included)."""
    hyps = translate_ids(model, batch, tag_id, beam, max_tokens=10 ** 9)  # one token budget batch
    return sum(len(h) + 1 for h in hyps)


def hf_decode(model, batch: Sequence[np.ndarray], tag_id: int, beam: int) -> int:
    """Decodes one batch with HF generate; returns the tokens generated (EOS included)."""
    from transformers import LogitsProcessorList

    max_positions = model.config.max_position_embeddings
    src = source_tensor(batch, tag_id, max_positions).to(model.device)
    limits = length_limits(src, max_positions)
    out = model.generate(input_ids=src, attention_mask=(src != PAD_ID).long(), num_beams=beam,
                         do_sample=False, length_penalty=1.0, early_stopping=False,
                         max_new_tokens=int(limits.max()),
                         logits_processor=LogitsProcessorList([MtmoeLengthRule(limits, beam)]))
    return generated_tokens(out[:, 1:])


def generated_tokens(sequences: torch.Tensor) -> int:
    """Tokens up to and including each row's first EOS (HF pads finished rows with EOS)."""
    is_eos = sequences == EOS_ID
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, (sequences != PAD_ID).sum(1))
    return int(lengths.sum())


def make_decoder(system: str, cfg, vocab_size: int, device: torch.device = torch.device("cpu")):
    """(decode function, model in eval mode on `device`) for `mtmoe*` (built from `cfg`), `hf` or
    `hf_fixed`; on a GPU the function decodes under bf16 autocast."""
    if system.startswith("mtmoe"):
        from mtmoe.model.seq2seq import build_model

        decode, model = mtmoe_decode, build_model(vocab_size, cfg.model, cfg.moe, 0, cfg.train.seed)
    else:
        from bench.vs_hf.systems import build_hf

        decode, model = hf_decode, build_hf(cfg, vocab_size, cfg.train.seed, fixed_dispatch=system == "hf_fixed")
    if device.type == "cpu":
        return decode, model.eval()

    def on_device(model, batch, tag_id, beam):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return decode(model, batch, tag_id, beam)

    return on_device, model.to(device).eval()


def alternate_decoding(systems: dict, batches: Sequence[Sequence[np.ndarray]], tag_id: int, beam: int,
                       repeats: int) -> dict[str, dict]:
    """Sentences/s and tokens/s per system: after one untimed warm-up batch each, every pass
    decodes every batch with every system in turn (order rotating by batch); per-pass rates and
    their median are returned with the tokens generated in the last pass.

    `systems`: name -> (decode function, model)."""
    for decode, model in systems.values():
        decode(model, batches[0][:4], tag_id, beam)
    names = list(systems)
    passes = {name: [] for name in names}
    sentences = sum(len(b) for b in batches)
    for _ in range(repeats):
        seconds = dict.fromkeys(names, 0.0)
        tokens = dict.fromkeys(names, 0)
        for i, batch in enumerate(batches):
            for name in names[i % len(names):] + names[:i % len(names)]:
                decode, model = systems[name]
                started = time.perf_counter()
                tokens[name] += decode(model, batch, tag_id, beam)
                seconds[name] += time.perf_counter() - started
        for name in names:
            passes[name].append({"seconds": seconds[name], "tokens": tokens[name]})
    results = {}
    for name in names:
        sent_rates = [sentences / p["seconds"] for p in passes[name]]
        tok_rates = [p["tokens"] / p["seconds"] for p in passes[name]]
        results[name] = {"sentences_per_s": float(np.median(sent_rates)), "tokens_per_s": float(np.median(tok_rates)),
                         "sentences_per_s_passes": sent_rates, "tokens_generated": passes[name][-1]["tokens"],
                         "sentences": sentences}
    return results
