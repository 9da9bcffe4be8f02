"""Translation: one source per direction; line i of the source language -> line i of the target."""

from __future__ import annotations

from typing import Optional

import numpy as np

from mtmoe.config import TranslationParams
from mtmoe.data.tasks.base import Source, register_task
from mtmoe.errors import ConfigError


@register_task("translation", TranslationParams)
class TranslationTask:
    def __init__(self, params: TranslationParams):
        self.params = params

    def sources(self, corpus, rows, directions, vocab, max_src_tokens: Optional[int] = None) -> list[Source]:
        known = {f"{s}-{t}" for s, t in directions}
        unknown = sorted(set(self.params.lines) - known)
        if unknown:
            raise ConfigError(f"tasks.translation.lines: {unknown} are not training directions ({sorted(known)})")
        out = []
        for s, t in directions:
            label = f"{s}-{t}"
            source_rows = rows[: int(self.params.lines[label])] if label in self.params.lines else rows

            def make(i: int, rng: np.random.Generator, s=s, t=t):
                return corpus.line(s, i), corpus.line(t, i)

            out.append(Source("translation", label, t, source_rows, corpus.lengths(s), corpus.lengths(t), make))
        return out
