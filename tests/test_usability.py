"""A user's first hour (issue 18): typed config that rejects what it does not know, resume that never
damages a run, exports that know what they were trained on, one-line errors instead of tracebacks,
no silent loss of data or intent, and output a user can read (progress, log, plot, help)."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import BIN, ROOT, clean_env, run_cli, tiny_overrides
from mtmoe.cli.common import setup
from mtmoe.config import validate
from mtmoe.errors import ConfigError
from mtmoe.paths import CONF_DIR

pytestmark = [pytest.mark.slow]

setup()

ALL_12 = {f"{s}-{t}" for s in ("en", "de", "fr", "cs") for t in ("en", "de", "fr", "cs") if s != t}


def files_of(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> digest): equal before and after = untouched."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(proc, *messages: str) -> None:
    """Exit code 2, one `mtmoe: error:` line naming what is wrong, no traceback."""
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mtmoe: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for message in messages:
        assert message in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr


@pytest.fixture(scope="module")
def export(exports) -> Path:
    """The tiny run's export (shared by the pytest workers: tests copy it before changing it)."""
    return exports["full"]


def with_training_record(export: Path, out: Path, directions) -> Path:
    """A copy of `export` whose config.json says it was trained on `directions` (None: no record,
    as in exports made before the record existed)."""
    shutil.copytree(export, out)
    config = json.loads((out / "config.json").read_text())
    if directions is None:
        config.pop("training", None)
    else:
        config["training"] = {"directions": list(directions), "tasks": {"translation": list(directions)}}
    (out / "config.json").write_text(json.dumps(config))
    return out


# -- 1. unknown keys --------------------------------------------------------------------------------
def compose_train(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=overrides))


def test_unknown_keys_are_refused_in_typed_sections_only():
    for override, message in [("+train.max_step=5", "train.max_step: unknown key (did you mean train.max_steps?)"),
                              ("++moe.num_expert=8", "moe.num_expert: unknown key (did you mean moe.num_experts?)"),
                              ("+bogus=1", "bogus: unknown key (known: data, model, moe, train")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            validate(compose_train([override]))
    # Free-form places: the raw DeepSpeed section; task parameters are checked by the task plugin.
    validate(compose_train(["+deepspeed.zero_optimization.reduce_bucket_size=1000"]))
    with pytest.raises(ConfigError, match="mask_ration"):
        validate(compose_train(["tasks=translation_dae", "+tasks.denoising.mask_ration=0.3"]))


def test_unknown_key_stops_every_app_before_anything_is_written(tmp_path, corpus, cache_dir, export):
    run_dir = tmp_path / "run"
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, **{"+train.max_step": 5}))
    assert_refused(proc, "train.max_step: unknown key (did you mean train.max_steps?)")
    assert not run_dir.exists()
    proc = run_cli("mtmoe-eval", [f"model={export}", "+serve.prefetc=none"])
    assert_refused(proc, "serve.prefetc: unknown key (did you mean serve.prefetch?)")
    proc = run_cli("mtmoe-export", [f"checkpoint={export}", f"out={tmp_path / 'e'}", "+prune.kep=0.5"])
    assert_refused(proc, "prune.kep: unknown key (did you mean prune.keep?)")
    proc = run_cli("mtmoe-translate", [f"model={export}", "src=en", "tgt=de", "+bem=2"], stdin="A dog.\n")
    assert_refused(proc, "bem: unknown key (did you mean beam?)")
    assert proc.stdout == ""


# -- 2. resume with another model -------------------------------------------------------------------
def test_resume_with_another_model_is_refused_and_the_run_is_untouched(trained, tmp_path, corpus, cache_dir):
    """The `model=tiny` run resumed without `model=tiny`: one line naming the differing fields and the
    run's own overrides; every file of the run (model.json, .hydra/, train.log...) as it was."""
    run_dir = shutil.copytree(trained, tmp_path / "run")
    before = files_of(run_dir)
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, steps=14, model="base"))
    assert_refused(proc, f"{run_dir} holds checkpoints of another model", "model.d_model=256 (the run has 32)",
                   "model.encoder_layers=3 (the run has 2)", "model=tiny", ".hydra/overrides.yaml")
    assert files_of(run_dir) == before


def test_checkpoint_that_does_not_fit_is_a_mismatch_not_damage(trained, tmp_path, corpus, cache_dir):
    """A run whose model.json was overwritten with another model (what a refused resume used to do):
    export and train say the checkpoint does not fit, not that it is corrupt, and change nothing."""
    run_dir = shutil.copytree(trained, tmp_path / "run")
    desc = json.loads((run_dir / "model.json").read_text())
    desc["model"].update(name="base", d_model=64, d_ff=128)
    (run_dir / "model.json").write_text(json.dumps(desc))
    before = files_of(run_dir)
    proc = run_cli("mtmoe-export", [f"checkpoint={run_dir}", f"out={tmp_path / 'e'}"])
    assert_refused(proc, "does not match", "size mismatches, e.g.", "checkpoint [", "model.json")
    assert not (tmp_path / "e").exists()

    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, steps=14, **{
        "model.d_model": 64, "model.d_ff": 128}))
    assert_refused(proc, "does not fit the model of this config", "the checkpoint is intact")
    assert "no usable checkpoint" not in proc.stderr and "corrupt" not in proc.stderr
    assert files_of(run_dir) == before


# -- 3. what the export was trained on ---------------------------------------------------------------
def test_export_records_what_it_was_trained_on_and_eval_defaults_to_it(trained, export, tmp_path, corpus):
    record = json.loads((export / "config.json").read_text())["training"]
    assert set(record["directions"]) == ALL_12 and set(record["tasks"]) == {"translation"}
    assert json.loads((trained / "model.json").read_text())["training"] == record

    two = with_training_record(export, tmp_path / "two", ["en-de", "de-en"])
    test = f"test={corpus}/test_2016_flickr"
    out = tmp_path / "default.json"
    proc = run_cli("mtmoe-eval", [f"model={two}", test, "beam=1", "limit=3", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["directions"]) == {"en-de", "de-en"} and "zero_shot" not in report
    assert "zero-shot" not in proc.stderr

    out = tmp_path / "asked.json"
    proc = run_cli("mtmoe-eval", [f"model={two}", test, "beam=1", "limit=3", "directions=[en-de,fr-de]", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mtmoe: warning: directions: fr-de not among the directions the model was trained on (en-de, de-en)" \
        in proc.stderr
    report = json.loads(out.read_text())
    assert set(report["directions"]) == {"en-de"} and set(report["zero_shot"]["directions"]) == {"fr-de"}
    assert report["mean"]["bleu"] == report["directions"]["en-de"]["bleu"]  # zero-shot kept out of the mean
    assert "zero-shot" in out.with_suffix(".txt").read_text()

    proc = run_cli("mtmoe-translate", [f"model={two}", "src=cs", "tgt=fr", "beam=1"], stdin="Pes.\n")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1, proc.stderr[-3000:]
    assert "src/tgt: cs-fr not among the directions the model was trained on" in proc.stderr
    proc = run_cli("mtmoe-export", [f"checkpoint={two}", f"out={tmp_path / 'pruned'}", "prune.direction=de-fr",
                                    f"prune.calibration={corpus}/val", "prune.lines=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prune.direction: de-fr not among the directions the model was trained on" in proc.stderr

    old = with_training_record(export, tmp_path / "old", None)  # before the record: every direction, silently
    out = tmp_path / "old.json"
    proc = run_cli("mtmoe-eval", [f"model={old}", test, "beam=1", "limit=2", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(out.read_text())["directions"]) == ALL_12 and "zero-shot" not in proc.stderr


# -- 4. one line instead of a traceback --------------------------------------------------------------
def test_tracebacks_become_one_line_errors(export, tmp_path, corpus):
    for args, messages in [
        (["test=data/multi30k/test_2016"], ["data/multi30k/test_2016.<lang>[.gz]: no test file for any language"]),
        (["test=data/multi30k/test_2016", "directions=[en-de]"], ["test_2016.de[.gz]: no such file"]),
        (["beam=0"], ["beam=0 must be >= 1"]),
        (["beam=-2"], ["beam=-2 must be >= 1"]),
    ]:
        proc = run_cli("mtmoe-eval", [f"model={export}", "limit=2", *args])
        assert_refused(proc, *messages)
    assert_refused(run_cli("mtmoe-eval", [f"test={corpus}/test_2016_flickr"]), "model is required: give model=...")
    assert_refused(run_cli("mtmoe-export", [f"checkpoint={export}"]), "out is required: give out=...")
    assert_refused(run_cli("mtmoe-translate", ["src=en", "tgt=de"], stdin="A dog.\n"), "model is required")
    proc = run_cli("mtmoe-translate", [f"model={export}", "src=en", "tgt=de", "beam=0"], stdin="A dog.\n")
    assert_refused(proc, "beam=0 must be >= 1")

    # Invalid UTF-8 on stdin: the lines before it are translated, the error names the line.
    proc = subprocess.run([str(BIN / "mtmoe-translate"), f"model={export}", "src=en", "tgt=de", "beam=1"],
                          input=b"A dog runs.\nA \xff\xfe cat.\nNever read.\n", capture_output=True, cwd=ROOT,
                          env=clean_env(), timeout=300)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    assert_refused(proc, "<stdin>:2: invalid UTF-8")
    assert len(proc.stdout.splitlines()) == 1
    proc = run_cli("mtmoe-translate", [f"model={export}", "src=en", "tgt=de", "threads=-1"], stdin="A dog.\n")
    assert_refused(proc, "threads=-1 must be >= 0")

    # A reader that goes away (`| head -1`): the filter stops quietly (it was a BrokenPipeError traceback).
    translate = shlex.join([str(BIN / "mtmoe-translate"), f"model={export}", "src=en", "tgt=de", "beam=1",
                            "batch_lines=1"])
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {translate} | head -1"], input="A dog runs.\n" * 50,
                          capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 1

    # A direction as a plain string, as mtmoe-train takes it.
    out = tmp_path / "string.json"
    proc = run_cli("mtmoe-eval", [f"model={export}", f"test={corpus}/test_2016_flickr", "directions=en-de", "beam=1",
                                  "limit=2", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(out.read_text())["directions"]) == {"en-de"}


# -- 5. no silent loss of data or intent --------------------------------------------------------------
def test_long_lines_are_reported_with_their_line(export, tmp_path, corpus):
    long_line = " ".join(["dog"] * 300)  # the tiny model takes 128 positions
    proc = run_cli("mtmoe-translate", [f"model={export}", "src=en", "tgt=de", "beam=1"],
                   stdin=f"A dog.\n{long_line}\n\nA cat.\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == 4
    assert "mtmoe: warning: <stdin>:2 (300 tokens): longer than the model's max_positions=128 allows; cut to the " \
           "first 126 tokens" in proc.stderr

    test = shutil.copytree(corpus, tmp_path / "test")
    lines = (test / "test_2016_flickr.en").read_text().splitlines()
    lines[1] = long_line
    (test / "test_2016_flickr.en").write_text("\n".join(lines) + "\n")
    proc = run_cli("mtmoe-eval", [f"model={export}", f"test={test}/test_2016_flickr", "directions=[en-de,en-fr]",
                                  "beam=1", "limit=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "max_positions" in line]
    assert len(warnings) == 1 and f"{test}/test_2016_flickr.en:2 (300 tokens)" in warnings[0]  # once per file


def test_export_never_replaces_silently_and_writes_readable_files(trained, export, tmp_path):
    out = shutil.copytree(export, tmp_path / "out")
    before = files_of(out)
    proc = run_cli("mtmoe-export", [f"checkpoint={trained}", f"out={out}", "quant=int8"])
    assert_refused(proc, f"out={out} already holds an export: give overwrite=true")
    assert files_of(out) == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    proc = run_cli("mtmoe-export", [f"checkpoint={trained}", f"out={tmp_path / 'notes'}", "overwrite=true"])
    assert_refused(proc, "is not an mtmoe export")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"

    proc = run_cli("mtmoe-export", [f"checkpoint={trained}", f"out={out}", "quant=int8", "overwrite=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["spm.model"]  # not 0600


def test_outputs_are_written_under_the_current_directory(export, tmp_path):
    """A relative `out=` is taken from the current directory, even where only the checkout has its
    folder (`data/`): it was resolved like an input and landed in the project root."""
    name = f"data/relative-{tmp_path.name}"
    proc = subprocess.run([str(BIN / "mtmoe-export"), f"checkpoint={export}", f"out={name}", "routing_stats=false"],
                          capture_output=True, text=True, timeout=600, env=clean_env(), cwd=tmp_path)
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / name / "config.json").is_file()
    finally:
        assert not (ROOT / name).exists()


def test_telemetry_without_a_report_and_a_mistyped_calibration_set_are_refused(export, tmp_path):
    """`telemetry=true` has nowhere to go without `out=` (it wrote ./telemetry.telemetry.json), and a
    calibration prefix with no file was a warning after the export, which then had no routing.json."""
    proc = run_cli("mtmoe-eval", [f"model={export}", "telemetry=true"])
    assert_refused(proc, "telemetry=true needs out=FILE.json")
    out = tmp_path / "e"
    proc = run_cli("mtmoe-export", [f"checkpoint={export}", f"out={out}", "prune.calibration=data/multi30k/vall"])
    assert_refused(proc, "prune.calibration=", "multi30k/vall: no file")
    assert not out.exists()


def test_speculative_prefetch_without_a_next_layer_says_so_plainly(export, tmp_path):
    proc = run_cli("mtmoe-translate", [f"model={export}", "src=en", "tgt=de", "beam=1", "serve.experts_per_layer=2",
                                       "serve.prefetch=speculative", f"serve.store_dir={tmp_path}"], stdin="A dog.\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "speculative" in line and "nothing to predict" in line]
    assert len(lines) == 1 and lines[0].startswith("mtmoe: warning: ") and "moe.every=2" in lines[0]
    assert "UserWarning" not in proc.stderr


# -- 6. what a user watches ------------------------------------------------------------------------
def assert_rerun_changes_nothing(run_dir, args, says: str) -> None:
    """The same command again on a finished run: it says `says` and changes no file but train.log."""
    before = files_of(run_dir)
    proc = run_cli("mtmoe-train", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert says in proc.stdout + proc.stderr
    after = files_of(run_dir)
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}


def test_resumed_run_progress_log_and_finished_rerun(trained, tmp_path, corpus, cache_dir):
    """Resuming the finished 12-step run to 15 steps: the bar starts at 12/15 and ends at 15/15, the
    log holds steps 13-15 (the last one although 15 is not a multiple of train.log_every), DeepSpeed's
    op-build chatter stays out; the same command again says the run is finished and changes nothing."""
    run_dir = shutil.copytree(trained, tmp_path / "run")
    args = tiny_overrides(corpus, cache_dir, run_dir, steps=15, **{"train.progress": "true"})
    proc = run_cli("mtmoe-train", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bar = proc.stderr.replace("\r", "\n")
    assert "12/15" in bar and "15/15" in bar
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12, 14, 15]
    assert [r["steps"] for r in train[-2:]] == [2, 1]
    assert [r["step"] for r in records if r["kind"] == "valid"] == [12, 15]
    new_log = (run_dir / "train.log").read_text()[len((trained / "train.log").read_text()):]
    for noise in ("gcc ", "built successfully", "compilers.C"):
        assert noise not in proc.stdout + proc.stderr and noise not in new_log

    # another override that cannot take effect: the run's .hydra files still record the run's own
    rerun = tiny_overrides(corpus, cache_dir, run_dir, steps=15, **{"train.progress": "false"})
    assert_rerun_changes_nothing(run_dir, rerun, f"{run_dir} is finished: it trained to its budget (step 15)")


def test_a_finished_time_budget_run_stays_finished(tmp_path, corpus, cache_dir):
    """A run whose time budget ran out in the save and validation after its last step (each step is
    saved and validated here, so that is where most of its time goes) is finished too: the same
    command again changes nothing (before, the checkpoint's clock, read before the save, said the
    budget was not spent, and the run trained another step and rewrote its results)."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(corpus, cache_dir, run_dir, steps=0, **{
        "train.max_minutes": 0.08, "train.save_every": 1, "train.valid_every": 1, "train.valid_bleu": "never"})
    proc = run_cli("mtmoe-train", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    valid_steps = [r["step"] for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
                   if r["kind"] == "valid"]
    assert valid_steps and len(valid_steps) == len(set(valid_steps))  # the last step is validated once
    assert_rerun_changes_nothing(run_dir, args, f"{run_dir} is finished")


def test_training_curves_with_one_point_are_readable(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from mtmoe.train.observe import plot_training_curves

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"kind": "train", "step": 5, "loss": 5.948123}) + "\n" +
                   json.dumps({"kind": "valid", "step": 5, "valid_loss": 5.9, "valid_bleu": 0.02}) + "\n")
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    plot_training_curves(log, tmp_path / "curves.png")
    (fig,) = saved
    fig.canvas.draw()
    train_line = fig.axes[0].lines[0]
    assert list(train_line.get_xdata()) == [5] and train_line.get_marker() not in (None, "", "None")
    for ax in fig.axes:
        assert ax.yaxis.get_offset_text().get_text() == ""  # no "+5.948" over the ticks
    assert list(fig.axes[1].lines[0].get_ydata()) == [0.02] and not fig.axes[1].texts


def test_training_curves_say_why_the_bleu_panel_is_empty(tmp_path, monkeypatch):
    """A run with `train.valid_bleu=never` (the main job: it scores the export) logs validations
    without BLEU: the panel says so instead of staying blank."""
    from matplotlib.figure import Figure

    from mtmoe.train.observe import plot_training_curves

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"kind": "train", "step": 5, "loss": 5.9}) + "\n" +
                   json.dumps({"kind": "valid", "step": 5, "valid_loss": 5.8}) + "\n")
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    plot_training_curves(log, tmp_path / "curves.png")
    bleu_axis = saved[0].axes[1]
    assert not bleu_axis.lines
    (note,) = bleu_axis.texts
    assert "no validation BLEU" in note.get_text() and "train.valid_bleu" in note.get_text()


def test_training_curves_show_the_gradient_norm(tmp_path, monkeypatch):
    """The third panel: the logged gradient norm on a log scale; a record whose steps were all
    withheld (loss and norm null) leaves a gap, and an older log without norms an empty panel."""
    import math

    from matplotlib.figure import Figure

    from mtmoe.train.observe import plot_training_curves

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"kind": "train", "step": step, "loss": loss, "grad_norm": norm}) + "\n"
                           for step, loss, norm in ((2, 6.1, 5.3), (4, None, None), (6, 5.2, 0.9))))
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    plot_training_curves(log, tmp_path / "curves.png")
    norm_axis = saved[0].axes[2]
    (line,) = norm_axis.lines
    ys = list(line.get_ydata())
    assert ys[0] == 5.3 and math.isnan(ys[1]) and ys[2] == 0.9 and norm_axis.get_yscale() == "log"
    log.write_text(json.dumps({"kind": "train", "step": 2, "loss": 6.1}) + "\n")  # before grad_norm was logged
    plot_training_curves(log, tmp_path / "curves.png")
    assert len(saved[1].axes[2].lines) == 0


def test_vocabulary_smaller_than_asked_is_said(tmp_path, corpus, caplog):
    from mtmoe.data.corpus import read_lines
    from mtmoe.data.vocab import get_or_train_vocab

    columns = {lang: read_lines(corpus / f"train.{lang}") for lang in ("en", "de")}
    with caplog.at_level("WARNING", logger="mtmoe"):
        vocab = get_or_train_vocab(columns, tmp_path, vocab_size=8000)
    assert len(vocab) < 8000
    assert f"data.vocab_size=8000, but the training text yields only {len(vocab)}" in caplog.text


def test_help_says_what_each_app_does():
    for app, what in [("mtmoe-train", "train a multilingual"), ("mtmoe-eval", "score an export"),
                      ("mtmoe-export", "standalone export"), ("mtmoe-translate", "a Unix filter")]:
        proc = run_cli(app, ["--help"])
        assert proc.returncode == 0 and proc.stdout.startswith(f"{app}: ") and what in proc.stdout.splitlines()[0]
        assert "Main options" in proc.stdout and "powered by Hydra" not in proc.stdout
    train_help = run_cli("mtmoe-train", ["--help"]).stdout
    assert "model: base, tiny" in train_help and "tools:" not in train_help
