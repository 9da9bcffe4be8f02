"""Everything training needs from the corpus: vocabulary, tokenized train/valid splits,
directions and their sampling probabilities. Built by rank 0 first (the others then hit the
caches), so a multi-rank start trains SentencePiece once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mtmoe.config import DataConfig
from mtmoe.data.corpus import load_corpus
from mtmoe.data.sampling import Direction, parse_directions, temperature_probs
from mtmoe.data.tokenized import TokenizedCorpus, tokenize
from mtmoe.data.vocab import Vocab, get_or_train_vocab
from mtmoe.paths import resolve


@dataclass
class TrainingData:
    vocab: Vocab
    train: TokenizedCorpus
    valid: TokenizedCorpus
    directions: list[Direction]
    probs: np.ndarray  # [num_directions]


def prepare_training_data(cfg: DataConfig, is_first: bool = True,
                          barrier: Callable[[], None] = lambda: None) -> TrainingData:
    directions = parse_directions(cfg.directions, cfg.langs, cfg.pivot)
    cache_dir = resolve(cfg.cache_dir)

    def build() -> TrainingData:
        train_ds = load_corpus(cfg.corpus_dir, cfg.train_prefix, cfg.langs, cfg.format, cfg.max_train_lines)
        valid_ds = load_corpus(cfg.corpus_dir, cfg.valid_prefix, cfg.langs, cfg.format, cfg.val_lines)
        vocab = get_or_train_vocab({lang: train_ds[lang] for lang in cfg.langs}, cache_dir,
                                   cfg.vocab_size, cfg.spm_model_type, cfg.spm_sample_lines)
        train = tokenize(train_ds, vocab, cfg.langs, cache_dir)
        valid = tokenize(valid_ds, vocab, cfg.langs, cache_dir)
        # Multi-way parallel corpus: every direction has len(train) examples.
        probs = temperature_probs([len(train)] * len(directions), cfg.temperature)
        return TrainingData(vocab, train, valid, directions, probs)

    if is_first:
        data = build()
        barrier()
    else:
        barrier()
        data = build()
    return data
