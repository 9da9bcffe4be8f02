"""Denoising (DAE): reconstruct a sentence from its noised copy (mBART text infilling, optional
sentence permutation), asked for with the sentence's own language tag. One source per language."""

from __future__ import annotations

from typing import Optional

import numpy as np

from mtmoe.config import DenoisingParams
from mtmoe.data.noise import infill_spans, permute_sentences
from mtmoe.data.tasks.base import Source, register_task
from mtmoe.errors import ConfigError


@register_task("denoising", DenoisingParams)
class DenoisingTask:
    def __init__(self, params: DenoisingParams):
        self.params = params

    def sources(self, corpus, rows, directions, vocab, max_src_tokens: Optional[int] = None) -> list[Source]:
        langs = list(self.params.langs) or list(corpus.langs)
        unknown = [lang for lang in langs if lang not in corpus.langs]
        if unknown:
            raise ConfigError(f"tasks.denoising.langs: {unknown} not among data.langs={list(corpus.langs)}")
        if len(set(langs)) != len(langs):
            raise ConfigError(f"tasks.denoising.langs: {langs} lists a language twice (it would be sampled twice)")
        mask_id = vocab.mask_id
        sentence_end = vocab.sentence_end_mask() if self.params.permute_sentences else None
        p = self.params
        out = []
        for lang in langs:
            def make(i: int, rng: np.random.Generator, lang=lang):
                original = corpus.line(lang, i)
                noised = original if sentence_end is None else permute_sentences(original, sentence_end, rng)
                return infill_spans(noised, mask_id, rng, p.mask_ratio, p.poisson_lambda, max_src_tokens), original

            lengths = corpus.lengths(lang)
            out.append(Source("denoising", f"dae-{lang}", lang, rows, lengths + 1, lengths, make, random=True))
        return out
