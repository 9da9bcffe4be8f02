"""The task interface and registry.

A `Source` yields examples `(src ids, tgt ids, target-language tag)` from lines of the tokenized
corpus; `Task.sources()` lists a task's sources. The batch stream samples sources (by the
multitask schedule, then by temperature within a task), draws lines from `source.rows`, and
packs the examples into token-budget batches; the loss is the same cross-entropy for every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np

from mtmoe.config import TASK_PARAMS, parse_task_params

MakeExample = Callable[[int, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class Source:
    task: str
    label: str
    """e.g. `en-de` (translation) or `dae-cs` (denoising)."""
    tgt_lang: str
    rows: np.ndarray
    """Corpus lines this source may draw (e.g. the first 3k for a low-resource direction)."""
    src_len: np.ndarray
    """[num corpus lines] source length upper bound of each line's example (for packing)."""
    tgt_len: np.ndarray
    make: MakeExample
    """(line, rng) -> (src ids [S], tgt ids [T]) without tag/BOS/EOS."""
    random: bool = False
    """`make` draws from its rng (seeded per example by the stream, so batches stay reproducible)."""


class Task(Protocol):
    name: str

    def sources(self, corpus, rows, directions, vocab, max_src_tokens: Optional[int] = None) -> list[Source]:
        """`max_src_tokens`: the most source tokens a batch keeps of an example (`batching.
        source_token_limit`); a task that makes its sources longer than their lines keeps to it."""


_REGISTRY: dict[str, type] = {}


def register_task(name: str, params_cls: type):
    """Class decorator: `@register_task("denoising", DenoisingParams)`; the params schema is
    recorded in `config.TASK_PARAMS`, which `validate()` checks `tasks.*` against."""
    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        TASK_PARAMS[name] = params_cls
        return cls
    return wrap


def build_sources(tasks_cfg: dict[str, Any], corpus, rows: np.ndarray, directions, vocab,
                  max_src_tokens: Optional[int] = None) -> list[Source]:
    """Every source of every configured task, translation first (`max_src_tokens`: `Task.sources`)."""
    out = []
    for name in sorted(tasks_cfg, key=lambda n: (n != "translation", n)):
        params = parse_task_params(name, tasks_cfg[name])
        out.extend(_REGISTRY[name](params).sources(corpus, rows, directions, vocab, max_src_tokens))
    return out
