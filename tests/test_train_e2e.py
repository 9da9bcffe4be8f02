"""End to end on a tiny config: train (world of one) -> checkpoint -> resume -> export -> identical
logits -> eval -> translate; a 2-rank `deepspeed` run with ep_size 2; a truncated checkpoint falls back."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from helpers import run_cli, run_deepspeed, tiny_overrides

pytestmark = [pytest.mark.slow]


def log_records(run_dir, kind="train"):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == kind]


def test_training_outputs(trained):
    records = log_records(trained)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r) and r["tokens_per_s"] > 0
        assert r["grad_norm"] > 0 and r["skipped_steps"] == 0  # the mean gradient norm before clipping
        assert set(r["routing"]) == {"enc1", "dec1"}
    assert records[-1]["loss"] < records[0]["loss"]
    results = json.loads((trained / "results.json").read_text())
    assert results["step"] == 12 and len(results["directions"]) == 12
    assert results["target_tokens"] > 12 * 10  # all ranks' target tokens over the run's 12 steps
    assert {"loss", "bleu", "chrf"} <= set(results["directions"]["en-de"])
    assert (trained / "train_curves.png").stat().st_size > 0
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step00000012"
    # train.save_every=0 saves only at the end: step 6 is the snapshot at half the budget (snapshots=2, span 0.5)
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["latest", "step00000006", "step00000012"]
    assert all(json.loads((trained / "checkpoints" / tag / "mtmoe_state.json").read_text())["snapshot"]
               for tag in ("step00000006", "step00000012"))
    assert len(list((trained / "checkpoints" / "step00000012").glob("layer_*_expert_*"))) == 8


def test_resume_continues_the_same_run(trained, tmp_path, corpus, cache_dir):
    """Resuming the step-6 checkpoint and training to 12 reproduces the uninterrupted losses."""
    import shutil

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(trained / "checkpoints" / "step00000006", resumed / "checkpoints" / "step00000006")
    (resumed / "checkpoints" / "latest").write_text("step00000006")
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, resumed, steps=12, **{"train.save_every": 6}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 6" in proc.stderr + proc.stdout
    expected = {r["step"]: r["loss"] for r in log_records(trained)}
    got = {r["step"]: r["loss"] for r in log_records(resumed)}
    assert sorted(got) == [8, 10, 12]
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-4)
    # the token count of steps 1-6 came back with the checkpoint
    assert json.loads((resumed / "results.json").read_text())["target_tokens"] == \
        json.loads((trained / "results.json").read_text())["target_tokens"]


def test_export_averages_the_newest_checkpoints(trained, tmp_path):
    """`average=2`: the exported weights are the element-wise mean of the two checkpoints'; more
    checkpoints than the run kept is one error saying how to keep them."""
    from mtmoe.errors import ExportError
    from mtmoe.export.pipeline import export_run
    from mtmoe.formats.ds_checkpoint import consolidated_state_dict
    from mtmoe.formats.export_format import load_export

    out = export_run(trained, tmp_path / "avg2", routing=None, average=2)
    model, _, config = load_export(out)
    assert config["source"]["averaged"] == ["step00000006", "step00000012"]
    first, last = (consolidated_state_dict(trained / "checkpoints" / t) for t in ("step00000006", "step00000012"))
    exported = model.state_dict()
    assert sorted(exported) == sorted(first)
    for name, value in exported.items():
        assert torch.equal(value, ((first[name].double() + last[name].double()) / 2).float()), name
    assert sum(not torch.equal(first[k], last[k]) for k in first) > 10  # the mean is neither checkpoint
    with pytest.raises(ExportError, match=r"average=3: .* has 2 snapshot\(s\) up to step00000012 .*"
                                          r"train.snapshots=3"):
        export_run(trained, tmp_path / "avg3", routing=None, average=3)
    assert not (tmp_path / "avg3").exists()


def test_export_reload_gives_identical_logits(trained, tmp_path):
    """The export (safetensors, no DeepSpeed) computes exactly what the live DeepSpeed model computes
    after loading the same checkpoint."""
    export = tmp_path / "export"
    proc = run_cli("mtmoe-export", [f"checkpoint={trained}", f"out={export}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors", "routing.json", "spm.model"]
    script = f"""
import sys, torch
torch.set_num_threads(1)  # the trainer below runs with 1 thread: same kernels, same bits
sys.modules['deepspeed'] = None  # importing DeepSpeed would fail: the export must not need it
from mtmoe.formats.export_format import load_export
model, vocab, config = load_export({str(export)!r})
src = torch.tensor([[vocab.tag_id('de')] + vocab.encode(['A dog runs.'])[0] + [3]])
tgt = torch.tensor([[2] + vocab.encode(['Ein Hund'])[0]])
with torch.no_grad():
    logits, _, _ = model(src, tgt)
torch.save({{'src': src, 'tgt': tgt, 'logits': logits}}, {str(tmp_path / 'export_logits.pt')!r})
"""
    proc = run_cli_python(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(tmp_path / "export_logits.pt", weights_only=True)

    # The live model: the trainer rebuilt in this process, resumed from the same checkpoint.
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mtmoe.cli.common import setup
    from mtmoe.paths import CONF_DIR
    from mtmoe.train.trainer import Trainer

    setup()
    overrides = [o for o in json.loads((trained / ".hydra" / "overrides.json").read_text())
                 if not o.startswith("hydra.")] if (trained / ".hydra" / "overrides.json").exists() else None
    if overrides is None:
        overrides = [o for o in OmegaConf.load(trained / ".hydra" / "overrides.yaml") if not o.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    trainer = Trainer(cfg, trained)
    assert trainer.step == 12
    # Consolidation (what export reads) equals the live model's weights, all experts included.
    from mtmoe.formats.ds_checkpoint import consolidated_state_dict, to_plain_name

    consolidated = consolidated_state_dict(trained / "checkpoints" / "step00000012")
    live = {to_plain_name(k): v for k, v in trainer.model.state_dict().items()}
    assert sorted(consolidated) == sorted(live)
    assert all(torch.equal(consolidated[k], live[k]) for k in live)
    trainer.model.eval()
    with torch.no_grad():
        live, _, _ = trainer.model(ref["src"], ref["tgt"])
    assert torch.equal(live, ref["logits"])


def run_cli_python(script: str):
    import subprocess

    from helpers import clean_env

    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=clean_env())


def test_eval_and_translate_cli(trained, tmp_path, corpus):
    export = tmp_path / "export"
    assert run_cli("mtmoe-export", [f"checkpoint={trained}", f"out={export}"]).returncode == 0
    out = tmp_path / "eval.json"
    proc = run_cli("mtmoe-eval", [f"model={export}", f"test={corpus}/test_2016_flickr", "langs=[en,de]", "beam=2",
                                  "limit=5", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["directions"]) == {"en-de", "de-en"}
    assert "BLEU+case.mixed" in report["directions"]["en-de"]["bleu_signature"] or \
        "nrefs:1" in report["directions"]["en-de"]["bleu_signature"]
    assert "en-de" in proc.stdout and (tmp_path / "eval.en-de.hyp").exists()

    # The length penalty picked on the held-out set: the best mean BLEU of the grid, then used on the test.
    proc = run_cli("mtmoe-eval", [f"model={export}", f"test={corpus}/test_2016_flickr", "langs=[en,de]", "beam=2",
                                  "limit=5", f"out={out}", f"tune.on={corpus}/val", "tune.lines=6",
                                  "tune.length_penalties=[0.0,1.0,4.0]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    tuned = report["tuned"]
    assert [(g["beam"], g["length_penalty"]) for g in tuned["grid"]] == [(2, 0.0), (2, 1.0), (2, 4.0)]
    best = max(tuned["grid"], key=lambda g: g["bleu"])
    assert (tuned["beam"], tuned["length_penalty"]) == (best["beam"], best["length_penalty"])
    assert (report["beam"], report["length_penalty"]) == (best["beam"], best["length_penalty"])
    assert "picked on val" in proc.stdout and "<- picked" in proc.stdout
    from mtmoe.eval.run import evaluate_export  # each grid entry is that setting's score on the held-out lines

    for g in (tuned["grid"][0], tuned["grid"][-1]):
        again = evaluate_export(export, f"{corpus}/val", directions=["en-de", "de-en"], beam=2,
                                length_penalty=g["length_penalty"], limit=6)
        assert again["mean"]["bleu"] == g["bleu"]

    lines = "A man is riding a bike.\n\nTwo dogs play in the snow.\n"
    proc = run_cli("mtmoe-translate", [f"model={export}", "src=en", "tgt=de", "beam=2"], stdin=lines)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_lines = proc.stdout.split("\n")
    assert len(out_lines) == 4 and out_lines[-1] == "" and out_lines[1] == ""  # one line out per line in
    proc = run_cli("mtmoe-translate", [f"model={export}", "src=en", "tgt=de", "beam=1", "batch_lines=1"],
                   stdin=lines)  # the blank line is a batch of its own
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_by_one = proc.stdout.split("\n")
    assert len(one_by_one) == 4 and one_by_one[1] == "" and one_by_one[0] and one_by_one[2]

    proc = run_cli("mtmoe-translate", [f"model={export}", "src=en", "tgt=xx"], stdin="hi\n")
    assert proc.returncode == 2 and "tgt='xx': unknown language" in proc.stderr and proc.stdout == ""


@pytest.mark.distributed
def test_two_rank_expert_parallel_run(tmp_path, corpus, cache_dir):
    """`deepspeed --num_gpus 2` with ep_size 2: each rank holds 2 of 4 experts; the checkpoint and
    the export hold all 4. Pre-gated routing (moe.pregate, MoE in every layer) trains under expert
    parallelism and survives export."""
    run_dir = tmp_path / "ep2"
    proc = run_deepspeed("mtmoe.train", tiny_overrides(corpus, cache_dir, run_dir, steps=6, **{
        "moe.ep_size": 2, "moe.every": 1, "moe.pregate": "true"}))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = log_records(run_dir)
    assert records[-1]["step"] == 6
    state = json.loads((run_dir / "checkpoints" / "step00000006" / "mtmoe_state.json").read_text())
    assert state["world_size"] == 2 and state["ep_size"] == 2
    export = tmp_path / "export"
    assert run_cli("mtmoe-export", [f"checkpoint={run_dir}", f"out={export}"]).returncode == 0
    from safetensors.torch import load_file

    weights = load_file(str(export / "model.safetensors"))
    experts = sorted({k.split(".experts.")[1].split(".")[0] for k in weights if ".experts." in k})
    assert experts == ["0", "1", "2", "3"]
    # Experts 0/1 were trained on rank 0 and 2/3 on rank 1: all distinct.
    fc1 = [weights[f"encoder.1.ffn.experts.{e}.fc1.weight"] for e in range(4)]
    assert all(not torch.equal(fc1[i], fc1[j]) for i in range(4) for j in range(i + 1, 4))
    from mtmoe.formats.export_format import load_export

    model, _, config = load_export(export)
    assert config["moe"]["pregate"] is True
    relays = {id(m.relay) for _, m in model.moe_layers()}
    assert len(relays) == 2 and None not in {m.relay for _, m in model.moe_layers()}  # one per stack


def test_truncated_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, corpus, cache_dir):
    """The newest checkpoint, truncated on purpose: export names the file; training warns, resumes
    from the previous checkpoint and reproduces the uninterrupted run from there."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    model_file = broken / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    proc = run_cli("mtmoe-export", [f"checkpoint={broken}", f"out={tmp_path / 'e'}"])
    assert proc.returncode == 2 and "mp_rank_00_model_states.pt: 1000 bytes, the manifest says" in proc.stderr
    assert not (tmp_path / "e").exists()

    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, broken, steps=12, **{"train.save_every": 6}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "skipping checkpoint step00000012" in output and "truncated" in output
    assert "resumed from step 6" in output
    expected = {r["step"]: r["loss"] for r in log_records(trained)}
    got = {r["step"]: r["loss"] for r in log_records(broken)}
    assert sorted(got) == [2, 4, 6, 8, 10, 12]  # the log was cut back to step 6, then continued
    for step in (8, 10, 12):
        assert got[step] == pytest.approx(expected[step], abs=1e-4)

    # Every checkpoint unusable: one clear error naming each.
    for tag in ("step00000006", "step00000012"):
        f = broken / "checkpoints" / tag / "mp_rank_00_model_states.pt"
        f.write_bytes(b"x" + f.read_bytes()[1:])
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, broken, steps=14))
    assert proc.returncode == 2 and "no usable checkpoint" in proc.stderr and "sha256 differs" in proc.stderr
