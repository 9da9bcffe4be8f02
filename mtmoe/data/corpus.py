"""Line-aligned corpora: discovery, strict validation, and the text as `Columns`, one list of
sentences per language.

A corpus is a set of files `{prefix}.{lang}` (optionally `.gz`) whose line i is the same sentence
in every language (Multi30k is multi-way parallel). Text files are read by this module rather than
by `datasets`' text builder so that every problem is reported with its file and line number:
invalid UTF-8, an empty line, or files of different lengths. Other formats (`json`, `parquet`,
`csv`) hold one column per language and go through `datasets.load_dataset`.

`datasets` (with pandas and pyarrow, ~1.2 s of CPU per process) is imported only for those table
formats: a training process on text files (every rank of every launch) never loads it.
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import Sequence

from mtmoe.errors import ConfigError, CorpusError
from mtmoe.paths import resolve

log = logging.getLogger("mtmoe")

Columns = dict[str, list[str]]
"""{language: its sentences}: line-aligned lists of stripped, non-empty sentences, in corpus order."""


def find_language_file(prefix: Path, lang: str) -> Path | None:
    """`{prefix}.{lang}` or `{prefix}.{lang}.gz`, whichever exists."""
    for candidate in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if candidate.is_file():
            return candidate
    return None


def decode_line(chunk: bytes, where: str | Path, number: int) -> str:
    """One line of UTF-8 text (without its newline); CorpusError naming `where`:`number` for a NUL
    byte or invalid UTF-8 (a file, or `<stdin>` for mtmoe-translate)."""
    if b"\0" in chunk:
        raise CorpusError(f"{where}:{number}: NUL byte (binary data, or UTF-16 text?)")
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where}:{number}: invalid UTF-8 ({e.reason} at byte {e.start})") from None


def read_lines(path: Path, warn: bool = True) -> list[str]:
    """Reads a UTF-8 text file (gzip if it ends in .gz): one stripped sentence per line.

    Strips surrounding whitespace (Multi30k has trailing tabs). A UTF-8 BOM and CRLF line endings
    are accepted with a warning naming the file (Windows tools write them; the text is intact).
    Raises CorpusError naming file and line for invalid UTF-8, an empty line, a NUL byte, or a
    carriage return inside a line (old Mac line endings: the file's lines are not what they seem).
    `warn=False` reads without the warnings (a check before the run, which reads the file again)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib: a damaged .gz
        raise CorpusError(f"{path}: cannot read ({e})") from e
    if raw.startswith(b"\xef\xbb\xbf"):
        if warn:
            log.warning("%s: starts with a UTF-8 byte-order mark (ignored)", path)
        raw = raw[3:]
    chunks = raw.split(b"\n")
    if chunks and chunks[-1] == b"":
        chunks.pop()
    lines, crlf = [], 0
    for number, chunk in enumerate(chunks, start=1):
        if chunk.endswith(b"\r"):
            crlf += 1
            chunk = chunk[:-1]
        if b"\r" in chunk:
            raise CorpusError(f"{path}:{number}: carriage return inside the line (old Mac line endings or "
                              f"joined files?): the file's lines would not align")
        text = decode_line(chunk, path, number).strip()
        if not text:
            raise CorpusError(f"{path}:{number}: empty line (every line must hold a sentence)")
        lines.append(text)
    if not lines:
        raise CorpusError(f"{path}: the file is empty")
    if crlf and warn:
        log.warning("%s: %d of %d lines end in CRLF (Windows line endings; the CR is dropped)", path, crlf, len(lines))
    return lines


def check_text_corpus(corpus_dir: str, prefix: str, langs: Sequence[str]) -> None:
    """The checks of `load_corpus` for a text corpus (files there, line-aligned, every line valid
    UTF-8 text), without building a Dataset or warning: mtmoe-train's check of its data before it
    imports torch, so bad data is refused in about a second (the trainer reads the files again)."""
    read_text_columns(resolve(Path(corpus_dir) / prefix), langs, warn=False)


def read_text_columns(prefix: Path, langs: Sequence[str], warn: bool = True) -> Columns:
    """{lang: lines} of `{prefix}.{lang}` for every language; CorpusError naming the file (and line)
    for a missing file, a bad line or files of different lengths."""
    columns: dict[str, list[str]] = {}
    first: tuple[Path, int] | None = None
    for lang in langs:
        path = find_language_file(prefix, lang)
        if path is None:
            raise CorpusError(f"{prefix}.{lang}[.gz]: no such file (language {lang!r} has no data)")
        lines = read_lines(path, warn)
        if first is None:
            first = (path, len(lines))
        elif len(lines) != first[1]:
            raise CorpusError(
                f"{path}: misaligned corpus: {len(lines)} lines, but {first[0]} has {first[1]}")
        columns[lang] = lines
    return columns


def read_table_columns(prefix: Path, langs: Sequence[str], fmt: str) -> Columns:
    """Reads `{prefix}.{fmt}` (json lines, parquet or csv) with one string column per language."""
    import datasets

    path = Path(f"{prefix}.{'jsonl' if fmt == 'json' and Path(f'{prefix}.jsonl').exists() else fmt}")
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    options = {}
    if fmt == "csv":  # every cell is text: pandas would read "NA", "null" or "nan" as missing, "12" as a number
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        options = {"keep_default_na": False, "na_filter": False,
                   "features": datasets.Features({name: datasets.Value("string") for name in header})}
    ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **options)
    missing = [lang for lang in langs if lang not in ds.column_names]
    if missing:
        raise CorpusError(f"{path}: no column for language(s) {missing} (columns: {ds.column_names})")
    columns: Columns = {}
    for lang in langs:
        texts = ds[lang]
        for number, text in enumerate(texts, start=1):
            if not isinstance(text, str) or not text.strip():
                raise CorpusError(f"{path}: row {number}, column {lang!r}: empty or missing sentence")
        columns[lang] = [text.strip() for text in texts]
    return columns


def load_corpus(corpus_dir: str, prefix: str, langs: Sequence[str], fmt: str = "text",
                max_lines: int = 0) -> Columns:
    """The corpus `{corpus_dir}/{prefix}`, one column per language (its first `max_lines` lines when
    that is > 0)."""
    full_prefix = resolve(Path(corpus_dir) / prefix)
    columns = read_text_columns(full_prefix, langs) if fmt == "text" else read_table_columns(full_prefix, langs, fmt)
    if max_lines:
        columns = {lang: lines[:max_lines] for lang, lines in columns.items()}
    return columns


def load_test_set(prefix: str, langs: Sequence[str]) -> Columns:
    """Line-aligned test files `{prefix}.{lang}` (for scoring)."""
    return read_text_columns(resolve(prefix), langs)


def check_prefix(prefix: str | Path, field: str) -> None:
    """ConfigError naming `field` when no file `{prefix}.*` exists: a mistyped corpus prefix is
    refused before any work (a prefix with files, but not of the languages asked for, is left to the
    reader, which says which language is missing)."""
    path = resolve(prefix)
    if not path.parent.is_dir() or not any(name.startswith(f"{path.name}.") for name in os.listdir(path.parent)):
        raise ConfigError(f"{field}={prefix}: no file {path}.<lang>[.gz] (give a corpus prefix such as "
                          f"data/multi30k/val)")


def available_languages(prefix: str, candidates: Sequence[str]) -> list[str]:
    return [lang for lang in candidates if find_language_file(resolve(prefix), lang) is not None]
