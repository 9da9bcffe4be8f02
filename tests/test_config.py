"""Hydra composition of the shipped configs and the generated DeepSpeed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import compose_train
from mtmoe.cli.common import setup
from mtmoe.config import validate
from mtmoe.errors import ConfigError
from mtmoe.train.ds_config import build_deepspeed_config

setup()


def test_default_and_presets_compose_and_validate():
    cfg = compose_train([])
    assert cfg.moe.enabled and cfg.moe.num_experts == 4 and cfg.data.directions == "all"
    validate(cfg, world_size=1)
    main = compose_train(["+experiment=main"])
    assert main.data.directions == "pivot" and main.moe.ep_size == 2 and main.train.max_minutes <= 30
    validate(main, world_size=2)
    gpu = compose_train(["+experiment=main_gpu"])  # scripts/main_job.sh on a machine with GPUs: one rank per GPU
    assert gpu.moe.ep_size == 1 and gpu.train.device == "auto" and gpu.train.bf16 is None
    assert gpu.model.d_model > main.model.d_model and gpu.train.max_tokens > main.train.max_tokens
    assert gpu.train.max_minutes == main.train.max_minutes
    for world in (1, 2, 8):
        validate(gpu, world_size=world)
    assert not compose_train(["moe=dense"]).moe.enabled
    assert compose_train(["moe=top2"]).moe.top_k == 2
    tiny = compose_train(["model=tiny"])
    assert tiny.model.d_model == 32


def test_unknown_key_and_wrong_type_are_rejected():
    with pytest.raises(Exception, match="moe.nonexistent|nonexistent"):
        compose_train(["moe.nonexistent=1"])
    with pytest.raises(Exception, match="num_experts"):
        compose_train(["moe.num_experts=four"])


def test_deepspeed_throughput_timer_never_waits_for_the_device(monkeypatch):
    """DeepSpeed's default throughput timer synchronizes the device at each forward and step from the
    third step on (a whole-device wait, which torch's sync debug mode does not report): mtmoe's
    config turns it off."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils.config import get_timers_config
    from deepspeed.utils.timer import ThroughputTimer

    waits = []
    monkeypatch.setattr(type(get_accelerator()), "synchronize", lambda self, *a: waits.append(1))
    for ds, expected in ((build_deepspeed_config(compose_train([])), 0), ({}, 1)):  # {}: DeepSpeed's default
        waits.clear()
        timer = ThroughputTimer(get_timers_config(ds), batch_size=1)
        for _ in range(4):
            timer.start()
            timer.stop(global_step=True, report_speed=False)
        assert (len(waits) > 0) == bool(expected)


def test_deepspeed_config_from_hydra_with_raw_override():
    cfg = compose_train(["train.zero_stage=2", "train.clip_norm=0.5", "train.accumulate=2",
                         "+deepspeed.zero_optimization.reduce_bucket_size=1000"])
    ds = build_deepspeed_config(cfg, cfg.deepspeed)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}  # merged, not replaced
    assert ds["gradient_clipping"] == 0.5 and ds["gradient_accumulation_steps"] == 2
    assert "optimizer" not in ds  # torch Adam, built by mtmoe
    # Accumulation belongs to mtmoe (loss normalisation and data stream depend on it).
    # So are the keys mtmoe acts on itself: a raw ZeRO stage trained ZeRO-2 with clipping over no
    # gradients and checkpoints saying ZeRO-0; a raw bf16 section made the weights bf16.
    for override, key, field in (
            ("gradient_accumulation_steps=2", "gradient_accumulation_steps", "train.accumulate"),
            ("zero_optimization.stage=2", "zero_optimization.stage", "train.zero_stage"),
            ("bf16.enabled=true", "bf16", "train.bf16"), ("gradient_clipping=1.0", "gradient_clipping", "train.clip_norm"),
            ("optimizer.params.lr=0.1", "optimizer", "train.lr")):
        cfg = compose_train([f"+deepspeed.{override}"])
        with pytest.raises(ConfigError, match=f"deepspeed.{key}: mtmoe sets this from {field}"):
            build_deepspeed_config(cfg, cfg.deepspeed)
    # Offload: DeepSpeed builds CPU-Adam with mtmoe's Adam settings; it needs a ZeRO optimizer.
    cfg = compose_train(["parallel=ez_offload", "train.lr=0.002"])
    validate(cfg, world_size=2)
    ds = build_deepspeed_config(cfg, cfg.deepspeed)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["lr"] == 0.002 and ds["optimizer"]["params"]["adam_w_mode"] is False
    with pytest.raises(ConfigError, match="train.offload_optimizer=cpu needs train.zero_stage 1, 2 or 3"):
        validate(compose_train(["train.offload_optimizer=cpu"]))


def test_zero3_nvme_preset_and_unsupported_combinations():
    cfg = compose_train(["parallel=zero3_nvme"])
    validate(cfg, world_size=2)
    ds = build_deepspeed_config(cfg, cfg.deepspeed, nvme_path="/swap")
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "nvme" == zero["offload_optimizer"]["device"]
    assert zero["offload_param"]["nvme_path"] == "/swap" == zero["offload_optimizer"]["nvme_path"]
    assert ds["optimizer"]["type"] == "Adam" and "aio" in ds
    # Each unsupported combination is one error naming the field, before any process group exists.
    for overrides, message in [
        (["parallel=zero3_nvme", "moe.ep_size=2"], "train.zero_stage=3 with moe.ep_size=2: unsupported"),
        (["parallel=ez", "train.offload_param=nvme"], "train.offload_param=nvme needs train.zero_stage=3"),
        (["parallel=ez", "train.offload_optimizer=nvme"], "train.offload_optimizer=nvme needs train.zero_stage=3"),
        (["parallel=zero3_nvme", "train.offload_param=disk"], "train.offload_param='disk'"),
        (["parallel=zero3_nvme", "init.from_dense=runs/x"], "init.from_dense/init.aggregate/init.from_moe with train.zero_stage=3"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(compose_train(overrides), world_size=2)


def test_runs_sharing_an_nvme_path_swap_in_folders_of_their_own(tmp_path):
    """DeepSpeed clears `<nvme_path>/zero_stage_3/.../rank<N>` at start: two runs given one path
    deleted each other's swap files. Each run swaps in its own folder (the same when resumed)."""
    from mtmoe.train.layout import run_swap_dir

    a, b = (run_swap_dir("/mnt/nvme", tmp_path / run / "nvme_swap") for run in ("a", "b"))
    assert a.parent == b.parent == Path("/mnt/nvme") and a != b
    assert run_swap_dir("/mnt/nvme", tmp_path / "a" / "nvme_swap") == a
    assert run_swap_dir("", tmp_path / "a" / "nvme_swap") == tmp_path / "a" / "nvme_swap"


def test_budget_is_rejected_early():
    cfg = compose_train(["train.max_minutes=0", "train.max_steps=0"])
    with pytest.raises(ConfigError, match="train.max_steps or train.max_minutes"):
        validate(cfg)


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", r"train.lr=-1.0 must be > 0"), ("train.warmup_steps=-5", "train.warmup_steps=-5 must be >= 0"),
    ("train.betas=[0.9]", r"train.betas=\[0.9\] must be two numbers"), ("train.betas=[0.9,1.0]", "in \\[0, 1\\)"),
    ("train.adam_eps=0", "train.adam_eps=0.0 must be > 0"), ("train.weight_decay=-0.1", "weight_decay=-0.1 must be >= 0"),
    ("train.label_smoothing=1.0", r"label_smoothing=1.0 must be in \[0, 1\)"), ("train.clip_norm=-1", "clip_norm=-1.0"),
    ("train.cooldown=1", r"train.cooldown=1.0 must be in \[0, 1\) \(a fraction of the budget\)"),
    # each of these crashed later with a traceback (or in validate itself: a division by n_heads)
    ("model.n_heads=0", "model.n_heads=0 must be >= 1"), ("model.d_ff=0", "model.d_ff=0 must be >= 1"),
    ("model.dropout=1.5", r"model.dropout=1.5 must be in \[0, 1\)"),
    ("model.attention_dropout=-0.1", "model.attention_dropout=-0.1"), ("moe.min_capacity=-1", "moe.min_capacity=-1"),
    ("moe.aux_loss_weight=-1", "moe.aux_loss_weight=-1.0 must be >= 0"),
    ("train.max_minutes=-1", "train.max_minutes=-1.0 must be >= 0"),
    ("data.val_lines=-1", "data.val_lines=-1 must be >= 0"), ("data.max_train_lines=-5", "data.max_train_lines=-5"),
])
def test_optimizer_numbers_are_rejected_before_any_data(override, message):
    """torch's Adam would refuse lr=-1 only after the vocabulary and the model are built, with a traceback."""
    with pytest.raises(ConfigError, match=message):
        validate(compose_train([override]))


@pytest.mark.parametrize("variant", ["dense", "moe_no_rts", "moe_rts", "lowres_moe_rts", "lowres_moe_rts_dae",
                                     "moe_efd"])
def test_sample_efficiency_variants_compose(variant):
    extra = ["init.from_dense=runs/x"] if variant == "moe_efd" else []  # ${hydra:sweep.dir} needs a real run
    cfg = compose_train(["+experiment=sample_efficiency", f"+variant={variant}", *extra])
    validate(cfg, world_size=2)
    assert cfg.launch.ranks == 2 and cfg.train.max_steps in (150, 300)


def test_cooldown_falls_linearly_to_zero_over_the_last_fraction():
    from mtmoe.train.trainer import cooldown_factor

    assert [cooldown_factor(spent, 0.25) for spent in (0.0, 0.75, 0.875, 1.0, 1.1)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert cooldown_factor(0.99, 0.0) == 1.0  # none


def test_snapshots_spread_over_the_end_of_the_budget():
    from mtmoe.train.trainer import snapshot_points

    assert snapshot_points(4, 0.3) == pytest.approx([0.7, 0.8, 0.9, 1.0])
    assert snapshot_points(1, 0.3) == [1.0] and snapshot_points(0, 0.3) == []
    for overrides, message in [
        (["train.snapshots=-1"], "train.snapshots=-1 must be >= 0"),
        (["train.snapshots=3", "train.snapshot_span=1"], r"train.snapshot_span=1.0 must be in \(0, 1\)"),
        (["train.snapshots=3", "train.save_every=-1"], "train.snapshots=3 with train.save_every=-1"),
        # checked here, not by a crash at the first log step or the first long batch
        (["train.log_every=0"], "train.log_every=0 must be >= 1"),
        (["data.max_len=1000"], "data.max_len=1000 exceeds model.max_positions=512"),
        # a sentence of max_len tokens would be a batch over the token budget
        (["train.max_tokens=64"], "train.max_tokens=64 is smaller than data.max_len=128"),
        (["train.valid_every=-5"], r"train.valid_every=-5 must be >= 0"),
        (["train.save_every=-2"], r"train.save_every=-2 must be >= -1"),
        (["init.noise=0.1"], r"init.noise=0.1 only applies to init.from_dense"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(compose_train(overrides))


def test_export_average_and_eval_tuning_are_checked_before_any_work():
    from mtmoe.config import EvalAppConfig, ExportAppConfig, TuneConfig, validate_eval, validate_export

    from mtmoe.config import PruneConfig

    with pytest.raises(ConfigError, match=r"average=0 must be >= 1"):
        validate_export(ExportAppConfig(checkpoint="runs/x", out="e", average=0))
    for prune, message in [(PruneConfig(keep=-1), "prune.keep=-1"), (PruneConfig(keep=0), "prune.keep=0"),
                           (PruneConfig(keep=1.5), r"prune.keep=1.5: give a number"),
                           (PruneConfig(direction="en-de", mass=0), r"prune.mass=0 must be in \(0, 1\]"),
                           (PruneConfig(direction="en-de", mass=1.5), "prune.mass=1.5"),
                           (PruneConfig(keep=0.5, lines=-1), "prune.lines=-1 must be >= 0"),
                           (PruneConfig(keep=0.5, loss_lines=-2), "prune.loss_lines=-2")]:
        with pytest.raises(ConfigError, match=message):
            validate_export(ExportAppConfig(checkpoint="runs/x", out="e", prune=prune))
    for keep in (0.5, 2, 2.0):
        validate_export(ExportAppConfig(checkpoint="runs/x", out="e", prune=PruneConfig(keep=keep)))
    # a setting the chosen way of pruning does not use is refused, not silently ignored
    for prune, message in [
        (PruneConfig(rule="coverage"), r"prune.rule=coverage: not used \(nothing is pruned without prune.keep"),
        (PruneConfig(per_layer=True, loss_lines=50), r"prune.loss_lines=50, prune.per_layer=True: not used"),
        (PruneConfig(mass=0.8), "prune.mass=0.8: not used"),
        (PruneConfig(keep=0.5, mass=0.8), r"prune.mass=0.8: not used \(prune.rule=loss does not use them\)"),
        (PruneConfig(keep=0.5, rule="coverage", per_layer=True), "prune.per_layer=True: not used"),
        (PruneConfig(direction="en-de", rule="global"), r"prune.rule=global: not used \(prune.direction=en-de keeps"),
        (PruneConfig(direction="en-de", loss_lines=5), "prune.loss_lines=5: not used"),
        # one direction: `all`, `pivot` and lists would calibrate every direction, then fail
        (PruneConfig(direction="all"), "prune.direction=all: give one direction like en-de"),
        (PruneConfig(direction="pivot"), "prune.direction=pivot"),
        (PruneConfig(direction="en-de,de-en"), "prune.direction=en-de,de-en"),
        (PruneConfig(direction="en-en"), "prune.direction=en-en"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate_export(ExportAppConfig(checkpoint="runs/x", out="e", prune=prune))
    for prune in (PruneConfig(lines=50, calibration="data/multi30k/test_2016_flickr"),  # routing statistics use them
                  PruneConfig(keep=2, rule="loss", per_layer=True, loss_lines=20),
                  PruneConfig(keep=0.5, rule="global"), PruneConfig(direction="en-de", mass=0.8)):
        validate_export(ExportAppConfig(checkpoint="runs/x", out="e", prune=prune))
    for tune, message in [
        (TuneConfig(on="val", beams=[]), r"tune.beams=\[\]"),
        (TuneConfig(on="val", beams=[0]), "beam=0 must be >= 1"),
        (TuneConfig(on="val", length_penalties=[]), r"tune.length_penalties=\[\]"),
        (TuneConfig(on="val", length_penalties=[1.0, -0.5]), "penalties >= 0"),
        (TuneConfig(on="val", lines=-1), "tune.lines=-1 must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate_eval(EvalAppConfig(model="e", tune=tune))
    validate_eval(EvalAppConfig(model="e", tune=TuneConfig(beams=[])))  # no tune.on: the grid is not used


def test_checkpoint_average_is_the_mean_and_refuses_what_does_not_match():
    import torch

    from mtmoe.errors import ExportError
    from mtmoe.export.average import average_state_dicts

    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([3])}
    b = {"w": torch.tensor([2.0, 4.0]), "steps": torch.tensor([3])}
    c = {"w": torch.tensor([3.0, 9.0]), "steps": torch.tensor([3])}
    mean = average_state_dicts([("a", a), ("b", b), ("c", c)])
    assert torch.equal(mean["w"], torch.tensor([2.0, 5.0])) and mean["w"].dtype == torch.float32
    assert torch.equal(mean["steps"], torch.tensor([3]))
    for other, message in [({"w": torch.zeros(2)}, "their tensors differ .*steps"),
                           ({"w": torch.zeros(3), "steps": torch.tensor([3])}, r"w has shape \[3\] there and \[2\]"),
                           ({"w": torch.zeros(2), "steps": torch.tensor([4])}, r"steps \(not floating point\) differs")]:
        with pytest.raises(ExportError, match=f"cannot average x with a: {message}"):
            average_state_dicts([("a", a), ("x", other)])
