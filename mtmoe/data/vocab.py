"""Joint SentencePiece vocabulary with target-language tags.

The model is trained once on the training text of all languages and cached under
`{cache_dir}/spm/{key}/spm.model`, where the key hashes the training text and every setting, so a
changed corpus or vocabulary size gets a new model and an unchanged one is never retrained.

Special ids are fixed so that the model and exports agree without extra metadata:
pad=0, unk=1, bos=2, eos=3, then `<mask>` (denoising) and the language tags `<2xx>` as control
symbols: ids the data pipeline inserts, which text never encodes to (a literal "<mask>" or "<2de>"
in a corpus line or in mtmoe-translate's input stays text) and which decoding drops. Vocabularies
trained before (cache key v2) hold them as user-defined symbols, which text does encode to; they
load as before, and `decode` drops the special ids of both.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from mtmoe.errors import ConfigError
from mtmoe.paths import publish_file

log = logging.getLogger("mtmoe")

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK = "<mask>"
TAG_PIECE = re.compile(r"<2[A-Za-z0-9_-]+>")
"""A language tag's piece (`lang_tag`)."""


def lang_tag(lang: str) -> str:
    """The source-side token that asks for output in `lang`, e.g. `<2de>`."""
    return f"<2{lang}>"


class Vocab:
    """A SentencePiece model plus the language-tag ids."""

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOS_ID or self.sp.bos_id() != BOS_ID:
            raise ValueError(f"{self.path}: not an mtmoe vocabulary (special ids differ)")
        self.special_ids = frozenset(i for i in range(len(self)) if self._is_special(self.sp.id_to_piece(i)))
        """`<mask>` and the language tags: never text (`decode` drops them)."""

    @staticmethod
    def _is_special(piece: str) -> bool:
        return piece == MASK or TAG_PIECE.fullmatch(piece) is not None

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def tag_id(self, lang: str) -> int:
        tid = self.sp.piece_to_id(lang_tag(lang))
        if tid == UNK_ID:
            raise ConfigError(f"unknown language {lang!r}: the vocabulary {self.path} has no tag {lang_tag(lang)} "
                              f"(known: {self.languages()})")
        return tid

    @property
    def mask_id(self) -> int:
        mid = self.sp.piece_to_id(MASK)
        if mid == UNK_ID:
            raise ConfigError(f"{self.path} has no {MASK} token (trained before denoising existed): delete it "
                              f"from the cache to retrain")
        return mid

    def sentence_end_mask(self):
        """[vocab] bool: pieces that end a sentence (`.`, `!`, `?` last), for sentence permutation."""
        import numpy as np

        return np.array([self.sp.id_to_piece(i).rstrip().endswith((".", "!", "?")) for i in range(len(self))])

    def languages(self) -> list[str]:
        """Languages with a tag in this vocabulary."""
        return [piece[2:-1] for piece in map(self.sp.id_to_piece, sorted(self.special_ids)) if piece != MASK]

    def pieces(self) -> list[str]:
        """Every piece, by id: two vocabularies with the same pieces give the same token ids."""
        return [self.sp.id_to_piece(i) for i in range(len(self))]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i > EOS_ID and i not in self.special_ids])


def vocab_key(columns: dict[str, Sequence[str]], vocab_size: int, model_type: str,
              sample_lines: int) -> str:
    h = hashlib.sha256()
    h.update(f"v3|{vocab_size}|{model_type}|{sample_lines}|{sorted(columns)}".encode())
    for lang in sorted(columns):
        for line in columns[lang]:
            h.update(line.encode())
            h.update(b"\n")
    return h.hexdigest()[:16]


def train_vocab(columns: dict[str, Sequence[str]], out_dir: Path, vocab_size: int,
                model_type: str = "unigram", sample_lines: int = 200000, seed: int = 1) -> Path:
    """Trains a joint SentencePiece model on every language's training text (balanced sample)."""
    rng = random.Random(seed)
    per_lang = max(1, sample_lines // max(1, len(columns)))
    sentences: list[str] = []
    for lang in sorted(columns):
        lines = list(columns[lang])
        sentences.extend(rng.sample(lines, per_lang) if len(lines) > per_lang else lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, num_threads=2,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            control_symbols=[MASK] + [lang_tag(lang) for lang in sorted(columns)],
            hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as e:  # e.g. fewer pieces than the text has characters
        raise ConfigError(f"data.vocab_size={vocab_size}: SentencePiece cannot build this vocabulary on the "
                          f"training text ({str(e).strip()})") from None
    # A name of its own: processes that train the same key at once (jobs sharing a cache, the nodes
    # of a launch whose caches are local) each write a whole file and rename it in; the models are
    # identical (training is deterministic), and a reader never sees a half-written one.
    return publish_file(out_dir / "spm.model", lambda f: f.write(model.getvalue()))


def get_or_train_vocab(columns: dict[str, Sequence[str]], cache_dir: Path, vocab_size: int,
                       model_type: str = "unigram", sample_lines: int = 200000) -> Vocab:
    """The cached vocabulary for this text and these settings, training it on first use."""
    key = vocab_key(columns, vocab_size, model_type, sample_lines)
    path = cache_dir / "spm" / key / "spm.model"
    if not path.is_file():
        train_vocab(columns, path.parent, vocab_size, model_type, sample_lines)
    vocab = Vocab(path)
    if len(vocab) < vocab_size:  # SentencePiece stops early on a small text (hard_vocab_limit=false)
        log.warning("data.vocab_size=%d, but the training text yields only %d SentencePiece pieces: the "
                    "vocabulary has %d (a small corpus; a smaller data.vocab_size says so up front)",
                    vocab_size, len(vocab), len(vocab))
    return vocab
