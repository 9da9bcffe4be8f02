"""Multitask training: mBART noise, task plugins, schedules, the mixed stream, and an end-to-end
translation + denoising run that resumes exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import run_cli, tiny_overrides
from mtmoe.config import ScheduleConfig
from mtmoe.data.batching import BatchStream
from mtmoe.data.corpus import load_corpus
from mtmoe.data.noise import infill_spans, permute_sentences
from mtmoe.data.sampling import parse_directions
from mtmoe.data.schedule import Mixture, auxiliary_share
from mtmoe.data.tasks import build_sources
from mtmoe.data.tokenized import tokenize
from mtmoe.data.vocab import get_or_train_vocab
from mtmoe.errors import ConfigError

MASK = 4


def test_text_infilling_masks_about_the_ratio_in_spans():
    rng = np.random.default_rng(0)
    masked_share, lengths = [], []
    for _ in range(300):
        ids = np.arange(100, 140)
        out = infill_spans(ids, MASK, rng, mask_ratio=0.35, poisson_lambda=3.5)
        kept = out[out != MASK]
        assert np.all(np.diff(kept) > 0)  # the surviving tokens keep their order
        masked_share.append(1 - len(kept) / len(ids))
        lengths.append(len(out))
    assert 0.25 < np.mean(masked_share) < 0.4
    assert np.mean(lengths) < 40 * 0.8  # spans collapse to one <mask> each
    a = infill_spans(np.arange(100, 140), MASK, np.random.default_rng(7))
    b = infill_spans(np.arange(100, 140), MASK, np.random.default_rng(7))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("lam", [0.2, 1.0, 3.5])
def test_infilled_lines_are_at_most_one_longer_and_short_lines_get_masked(lam):
    """L' <= L + 1 (the length batches are packed by) at any span length: one zero-length span
    inserts a mask, anywhere including the end, and further zero draws mask a token (before, each
    inserted one: at lambda 1, 27% of lines came out longer, by up to 10). At a small ratio, short
    lines are masked as often as the ratio says (before, a line under 10 tokens at ratio 0.05 was
    never masked: round(n x ratio) = 0)."""
    rng = np.random.default_rng(1)
    ends = 0
    for n in (1, 2, 3, 5, 12, 40):
        for _ in range(300):
            ids = np.arange(100, 100 + n)
            out = infill_spans(ids, MASK, rng, mask_ratio=0.35, poisson_lambda=lam)
            assert len(out) <= n + 1
            kept = out[out != MASK]
            assert np.all(np.diff(kept) > 0) and set(kept.tolist()) <= set(ids.tolist())
            ends += int(out[-1] == MASK and kept.size and kept[-1] == ids[-1])
    assert ends > 0  # a mask inserted after the last token
    short = [infill_spans(np.arange(100, 105), MASK, rng, mask_ratio=0.05) for _ in range(2000)]
    changed = np.mean([not np.array_equal(o, np.arange(100, 105)) for o in short])
    assert 0.15 < changed < 0.35  # 5 x 0.05 = 0.25 tokens per line: about a quarter of the lines


def test_a_line_at_the_source_limit_gets_no_inserted_mask():
    """A line as long as a batch keeps of a source (`max_out`) comes out no longer: an inserted mask
    would push its last token out of the batch (collate cuts there); one token shorter, it may grow."""
    rng = np.random.default_rng(2)
    grew = 0
    for _ in range(500):
        ids = np.arange(100, 110)
        at_limit = infill_spans(ids, MASK, rng, mask_ratio=0.1, poisson_lambda=0.2, max_out=10)
        assert len(at_limit) <= 10 and (at_limit == MASK).any()  # still noised: zero draws mask a token
        grew += len(infill_spans(ids, MASK, rng, mask_ratio=0.1, poisson_lambda=0.2, max_out=11)) == 11
    assert grew > 100


def test_sentence_permutation_keeps_every_sentence():
    is_end = np.zeros(50, dtype=bool)
    is_end[9] = True  # token 9 ends a sentence
    ids = np.array([10, 11, 9, 12, 13, 9, 14, 9])
    seen = {tuple(permute_sentences(ids, is_end, np.random.default_rng(s))) for s in range(20)}
    assert len(seen) > 1
    for out in seen:
        assert sorted(out) == sorted(ids.tolist())


def schedule(**kw):
    return ScheduleConfig(**kw)


def test_schedules():
    assert auxiliary_share(schedule(kind="constant", start=0.3), 5000) == 0.3
    lin = schedule(kind="linear", start=0.5, end=0.1, steps=100)
    assert auxiliary_share(lin, 0) == 0.5 and auxiliary_share(lin, 50) == pytest.approx(0.3)
    assert auxiliary_share(lin, 1000) == pytest.approx(0.1)
    step = schedule(kind="stepwise", start=0.5, milestones=[[10, 0.3], [20, 0.1]])
    assert [auxiliary_share(step, s) for s in (0, 10, 19, 25)] == [0.5, 0.3, 0.3, 0.1]
    cur = schedule(kind="curriculum", start=0.8, end=0.1, steps=100)
    values = [auxiliary_share(cur, s) for s in range(0, 101, 10)]
    assert values[0] == pytest.approx(0.8) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))
    mix = Mixture(["translation", "translation", "denoising"], [100, 100, 100], lin, temperature=5.0)
    assert mix.probs(0).tolist() == pytest.approx([0.25, 0.25, 0.5])
    assert mix.probs(100)[2] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def data(corpus, cache_dir):
    ds = load_corpus(str(corpus), "train", ["en", "de", "fr", "cs"])
    vocab = get_or_train_vocab(ds, cache_dir, 300)
    return vocab, tokenize(ds, vocab, list(ds), cache_dir)


def test_denoising_keeps_the_longest_line_within_the_source_limit(data):
    """Through the task: a limit of the longest line's length (data.max_len - 2 when that line just
    fits) never yields a longer denoising source; without the limit, inserted masks make some longer."""
    vocab, tok = data
    dirs = parse_directions("pivot", tok.langs, "en")
    longest = int(np.argmax(tok.lengths("cs")))
    limit = int(tok.lengths("cs")[longest])
    tasks = {"denoising": {"langs": ["cs"], "mask_ratio": 0.1, "poisson_lambda": 0.2}}
    capped, = [s for s in build_sources(tasks, tok, np.arange(len(tok)), dirs, vocab, limit) if s.task == "denoising"]
    free, = [s for s in build_sources(tasks, tok, np.arange(len(tok)), dirs, vocab) if s.task == "denoising"]
    rng = np.random.default_rng(0)
    assert max(len(capped.make(longest, rng)[0]) for _ in range(200)) <= limit
    assert max(len(free.make(longest, rng)[0]) for _ in range(200)) == limit + 1


def test_mixed_stream_has_both_tasks_respects_line_limits_and_resumes(data):
    vocab, tok = data
    dirs = parse_directions("pivot", tok.langs, "en")
    tasks = {"translation": {"lines": {"cs-en": 50, "en-cs": 50}}, "denoising": {"langs": ["cs"]}}
    sources = build_sources(tasks, tok, np.arange(len(tok)), dirs, vocab)
    assert [s.label for s in sources] == ["en-de", "de-en", "en-fr", "fr-en", "en-cs", "cs-en", "dae-cs"]
    mix = Mixture([s.task for s in sources], [len(s.rows) for s in sources],
                  schedule(kind="linear", start=0.6, end=0.0, steps=40), temperature=5.0)
    tags = {lang: vocab.tag_id(lang) for lang in tok.langs}

    def stream():
        return BatchStream(sources, mix.probs, tags, 200, 64, seed=3, chunk_sentences=300)

    it = iter(stream())
    batches = [next(it) for _ in range(60)]
    labels = [sources[k].label for b in batches for k in b.source_ids.tolist()]
    assert labels.count("dae-cs") > 0.2 * len(labels)
    dae = [(b.src[i], b.tgt_out[i]) for b in batches for i, k in enumerate(b.source_ids.tolist())
           if sources[k].label == "dae-cs"]
    assert all(int(src[0]) == tags["cs"] for src, _ in dae)  # asked for cs: reconstruct the sentence
    assert sum(int((src == vocab.mask_id).sum()) for src, _ in dae) > len(dae)
    # cs<->en draw only from the first 50 lines (line ids are not in the batch: check the sources)
    assert len(sources[4].rows) == 50 and len(sources[6].rows) == len(tok)

    # Resume: the stream's state (incl. the schedule clock) restores the same continuation.
    probe = stream()
    p = iter(probe)
    for _ in range(25):
        next(p)
    fresh = stream()
    fresh.load_state_dict(json.loads(json.dumps(probe.state_dict())))
    cont = iter(fresh)
    for expected in batches[25:40]:
        got = next(cont)
        assert got.src.equal(expected.src) and got.tgt_out.equal(expected.tgt_out)
    # The schedule's clock is the optimizer steps before a chunk: at step 0 denoising has 60% of
    # the examples, at step 40 (the end of the linear schedule) none.
    s = stream()
    start = np.concatenate([k for k, _, _ in s._chunk(0, steps_before=0)])
    end = np.concatenate([k for k, _, _ in s._chunk(5, steps_before=40)])
    assert 0.5 < (start == 6).mean() < 0.7 and (end == 6).sum() == 0


def test_task_config_errors_name_the_field(data):
    vocab, tok = data
    dirs = parse_directions("pivot", tok.langs, "en")
    with pytest.raises(ConfigError, match=r"tasks.denoising: unknown parameter\(s\) \['mask'\]"):
        build_sources({"denoising": {"mask": 0.3}}, tok, np.arange(len(tok)), dirs, vocab)
    with pytest.raises(ConfigError, match="tasks.paraphrase: unknown task"):
        build_sources({"paraphrase": {}}, tok, np.arange(len(tok)), dirs, vocab)
    with pytest.raises(ConfigError, match=r"tasks.translation.lines: \['de-fr'\] are not training directions"):
        build_sources({"translation": {"lines": {"de-fr": 5}}}, tok, np.arange(len(tok)), dirs, vocab)
    with pytest.raises(ConfigError, match=r"tasks.denoising.langs: \['xx'\]"):
        build_sources({"denoising": {"langs": ["xx"]}}, tok, np.arange(len(tok)), dirs, vocab)
    with pytest.raises(ConfigError, match="lists a language twice"):
        build_sources({"denoising": {"langs": ["de", "de"]}}, tok, np.arange(len(tok)), dirs, vocab)
    # before: lambda 0 masked nothing (only inserted masks); lines -1000 trained on all but the last
    # 1000 lines; 0 failed after the engine was built, naming no field
    with pytest.raises(ConfigError, match="tasks.denoising: poisson_lambda=0.0 must be > 0"):
        build_sources({"denoising": {"poisson_lambda": 0.0}}, tok, np.arange(len(tok)), dirs, vocab)
    for bad in (-1000, 0, "3k"):
        with pytest.raises(ConfigError, match=f"tasks.translation: lines.en-de={bad!r} must be a whole number >= 1"):
            build_sources({"translation": {"lines": {"en-de": bad}}}, tok, np.arange(len(tok)), dirs, vocab)


@pytest.mark.slow
def test_lowres_multitask_run_resumes_exactly(tmp_path, corpus, cache_dir):
    """`data=multi30k_lowres` on the small corpus: translation + cs denoising under the curriculum;
    resuming the step-4 checkpoint reproduces the uninterrupted losses."""
    args = {"data": "multi30k_lowres", "tasks.translation.lines": "{cs-en:40,en-cs:40}", "schedule.steps": 8,
            "train.log_every": 1, "train.save_every": 4, "train.valid_bleu": "never"}
    run = tmp_path / "run"
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run, steps=8, **args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dae-cs 80.0%" in proc.stdout + proc.stderr  # the curriculum starts denoising-heavy
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step00000004", resumed / "checkpoints" / "step00000004")
    (resumed / "checkpoints" / "latest").write_text("step00000004")
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, resumed, steps=8, **args))
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(d):
        return {r["step"]: r["loss"] for r in map(json.loads, (d / "train_log.jsonl").read_text().splitlines())
                if r.get("kind") == "train"}

    want, got = losses(run), losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    assert all(got[s] == pytest.approx(want[s], abs=1e-5) for s in got)

