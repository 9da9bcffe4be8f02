"""Everything training needs from the corpus: vocabulary, tokenized train/valid splits,
directions and their sampling probabilities. Built by rank 0 first (the others then hit the
caches), so a multi-rank start trains SentencePiece once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import logging
from pathlib import Path

import numpy as np

from mtmoe.config import DataConfig
from mtmoe.data.batching import source_token_limit
from mtmoe.data.corpus import check_text_corpus, find_language_file, load_corpus
from mtmoe.data.sampling import Direction, parse_directions, temperature_probs
from mtmoe.data.schedule import Mixture
from mtmoe.data.tasks import build_sources
from mtmoe.data.tokenized import TokenizedCorpus, tokenize
from mtmoe.data.vocab import Vocab, get_or_train_vocab
from mtmoe.errors import CorpusError
from mtmoe.paths import output_path, resolve


@dataclass
class TrainingData:
    vocab: Vocab
    train: TokenizedCorpus
    valid: TokenizedCorpus
    directions: list[Direction]
    probs: np.ndarray  # [num_directions]
    train_rows: np.ndarray  # [usable lines] indices of training lines within data.max_len


log = logging.getLogger("mtmoe")


def usable_rows(corpus: TokenizedCorpus, cfg: DataConfig) -> np.ndarray:
    """Indices of the training lines that fit `cfg.max_len` in every language, by `cfg.too_long`:
    all lines (`truncate`), the fitting ones (`skip`), or CorpusError at the first misfit (`fail`).

    A line fits when tag/BOS + tokens + </s> <= max_len. Multi-way parallel rows are kept or dropped
    whole, so every direction sees the same lines."""
    limit = source_token_limit(cfg.max_len)
    too_long = np.zeros(len(corpus), dtype=bool)
    for lang in corpus.langs:
        too_long |= corpus.lengths(lang) > limit
    count = int(too_long.sum())
    if cfg.too_long == "truncate" or count == 0:
        return np.arange(len(corpus))
    if cfg.too_long == "fail":
        row = int(np.argmax(too_long))
        lang = next(lang for lang in corpus.langs if corpus.lengths(lang)[row] > limit)
        prefix = Path(cfg.corpus_dir) / cfg.train_prefix
        where = (f"{find_language_file(resolve(prefix), lang) or f'{prefix}.{lang}'}:{row + 1}" if cfg.format == "text"
                 else f"{prefix}.{cfg.format}: row {row + 1}, column {lang!r}")
        raise CorpusError(f"{where}: {int(corpus.lengths(lang)[row])} tokens, over data.max_len={cfg.max_len} "
                          f"(with tag and </s>); {count} training lines are too long "
                          f"(data.too_long=fail; `skip` drops them, `truncate` cuts them)")
    if count == len(corpus):
        raise CorpusError(f"{Path(cfg.corpus_dir) / cfg.train_prefix}: every training line is longer than "
                          f"data.max_len={cfg.max_len}")
    log.warning("skipping %d of %d training lines longer than data.max_len=%d tokens (data.too_long=skip)",
                count, len(corpus), cfg.max_len)
    return np.flatnonzero(~too_long)


def check_training_corpus(cfg: DataConfig) -> None:
    """Refuses bad training or validation text (CorpusError naming the file and line) by the same
    checks as `prepare_training_data`, without tokenizing or importing torch (see
    `mtmoe.data.corpus.check_text_corpus`). Corpora in table formats are checked when loaded."""
    if cfg.format != "text":
        return
    for prefix in (cfg.train_prefix, cfg.valid_prefix):
        check_text_corpus(cfg.corpus_dir, prefix, cfg.langs)


def prepare_training_data(cfg: DataConfig, is_first: bool = True,
                          barrier: Callable[[], None] = lambda: None) -> TrainingData:
    directions = parse_directions(cfg.directions, cfg.langs, cfg.pivot)
    cache_dir = output_path(cfg.cache_dir)

    def build() -> TrainingData:
        train_text = load_corpus(cfg.corpus_dir, cfg.train_prefix, cfg.langs, cfg.format, cfg.max_train_lines)
        valid_text = load_corpus(cfg.corpus_dir, cfg.valid_prefix, cfg.langs, cfg.format, cfg.val_lines)
        vocab = get_or_train_vocab(train_text, cache_dir, cfg.vocab_size, cfg.spm_model_type, cfg.spm_sample_lines)
        train = tokenize(train_text, vocab, cfg.langs, cache_dir)
        valid = tokenize(valid_text, vocab, cfg.langs, cache_dir)
        # Multi-way parallel corpus: every direction has the same lines.
        probs = temperature_probs([len(train)] * len(directions), cfg.temperature)
        return TrainingData(vocab, train, valid, directions, probs, usable_rows(train, cfg))

    if is_first:
        data = build()
        barrier()
    else:
        barrier()
        data = build()
    return data


def training_mixture(data: TrainingData, tasks_cfg: dict, schedule_cfg, data_cfg: DataConfig):
    """(sources of every configured task, their Mixture over training steps)."""
    sources = build_sources(tasks_cfg, data.train, data.train_rows, data.directions, data.vocab,
                            source_token_limit(data_cfg.max_len))
    mixture = Mixture([s.task for s in sources], [len(s.rows) for s in sources], schedule_cfg, data_cfg.temperature)
    start = mixture.probs(0)
    log.info("training sources at step 0: %s", ", ".join(f"{s.label} {p:.1%}" for s, p in zip(sources, start)))
    return sources, mixture
