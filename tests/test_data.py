"""Corpus validation, vocabulary with language tags, directions, sampling and batching."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from mtmoe.data.batching import BatchStream, collate, pack_by_tokens
from mtmoe.data.corpus import load_corpus, read_lines
from mtmoe.errors import ConfigError, CorpusError
from mtmoe.data.sampling import parse_directions, temperature_probs
from mtmoe.data.tokenized import tokenize
from mtmoe.data.vocab import BOS_ID, EOS_ID, PAD_ID, Vocab, get_or_train_vocab, lang_tag


def write(path, text: bytes):
    path.write_bytes(text)
    return path


def test_bundled_corpus_loads_aligned():
    ds = load_corpus("data/multi30k", "val", ["en", "de", "fr", "cs"])
    assert list(ds) == ["en", "de", "fr", "cs"] and all(len(lines) == 1014 for lines in ds.values())
    assert all(line == line.strip() and line for line in ds["de"][:50])


def test_misaligned_files_name_the_file(tmp_path):
    write(tmp_path / "c.en", b"a\nb\nc\n")
    write(tmp_path / "c.de", b"x\ny\n")
    with pytest.raises(CorpusError, match=r"c\.de: misaligned corpus: 2 lines, but .*c\.en has 3"):
        load_corpus(str(tmp_path), "c", ["en", "de"])


def test_empty_line_names_file_and_line(tmp_path):
    write(tmp_path / "c.en", b"a\n  \t\nc\n")
    with pytest.raises(CorpusError, match=r"c\.en:2: empty line"):
        read_lines(tmp_path / "c.en")


def test_invalid_utf8_names_file_and_line(tmp_path):
    write(tmp_path / "c.en", b"ok\nbad \xff byte\n")
    with pytest.raises(CorpusError, match=r"c\.en:2: invalid UTF-8"):
        read_lines(tmp_path / "c.en")


def test_gzip_bom_crlf_and_trailing_whitespace(tmp_path):
    with gzip.open(tmp_path / "c.en.gz", "wb") as f:
        f.write(b"\xef\xbb\xbfHello \t\r\nWorld\r\n")
    assert read_lines(tmp_path / "c.en.gz") == ["Hello", "World"]


def test_training_corpus_check_refuses_what_loading_refuses_without_warning(tmp_path, caplog):
    """mtmoe-train's check before torch (`check_training_corpus`): the training and validation text
    get the loader's checks, quietly (the trainer's own load warns, into train.log)."""
    from mtmoe.config import DataConfig
    from mtmoe.data.prepare import check_training_corpus

    for prefix in ("train", "val"):
        write(tmp_path / f"{prefix}.en", b"\xef\xbb\xbfa\r\nb\r\n")
        write(tmp_path / f"{prefix}.de", b"x\ny\n")
    cfg = DataConfig(corpus_dir=str(tmp_path), langs=["en", "de"])
    with caplog.at_level("WARNING", logger="mtmoe"):
        check_training_corpus(cfg)
    assert caplog.records == []
    write(tmp_path / "val.de", b"x\n")
    with pytest.raises(CorpusError, match=r"val\.de: misaligned corpus: 1 lines, but .*val\.en has 2"):
        check_training_corpus(cfg)


def test_language_without_data(tmp_path):
    write(tmp_path / "c.en", b"a\n")
    with pytest.raises(CorpusError, match=r"c\.xx\[\.gz\]: no such file \(language 'xx' has no data\)"):
        load_corpus(str(tmp_path), "c", ["en", "xx"])


def test_jsonl_corpus_through_datasets(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"en": "a cat", "de": "eine Katze"}\n{"en": "a dog ", "de": "ein Hund"}\n')
    ds = load_corpus(str(tmp_path), "c", ["en", "de"], fmt="json")
    assert ds["en"] == ["a cat", "a dog"] and ds["de"][1] == "ein Hund"


def test_csv_cells_are_text(tmp_path):
    """A sentence "NA" (or "null", "nan") is not a missing value, and "12" is not a number."""
    (tmp_path / "c.csv").write_text("id,en,de\n1,NA,Nein\n2,12,zwölf\n3,null,nichts\n", encoding="utf-8")
    ds = load_corpus(str(tmp_path), "c", ["en", "de"], fmt="csv")
    assert ds["en"] == ["NA", "12", "null"] and ds["de"] == ["Nein", "zwölf", "nichts"]


def test_directions_and_temperature():
    assert len(parse_directions("all", ["en", "de", "fr", "cs"])) == 12
    pivot = parse_directions("pivot", ["en", "de", "fr", "cs"], "en")
    assert set(pivot) == {("en", "de"), ("de", "en"), ("en", "fr"), ("fr", "en"), ("en", "cs"), ("cs", "en")}
    assert parse_directions(["en-de", "de-en"], ["en", "de"]) == [("en", "de"), ("de", "en")]
    with pytest.raises(ConfigError, match="unknown language 'xx'"):
        parse_directions("en-xx", ["en", "de"])
    with pytest.raises(ConfigError, match="'en-de' is listed twice"):  # it would take twice the samples
        parse_directions("en-de,de-en,en-de", ["en", "de"])
    p = temperature_probs([100, 1], 1.0)
    assert np.allclose(p, [100 / 101, 1 / 101])
    p5 = temperature_probs([100, 1], 5.0)
    assert np.allclose(p5, np.array([100, 1]) ** 0.2 / (100 ** 0.2 + 1))
    assert np.allclose(temperature_probs([100, 1], 1e9), [0.5, 0.5])


@pytest.fixture(scope="module")
def vocab_and_corpus(corpus, cache_dir):
    ds = load_corpus(str(corpus), "train", ["en", "de", "fr", "cs"])
    vocab = get_or_train_vocab(ds, cache_dir, 300)
    return vocab, tokenize(ds, vocab, list(ds), cache_dir), ds


def test_vocab_tags_round_trip_and_cache(vocab_and_corpus, cache_dir):
    vocab, tok, ds = vocab_and_corpus
    assert vocab.sp.pad_id() == PAD_ID and vocab.sp.bos_id() == BOS_ID and vocab.sp.eos_id() == EOS_ID
    assert sorted(vocab.languages()) == ["cs", "de", "en", "fr"]
    for lang in ("en", "de", "fr", "cs"):
        tid = vocab.tag_id(lang)
        assert vocab.sp.id_to_piece(tid) == lang_tag(lang)
        # a tag (or <mask>) written in the text stays text: only the pipeline inserts the ids
        literal = vocab.encode([f"A dog {lang_tag(lang)} runs <mask> here."])[0]
        assert not set(literal) & vocab.special_ids and {tid, vocab.mask_id} <= vocab.special_ids
        assert vocab.decode([tid, vocab.mask_id, *vocab.encode(["A dog."])[0]]) == "A dog."  # never output
    for lang in ("de", "cs"):
        sentence = ds[lang][3]
        assert vocab.decode(vocab.encode([sentence])[0]) == sentence
        assert vocab.decode(tok.line(lang, 3).tolist()) == sentence
    with pytest.raises(ConfigError, match="unknown language 'xx'"):
        vocab.tag_id("xx")
    # Trained once: the same text and settings give the same cached model file.
    again = get_or_train_vocab(ds, cache_dir, 300)
    assert again.path == vocab.path
    assert [p.name for p in again.path.parent.iterdir()] == ["spm.model"]  # no temporary file left


def test_processes_training_one_vocabulary_at_once_each_rename_their_own_file(tmp_path, monkeypatch):
    """Jobs sharing a cache (or the nodes of a launch with node-local caches) may train the same key
    at once. Each writes its own temporary file: with one shared name, the second rename found the
    file already moved (FileNotFoundError), or moved in a file another process was still writing."""

    from mtmoe.data import vocab as vocab_module

    columns = {"en": ["A dog runs.", "A cat sleeps."] * 20, "de": ["Ein Hund rennt.", "Eine Katze schläft."] * 20}
    replaced = []
    real_replace = os.replace

    def interleaved(src, dst):  # the other process trains and renames in between
        if not replaced:
            replaced.append(src)
            vocab_module.train_vocab(columns, tmp_path, 40)
        real_replace(src, dst)

    monkeypatch.setattr(vocab_module.os, "replace", interleaved)
    path = vocab_module.train_vocab(columns, tmp_path, 40)
    assert [p.name for p in tmp_path.iterdir()] == ["spm.model"] and len(Vocab(path)) > 0


def test_tokenized_cache_is_reused_and_a_damaged_one_is_rebuilt(vocab_and_corpus, tmp_path, monkeypatch, caplog):
    """The second call reads the .npz (no encoding); a truncated file (a crash or full disk of
    another writer) or one of other text is not trusted: the text is tokenized again, with a warning."""
    from mtmoe.data import tokenized as tokenized_module

    vocab, tok, ds = vocab_and_corpus
    first = tokenize(ds, vocab, list(ds), tmp_path)
    (cached,) = (tmp_path / "tokenized").iterdir()
    umask = os.umask(0o022)
    os.umask(umask)
    assert cached.suffix == ".npz" and cached.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any new file
    for lang in ds:
        assert np.array_equal(first.ids[lang], tok.ids[lang]) and np.array_equal(first.offsets[lang], tok.offsets[lang])
        assert vocab.decode(first.line(lang, 7).tolist()) == ds[lang][7]
    real_encode = tokenized_module.encode_column
    with monkeypatch.context() as m:
        m.setattr(tokenized_module, "encode_column", lambda *a: pytest.fail("the cache was not used"))
        again = tokenize(ds, vocab, list(ds), tmp_path)
    assert all(np.array_equal(again.ids[lang], first.ids[lang]) for lang in ds)
    cached.write_bytes(cached.read_bytes()[:1000])
    encoded = []
    monkeypatch.setattr(tokenized_module, "encode_column", lambda *a: encoded.append(1) or real_encode(*a))
    rebuilt = tokenize(ds, vocab, list(ds), tmp_path)
    assert len(encoded) == len(ds) and "unusable tokenized cache" in caplog.text and str(cached) in caplog.text
    assert all(np.array_equal(rebuilt.offsets[lang], first.offsets[lang]) for lang in ds)
    assert [p.name for p in (tmp_path / "tokenized").iterdir()] == [cached.name]  # no temporary file left
    other = {lang: lines[:-1] for lang, lines in ds.items()}  # other text: another file
    assert len(tokenize(other, vocab, list(ds), tmp_path)) == len(first) - 1
    assert len(list((tmp_path / "tokenized").iterdir())) == 2


def test_training_on_text_files_never_imports_datasets(corpus, tmp_path):
    """`datasets` (pandas, pyarrow: ~1.2 s of CPU) is for table corpora only: every rank of every
    launch reads text files, so the trainer's imports and the text path must not pull it in."""
    code = ("import sys\n"
            "import mtmoe.train.trainer\n"
            "from pathlib import Path\n"
            "from mtmoe.data.corpus import load_corpus\n"
            "from mtmoe.data.tokenized import tokenize\n"
            "from mtmoe.data.vocab import get_or_train_vocab\n"
            f"text = load_corpus({str(corpus)!r}, 'train', ['en', 'de'])\n"
            f"tokenize(text, get_or_train_vocab(text, Path({str(tmp_path)!r}), 200), ['en', 'de'], Path({str(tmp_path)!r}))\n"
            "assert 'datasets' not in sys.modules and 'pyarrow' not in sys.modules, 'datasets was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_collate_layout():
    b = collate([np.array([5, 6, 7]), np.array([8])], [np.array([9, 10]), np.array([11, 12, 13])], [4, 4], 64)
    assert b.src.tolist() == [[4, 5, 6, 7, EOS_ID], [4, 8, EOS_ID, PAD_ID, PAD_ID]]
    assert b.tgt_in.tolist() == [[BOS_ID, 9, 10, PAD_ID], [BOS_ID, 11, 12, 13]]
    assert b.tgt_out.tolist() == [[9, 10, EOS_ID, PAD_ID], [11, 12, 13, EOS_ID]]


def test_token_budget_packing():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(3, 40, 500), rng.integers(3, 40, 500)
    order = np.lexsort((src, tgt))
    groups = pack_by_tokens(src[order], tgt[order], 300)
    assert sum(len(g) for g in groups) == 500
    for g in groups:
        assert len(g) * max(src[order][g].max(), tgt[order][g].max()) <= 300 or len(g) == 1


def test_stream_is_deterministic_resumable_and_sharded(vocab_and_corpus):
    vocab, tok, _ = vocab_and_corpus
    dirs = parse_directions("all", tok.langs)
    tags = {lang: vocab.tag_id(lang) for lang in tok.langs}
    probs = temperature_probs([len(tok)] * len(dirs), 5.0)

    def stream(rank=0, world=1):
        return BatchStream.translation(tok, dirs, probs, tags, max_tokens=200, max_len=64, seed=3, rank=rank, world_size=world,
                           chunk_sentences=300)

    full = stream()
    it = iter(full)
    first = [next(it) for _ in range(25)]
    for b in first:
        assert b.src.shape[0] * max(b.src.shape[1], b.tgt_in.shape[1]) <= 200 or b.src.shape[0] == 1
        assert set(b.src[:, 0].tolist()) <= set(tags.values())  # every source starts with a tag
    # Resume after 10 batches: the same continuation.
    resumed = stream()
    probe = iter(resumed)
    for _ in range(10):
        next(probe)
    state = resumed.state_dict()
    fresh = stream()
    fresh.load_state_dict(state)
    cont = iter(fresh)
    for expected in first[10:20]:
        assert next(cont).src.equal(expected.src)
    # Two ranks: disjoint halves of the global order.
    r0, r1 = iter(stream(0, 2)), iter(stream(1, 2))
    assert next(r0).src.equal(first[0].src) and next(r1).src.equal(first[1].src)


def test_a_stream_resumed_by_another_layout_continues_on_every_rank(vocab_and_corpus, caplog):
    """A position saved at world 1 after 5 batches, resumed by 2 ranks: both go on to the next step
    boundary (batch 6) and read through the chunk's end into the next chunk (before, rank 1 read past
    the end of the chunk and raised IndexError)."""
    vocab, tok, _ = vocab_and_corpus
    dirs = parse_directions("all", tok.langs)
    tags = {lang: vocab.tag_id(lang) for lang in tok.langs}
    probs = temperature_probs([len(tok)] * len(dirs), 5.0)

    def stream(rank=0, world=1, **extra):
        return BatchStream.translation(tok, dirs, probs, tags, **{"max_tokens": 200, "max_len": 64, "seed": 3,
                                                                   "rank": rank, "world_size": world,
                                                                   "chunk_sentences": 300, **extra})

    one = stream()
    it = iter(one)
    for _ in range(5):
        next(it)
    state = one.state_dict()
    assert state["batch"] == 5
    ranks = []
    for rank in range(2):
        resumed = stream(rank, 2)
        resumed.load_state_dict(state)
        ranks.append(resumed)
    assert ranks[0].state_dict()["batch"] == 6 and "next step boundary" in caplog.text
    streams = [iter(r) for r in ranks]
    for _ in range(200):  # a few chunks of ~60 batches: into the next chunks on both ranks
        for s in streams:
            next(s)
    assert ranks[0].state_dict()["chunk"] == ranks[1].state_dict()["chunk"] > state["chunk"]


def test_the_schedule_clock_counts_steps_across_layouts(vocab_and_corpus):
    """The multitask schedule's clock is the optimizer steps made, whatever the layout that made
    them: a position saved at 2 batches per step and resumed at 4 goes on from the steps it had
    (before, the global batches so far were divided by the new layout's batches per step: a run of
    1,000 steps on 8 ranks resumed on 4 sampled by the schedule at step ~2,000)."""
    vocab, tok, _ = vocab_and_corpus
    dirs = parse_directions("all", tok.langs)
    tags = {lang: vocab.tag_id(lang) for lang in tok.langs}
    probs = temperature_probs([len(tok)] * len(dirs), 5.0)

    def stream(world):
        return BatchStream.translation(tok, dirs, probs, tags, max_tokens=200, max_len=64, seed=3, rank=0,
                                       world_size=world, chunk_sentences=40)

    two = stream(2)
    it = iter(two)
    for _ in range(40):
        next(it)
    saved = two.state_dict()
    assert saved["chunk"] > 1 and saved["steps_before"] == saved["batches_before"] / 2
    four = stream(4)
    four.load_state_dict(saved)
    it = iter(four)
    while four.state_dict()["chunk"] == saved["chunk"]:
        next(it)
    now = four.state_dict()
    assert now["steps_before"] == pytest.approx(saved["steps_before"]
                                                + (now["batches_before"] - saved["batches_before"]) / 4)


def test_every_layout_reads_the_same_global_batches_without_dropping_any(vocab_and_corpus):
    """3 ranks x 2 micro-batches per step over chunks of ~4 batches: a step spans chunks, and the
    ranks' batches, put in global order ((step x accumulate + micro) x world + rank), are exactly a
    world of one's, every chunk's every batch (before, each chunk dropped its last batches that did
    not fill a whole step, here up to 5 of ~4, and a chunk with fewer batches than a step was an
    error); resuming one rank mid-run at a step boundary continues its own sequence."""
    vocab, tok, _ = vocab_and_corpus
    dirs = parse_directions("all", tok.langs)
    tags = {lang: vocab.tag_id(lang) for lang in tok.langs}
    probs = temperature_probs([len(tok)] * len(dirs), 5.0)

    def stream(rank=0, world=1, accumulate=1):
        return BatchStream.translation(tok, dirs, probs, tags, max_tokens=200, max_len=64, seed=3, rank=rank,
                                       world_size=world, chunk_sentences=20, accumulate=accumulate)

    world, accumulate, steps = 3, 2, 7
    single = iter(stream())
    expected = [next(single).src for _ in range(world * accumulate * steps)]
    ranks = [stream(rank, world, accumulate) for rank in range(world)]
    got = [[next(it).src for _ in range(accumulate * steps)] for it in map(iter, ranks)]
    for g, want in enumerate(expected):
        micro, rank = divmod(g, world)
        assert got[rank][micro].equal(want), g
    one_chunk = stream()._chunk(0, 0)
    assert len(one_chunk) < world * accumulate  # the steps did span chunks
    assert len({r.state_dict()["chunk"] for r in ranks}) == 1 and ranks[0].state_dict()["chunk"] > 2
    middle = stream(1, world, accumulate)
    it = iter(middle)
    for _ in range(accumulate * 3):
        next(it)
    resumed = stream(1, world, accumulate)
    resumed.load_state_dict(middle.state_dict())
    assert [b.src.equal(w) for b, w in zip(iter(resumed), got[1][accumulate * 3:])] == [True] * accumulate * 4


def test_too_long_lines_are_skipped_truncated_or_fatal(vocab_and_corpus):
    """`data.too_long`: skip drops whole multi-way rows over max_len (the stream never draws them),
    truncate keeps every row, fail names the file and line of the first one."""
    from mtmoe.config import DataConfig
    from mtmoe.data.prepare import usable_rows

    _, tok, _ = vocab_and_corpus
    longest = np.max([tok.lengths(lang) for lang in tok.langs], axis=0)
    max_len = int(np.sort(longest)[-5]) + 2  # the 4 longest rows do not fit (ties aside)
    over = np.flatnonzero(longest > max_len - 2)
    assert 1 <= len(over) < 10
    cfg = DataConfig(corpus_dir="somewhere", max_len=max_len, too_long="skip")
    rows = usable_rows(tok, cfg)
    assert len(rows) == len(tok) - len(over) and not set(over) & set(rows.tolist())
    assert len(usable_rows(tok, DataConfig(max_len=max_len, too_long="truncate"))) == len(tok)
    with pytest.raises(CorpusError, match=rf"train\.\w\w:{over[0] + 1}: \d+ tokens, over data.max_len={max_len}"):
        usable_rows(tok, DataConfig(corpus_dir="somewhere", max_len=max_len, too_long="fail"))

    dirs = parse_directions("all", tok.langs)
    stream = BatchStream.translation(tok, dirs, temperature_probs([len(tok)] * len(dirs), 5.0),
                         {lang: 4 for lang in tok.langs}, 400, max_len, 3, chunk_sentences=2000, rows=rows)
    drawn = np.concatenate([lines for _, lines, _ in stream._chunk(0, 0)])
    assert len(drawn) > 1000 and not set(over.tolist()) & set(drawn.tolist())


def test_a_damaged_gzip_corpus_file_is_named(tmp_path):
    """A .gz whose compressed data is damaged (not only truncated) is one CorpusError naming the
    file (before, a bare zlib.error without the path)."""
    path = tmp_path / "train.de.gz"
    data = bytearray(gzip.compress(("".join(f"Zeile {i} mit etwas Text\n" for i in range(2000))).encode()))
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=f"{path}: cannot read"):
        read_lines(path)
