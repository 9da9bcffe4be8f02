"""Crash safety and hostile inputs: kill -9 of a 2-rank run then the same command again continues
exactly; a save interrupted mid-way is ignored; a diverging run stops with a clear message and keeps
its last good checkpoint; every kind of bad input gets one clear error and leaves no output that
looks complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, clean_env, deepspeed_command, export_of, run_cli, run_deepspeed, run_ranks, tiny_overrides
from mtmoe.errors import TrainingDiverged
from mtmoe.train.guard import DivergenceGuard

pytestmark = [pytest.mark.slow]


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("kind") == "train"]
    assert len(steps) == len(set(steps)), f"duplicate steps in the log: {steps}"
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


# -- kill -9 ----------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_kill_9_then_same_command_continues_identically(tmp_path, corpus, cache_dir):
    """A 2-rank (ep_size 2) run is killed with SIGKILL (launcher and ranks) after a checkpoint,
    mid-interval; re-running the same command resumes and reproduces the uninterrupted losses, the
    lr cooldown of the budget's last half included."""
    steps, every = 30, 10  # killed in step 13-19 or 23-29: resumes from step 10 or 20

    def args(run_dir):
        return tiny_overrides(corpus, cache_dir, run_dir, steps=steps, **{
            "moe.ep_size": 2, "train.save_every": every, "train.log_every": 1, "train.valid_bleu": "never",
            "train.cooldown": 0.5})

    reference = tmp_path / "reference"
    proc = run_ranks(["-m", "mtmoe.train", *args(reference)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    expected = train_losses(reference)
    assert sorted(expected) == list(range(1, steps + 1))

    crashed = tmp_path / "crashed"
    cmd = deepspeed_command("mtmoe.train", args(crashed))
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    log_file, latest = crashed / "train_log.jsonl", crashed / "checkpoints" / "latest"
    killed_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and launcher.poll() is None:
        if latest.is_file() and log_file.is_file():
            last_step = max((json.loads(line)["step"] for line in log_file.read_text().splitlines()
                             if line.endswith("}")), default=0)
            if last_step % every >= 3:  # past a checkpoint, before the next one
                os.killpg(launcher.pid, signal.SIGKILL)
                killed_at = last_step
                break
        time.sleep(0.02)
    launcher.wait(timeout=60)
    assert killed_at is not None, "the run ended before it could be killed (make it longer)"
    assert killed_at < steps and not (crashed / "results.json").exists()
    resume_step = int(latest.read_text().strip()[len("step"):])
    assert 0 < resume_step < killed_at

    proc = run_deepspeed("mtmoe.train", args(crashed))  # the same command again
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"resumed from step {resume_step}" in proc.stdout + proc.stderr
    got = train_losses(crashed)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(resume_step + 1, steps + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    # The lr logged after step s is the one step s + 1 uses: the inverse-sqrt schedule (warm-up 5)
    # times the cooldown at the budget spent when step s + 1 starts (s / 30), which falls linearly from
    # 1 at 15 steps done to 0 at 30 (before, it lagged a step: the last step trained at 1/15 of the lr).
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (crashed / "train_log.jsonl").read_text().splitlines())
           if r.get("kind") == "train"}
    for step in (10, 20, 25, 30):
        inverse_sqrt = 1e-3 * min((step + 1) / 5, (5 / (step + 1)) ** 0.5)
        assert lrs[step] == pytest.approx(inverse_sqrt * min(1, (1 - step / steps) / 0.5), rel=1e-4), step
    assert lrs[29] == pytest.approx(1e-3 * (5 / 30) ** 0.5 * (1 / 30) / 0.5, rel=1e-4)  # the last step's lr
    final = json.loads((crashed / "results.json").read_text())
    assert final["valid_loss"] == pytest.approx(json.loads((reference / "results.json").read_text())["valid_loss"],
                                                abs=1e-5)


def test_interrupted_save_is_ignored_and_cleaned(trained, tmp_path, corpus, cache_dir):
    """A save killed before it was sealed leaves `.partial-<tag>/` and an unchanged `latest`: the
    next start resumes from the last sealed checkpoint and removes the debris."""
    run_dir = shutil.copytree(trained, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step00000006", "step00000012"]
    assert json.loads((ckpts / "step00000012" / "manifest.json").read_text())["files"]
    partial = ckpts / ".partial-step00000014"
    shutil.copytree(ckpts / "step00000012", partial)
    (partial / "manifest.json").unlink()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a file")

    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, steps=14, **{
        "train.save_every": 2, "train.valid_bleu": "never"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "resumed from step 12" in output and "a save or a pruning that did not finish" in output
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step00000012", "step00000014"]
    assert (ckpts / "latest").read_text() == "step00000014"


# -- divergence guard -------------------------------------------------------------------------------
def test_divergence_guard_tallies_on_the_device_and_stops_when_settled():
    """The verdicts are tallied on the device; `settle` (where the trainer logs) reads them, counts
    the withheld steps and stops once a run of them reached the limit, even if it ended since."""
    guard = DivergenceGuard(max_consecutive=3)
    for bad in (False, True, True, False):
        guard.record(torch.tensor(bad))
    assert guard.skipped == 0  # nothing read yet
    assert guard.settle(4, "ck/step1") == 2 and guard.skipped == 2 and guard.consecutive == 0
    assert guard.settle(4, "ck/step1") == 0  # nothing new
    guard.record(torch.tensor(True))
    guard.record(torch.tensor(True))
    assert guard.settle(6, "ck/step1") == 2 and guard.consecutive == 2  # a run goes on across records
    guard.record(torch.tensor(True))
    guard.record(torch.tensor(False))  # recovered, but the run reached 3 before
    with pytest.raises(TrainingDiverged, match=r"non-finite for 3 consecutive steps by step 8 .*ck/step1"):
        guard.settle(8, "ck/step1")
    never = DivergenceGuard(0)  # 0: withhold forever, never stop
    for _ in range(10):
        never.record(torch.tensor(True))
    assert never.settle(10, None) == 10 and never.skipped == 10


def test_diverging_run_stops_and_keeps_its_last_checkpoint(tmp_path, corpus, cache_dir):
    """An absurd learning rate blows the weights up after the first update: every later loss is
    NaN, each step is withheld, and after train.max_bad_steps in a row the run stops (exit 3) at the
    log record that sees it, without saving there."""
    run_dir = tmp_path / "diverged"
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, steps=20, **{
        "train.lr": 1e30, "train.warmup_steps": 1, "train.clip_norm": 0, "train.save_every": 1,
        "train.max_bad_steps": 3, "train.log_every": 1}))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "training diverged: the loss was non-finite for 3 consecutive steps by step 4" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpts = run_dir / "checkpoints"
    last = (ckpts / "latest").read_text()
    assert f"the last good checkpoint is {ckpts / last}" in proc.stderr
    assert not (run_dir / "results.json").exists()
    assert not any(p.name.startswith(".partial") for p in ckpts.iterdir())
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"] is None, r["skipped_steps"]) for r in records if r["kind"] == "train"]
    assert train == [(1, False, 0), (2, True, 1), (3, True, 2)]  # withheld steps: no loss to log; step 4 stopped it

    # The message's advice: a lower train.lr, the same command. The resumed run trains at that lr (before,
    # the checkpoint's lr schedule and optimizer groups won) and goes on counting the withheld steps in a
    # row where the checkpoint left them (2 at step 3): with 5 allowed it stops at step 6, not step 8.
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, steps=20, **{
        "train.lr": 1e-3, "train.warmup_steps": 1, "train.clip_norm": 0, "train.save_every": 1,
        "train.max_bad_steps": 5, "train.log_every": 1}))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "optimizer settings from the config, not the checkpoint: lr 1e+30 -> 0.001" in (run_dir / "train.log").read_text()
    assert "non-finite for 5 consecutive steps by step 6" in proc.stderr
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r["lr"] for r in records if r["kind"] == "train" and r["step"] > 3}
    assert sorted(resumed) == [4, 5] and all(0 < lr <= 1e-3 for lr in resumed.values()), resumed


# -- hostile inputs ---------------------------------------------------------------------------------
def copy_corpus(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_clean_failure(proc, message: str, run_dir: Path | None = None, code: int = 2):
    assert proc.returncode == code, (proc.stdout + proc.stderr)[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    if run_dir is not None:  # a refused start leaves no run dir behind (not even Hydra's .hydra/ and train.log)
        assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


@pytest.mark.parametrize("case", ["misaligned", "empty_line", "invalid_utf8", "lone_cr", "unknown_lang",
                                  "impossible_layout", "ep_exceeds_world", "long_lines_fail", "missing_valid_lang"])
def test_bad_training_input(case, tmp_path, corpus, cache_dir):
    data = copy_corpus(corpus, tmp_path / "data")
    extra, message = {}, None
    if case == "misaligned":
        lines = (data / "train.de").read_text().splitlines()
        (data / "train.de").write_text("\n".join(lines[:-3]) + "\n")
        message = "train.de: misaligned corpus: 397 lines, but"
    elif case == "empty_line":
        lines = (data / "train.fr").read_text().splitlines()
        lines[9] = "   "
        (data / "train.fr").write_text("\n".join(lines) + "\n")
        message = "train.fr:10: empty line"
    elif case == "invalid_utf8":
        raw = (data / "train.cs").read_bytes().split(b"\n")
        raw[4] = raw[4] + b" \xff\xfe"
        (data / "train.cs").write_bytes(b"\n".join(raw))
        message = "train.cs:5: invalid UTF-8"
    elif case == "lone_cr":
        raw = (data / "train.en").read_bytes().split(b"\n")
        raw[6] = raw[6].replace(b" ", b"\r", 1)
        (data / "train.en").write_bytes(b"\n".join(raw))
        message = "train.en:7: carriage return inside the line"
    elif case == "unknown_lang":
        extra = {"data.langs": "[en,xx]", "data.directions": "all"}
        message = "train.xx[.gz]: no such file (language 'xx' has no data)"
    elif case == "impossible_layout":
        extra = {"moe.num_experts": 6, "moe.ep_size": 4}
        message = "moe.num_experts=6 is not divisible by moe.ep_size=4"
    elif case == "ep_exceeds_world":
        extra = {"moe.ep_size": 2}
        message = "world size 1 is not divisible by moe.ep_size=2"
    elif case == "long_lines_fail":
        lines = (data / "train.de").read_text().splitlines()
        lines[41] = " ".join(["Hund"] * 300)
        (data / "train.de").write_text("\n".join(lines) + "\n")
        extra = {"data.max_len": 200, "model.max_positions": 256, "data.too_long": "fail"}
        message = "train.de:42:"
    elif case == "missing_valid_lang":
        (data / "val.cs").unlink()
        message = "val.cs[.gz]: no such file"
    run_dir = tmp_path / "run"
    proc = run_cli("mtmoe-train", tiny_overrides(data, cache_dir, run_dir, steps=2, **extra))
    assert_clean_failure(proc, message, run_dir)
    if case == "long_lines_fail":
        assert "over data.max_len=200" in proc.stderr and "1 training lines are too long" in proc.stderr


def test_windows_text_is_accepted_with_a_warning_and_long_lines_are_skipped(tmp_path, corpus, cache_dir):
    """CRLF endings and a BOM are Windows habits, not damage: the run trains on the same text and
    says what it normalised. A line over data.max_len is skipped and counted (data.too_long=skip)."""
    data = copy_corpus(corpus, tmp_path / "data")
    text = (data / "train.de").read_text()
    (data / "train.de").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    lines = (data / "train.fr").read_text().splitlines()
    lines[7] = " ".join(["chien"] * 300)
    (data / "train.fr").write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    proc = run_cli("mtmoe-train", tiny_overrides(data, cache_dir, run_dir, steps=2, **{"data.max_len": 200, "model.max_positions": 256,
                                                                                   "train.valid_bleu": "never"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "train.de: starts with a UTF-8 byte-order mark (ignored)" in output
    assert "train.de: 400 of 400 lines end in CRLF" in output
    assert "skipping 1 of 400 training lines longer than data.max_len=200" in output


def test_a_fresh_start_in_a_run_dir_with_checkpoints_is_refused(trained, tmp_path, corpus, cache_dir):
    """train.resume=false where checkpoints of an earlier run are: one error, nothing touched (before,
    the new run's checkpoints were pruned as older than the earlier run's, right after each save)."""
    run_dir = shutil.copytree(trained, tmp_path / "run")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, steps=4, **{"train.resume": "false"}))
    assert_clean_failure(proc, "train.resume=false, but")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_a_run_killed_before_its_first_checkpoint_starts_a_clean_log(tmp_path, corpus, cache_dir):
    """The log of a run that died before it saved anything (here: two records and a line cut by the
    kill) is not continued: the same command starts over and its log reads as one run (before, the
    old records stayed, steps 1-4 twice, and the cut line stopped the end-of-run plot with a
    JSONDecodeError after results.json was written)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train_log.jsonl").write_text('{"kind": "train", "step": 2, "loss": 9.0}\n'
                                             '{"kind": "train", "step": 4, "loss": 8.0}\n{"kind": "tra')
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, steps=4, **{
        "train.valid_bleu": "never", "train.plot": "true"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    assert all(r["loss"] not in (9.0, 8.0) for r in records if r["kind"] == "train")
    assert (run_dir / "train_curves.png").is_file()


def test_missing_checkpoint_for_export(tmp_path):
    proc = run_cli("mtmoe-export", [f"checkpoint={tmp_path / 'nowhere'}", f"out={tmp_path / 'e'}"])
    assert_clean_failure(proc, "no DeepSpeed checkpoint here")
    assert not (tmp_path / "e").exists()
    # a tag dir names its checkpoint, ZeRO-3's too (it has per-rank model files, no main file)
    from mtmoe.formats.ds_checkpoint import resolve_checkpoint

    tag = tmp_path / "run" / "checkpoints" / "step00000006"
    tag.mkdir(parents=True)
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    assert resolve_checkpoint(tag) == (tmp_path / "run", tag)


def test_bad_eval_input(trained, tmp_path, corpus):
    """Eval: a test set missing a language the user asked for, a language the model does not know,
    a misaligned test file: one clear error each, and no report or hypothesis files."""
    export = export_of(trained, tmp_path / "export")
    test = copy_corpus(corpus, tmp_path / "test")
    (test / "test_2016_flickr.cs").unlink()
    lines = (test / "test_2016_flickr.fr").read_text().splitlines()
    (test / "test_2016_flickr.fr").write_text("\n".join(lines[:-1]) + "\n")
    out = tmp_path / "report" / "eval.json"
    cases = [("langs=[en,cs]", "test_2016_flickr.cs[.gz]: no such file"),
             ("langs=[en,xx]", "langs: ['xx'] unknown to the model"),
             ("langs=[en,fr]", "test_2016_flickr.fr: misaligned corpus: 19 lines, but")]
    for langs, message in cases:
        proc = run_cli("mtmoe-eval", [f"model={export}", f"test={test}/test_2016_flickr", langs, "beam=1",
                                      f"out={out}"])
        assert_clean_failure(proc, message)
        assert not out.parent.exists() or not any(out.parent.iterdir())


def test_save_every_checkpoints_inside_the_snapshot_span_keep_the_snapshots(tmp_path):
    """20 steps saved every 2 with 3 snapshots over the last half (steps 10, 15, 20), 2 checkpoints
    kept: the pruning keeps the newest 2 and every snapshot, and `average=3` takes the snapshots
    (before, the newest 2 + 3 tags stayed, snapshot 10 went, and averaging took 16, 18 and 20)."""
    from mtmoe.formats.ds_checkpoint import newest_tags, tag_for_step
    from mtmoe.train.checkpoint import prune_old_tags
    from mtmoe.train.trainer import snapshot_points

    root = tmp_path / "checkpoints"
    points = [round(p * 20) for p in snapshot_points(3, 0.5)]
    assert points == [10, 15, 20]
    for step in sorted(set(range(2, 21, 2)) | set(points)):  # what the trainer saves, oldest first
        tag = root / tag_for_step(step)
        tag.mkdir(parents=True)
        (tag / "mtmoe_state.json").write_text(json.dumps({"step": step, "snapshot": step in points}))
        prune_old_tags(tmp_path, keep=2, keep_snapshots=3)
    assert sorted(p.name for p in root.iterdir()) == [tag_for_step(s) for s in (10, 15, 18, 20)]
    assert newest_tags(tmp_path, tag_for_step(20), 3) == [tag_for_step(s) for s in (10, 15, 20)]
    assert newest_tags(tmp_path, tag_for_step(18), 2) == [tag_for_step(s) for s in (15, 18)]  # not a snapshot


def test_a_prune_killed_while_deleting_leaves_no_tag_behind(tmp_path, monkeypatch):
    """rmtree deletes in directory order, so a kill could leave a tag without its manifest but with
    mtmoe_state.json: a "pre-manifest" checkpoint to `verify`, listed by `complete_tags`, tried on
    resume. The pruned tag is renamed to a staging name first, which the next start removes."""
    from mtmoe.formats.ds_checkpoint import complete_tags, tag_for_step
    from mtmoe.train import checkpoint

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / tag_for_step(step)).mkdir(parents=True)
        (root / tag_for_step(step) / "mtmoe_state.json").write_text(json.dumps({"step": step}))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)  # killed before deleting anything
    checkpoint.prune_old_tags(tmp_path, keep=2)
    assert complete_tags(tmp_path) == [tag_for_step(4), tag_for_step(6)]
    monkeypatch.undo()
    checkpoint.remove_stale_partials(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [tag_for_step(4), tag_for_step(6)]


def test_a_killed_re_save_of_a_step_keeps_that_steps_checkpoint(tmp_path, monkeypatch):
    """Re-saving an existing step (a resumed run that ends where it began) moves the old checkpoint
    aside until the new one has its name: killed between the two renames, the next start puts the
    old one back; not killed, nothing is left aside."""
    from mtmoe.train import checkpoint

    class Engine:  # writes what DeepSpeed's save_checkpoint would, one file
        def __init__(self, text):
            self.text = text

        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir()
            (Path(root) / tag / "mp_rank_00_model_states.pt").write_text(self.text)

    ckpts = tmp_path / "checkpoints"
    checkpoint.save(Engine("old"), tmp_path, 12, {"step": 12}, keep=2, is_writer=True)
    renames = []

    def killed_at_second_rename(src, dst):  # of a directory (files are written by rename too)
        if Path(src).is_dir():
            renames.append((Path(src).name, Path(dst).name))
            if len(renames) == 2:
                raise KeyboardInterrupt  # the kill
        os.rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(Engine("new"), tmp_path, 12, {"step": 12}, keep=2, is_writer=True)
    monkeypatch.undo()
    assert renames == [("step00000012", ".retired-step00000012"), (".partial-step00000012", "step00000012")]
    checkpoint.remove_stale_partials(tmp_path)  # what the next start does first
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step00000012"]
    assert (ckpts / "step00000012" / "mp_rank_00_model_states.pt").read_text() == "old"
    assert (ckpts / "step00000012" / "manifest.json").is_file()

    checkpoint.save(Engine("new"), tmp_path, 12, {"step": 12}, keep=2, is_writer=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step00000012"]
    assert (ckpts / "step00000012" / "mp_rank_00_model_states.pt").read_text() == "new"
