"""Parallel layouts compute the same training run: world 1 (2 micro-batches per step) vs 2 CPU
ranks with data parallelism, expert parallelism, ZeRO-1/2 and CPU optimizer offload, ZeRO-3, and
ZeRO-3 with parameters and optimizer state on NVMe. Same seed,
same global batches, no token dropping (routing is then layout-independent): the per-step losses
and the final parameters (all experts, consolidated from each layout's checkpoint) agree to fp32
tolerance. This is what catches expert gradients scaled by ep_size, wrong loss normalisation under
data parallelism, or a ZeRO partition that loses an expert group."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import nvme_available, require_nvme, run_cli, run_ranks, tiny_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
TOLERANCE = 1e-2
"""Per tensor: |final - reference final| / |reference final - initial| (L2). fp32 rounding differs
between layouts (expert matmuls over differently concatenated tokens, all-to-all), and Adam turns
rounding noise in near-zero gradients into update-sized noise on a few elements; measured ratios are
<= 1e-3. A real layout bug (an expert group not averaged, a lost partition) gives ratios of O(1)."""
LOSS_RTOL = 3e-5
LAYOUTS = {
    # name: (ranks, overrides); `parallel=` picks a conf/parallel/ preset. One 2-rank launch per
    # behaviour: CPU-Adam offload is checked with experts split over the ranks (the harder case).
    "dp2": (2, {}),
    "ep2": (2, {"parallel": "ed"}),
    "ep2_zero1": (2, {"parallel": "ez", "train.zero_stage": 1}),
    "ep2_zero2": (2, {"parallel": "ez"}),
    "ep2_zero2_offload": (2, {"parallel": "ez_offload"}),
    "world1_zero2": (1, {"train.zero_stage": 2, "train.accumulate": 2}),  # the source of a ZeRO world 1 -> 2 resume
    # ZeRO-3: experts partitioned over all ranks like every other parameter (no expert parallelism)
    "dp2_zero3": (2, {"train.zero_stage": 3}),
    "dp2_zero3_nvme": (2, {"parallel": "zero3_nvme"}),
}
NVME_LAYOUTS = {"dp2_zero3_nvme"}


def parity_args(corpus, cache_dir, run_dir, **extra):
    return tiny_overrides(corpus, cache_dir, run_dir, steps=STEPS, **{
        "train.log_every": 1, "train.save_every": STEPS // 2, "train.valid_bleu": "never", "train.warmup_steps": 2,
        "train.lr": 3e-3,
        "moe.capacity_factor": 0, "model.dropout": 0.0, "data.val_lines": 4, **extra})


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("kind") == "train"]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    from mtmoe.formats.ds_checkpoint import consolidated_state_dict

    return consolidated_state_dict(run_dir / "checkpoints" / f"step{STEPS:08d}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    """World of one, 2 micro-batches per step: the global batch of a 2-rank run.
    -> (run dir, losses, final weights, initial weights)."""
    from mtmoe.formats.export_format import model_configs
    from mtmoe.model.seq2seq import build_model

    run_dir = tmp_path_factory.mktemp("parity") / "world1"
    proc = run_cli("mtmoe-train", parity_args(corpus, cache_dir, run_dir, **{"train.accumulate": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    desc = json.loads((run_dir / "model.json").read_text())
    initial = build_model(desc["vocab_size"], *model_configs(desc), seed=1).state_dict()
    return run_dir, losses(run_dir), final_weights(run_dir), initial


def update_ratios(weights: dict, reference) -> dict[str, float]:
    """|weights - reference final| / |reference final - initial| per tensor (L2 norms).

    Key-projection biases are left out: softmax ignores a shift shared by all keys, so their exact
    gradient is 0 and all they receive is rounding noise, which Adam scales up to lr-sized steps."""
    _, _, final, initial = reference
    return {k: ((weights[k] - final[k]).norm() / (final[k] - initial[k]).norm().clamp_min(1e-12)).item()
            for k in final if not k.endswith("k_proj.bias")}


def test_reference_trained(reference):
    """Guards the parity tests: training moved every checked tensor, and the loss fell."""
    run_dir, ref_losses, final, initial = reference
    assert all((final[k] - initial[k]).norm() > 1e-3 for k in update_ratios(final, reference))
    assert ref_losses[-1] < ref_losses[0]
    # A layout bug of the kind the ratio catches: one expert's update halved.
    broken = dict(final)
    key = "encoder.1.ffn.experts.1.fc1.weight"
    broken[key] = initial[key] + 0.5 * (final[key] - initial[key])
    assert update_ratios(broken, reference)[key] > 10 * TOLERANCE


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory, corpus, cache_dir):
    """Runs a layout once per module (the reshard tests reuse the parity runs' checkpoints)."""
    runs = {}

    def run(layout: str) -> Path:
        if layout in NVME_LAYOUTS:
            require_nvme()
        if layout == "dp2_zero3" and nvme_available():
            pytest.skip("ZeRO-3 partitioning is checked by dp2_zero3_nvme (this plain variant runs where NVMe can't)")
        if layout not in runs:
            ranks, extra = LAYOUTS[layout]
            run_dir = tmp_path_factory.mktemp("layout") / layout
            proc = run_ranks(["-m", "mtmoe.train", *parity_args(corpus, cache_dir, run_dir, **extra)], ranks)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            runs[layout] = run_dir
        return runs[layout]

    return run


def assert_matches_reference(run_dir: Path, reference, from_step: int = 1):
    _, ref_losses, ref_weights, _ = reference
    got = losses(run_dir)
    assert len(got) == STEPS
    assert got[from_step - 1:] == pytest.approx(ref_losses[from_step - 1:], rel=LOSS_RTOL)
    weights = final_weights(run_dir)
    assert sorted(weights) == sorted(ref_weights)
    ratios = update_ratios(weights, reference)
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] < TOLERANCE, f"{worst}: differs by {ratios[worst]:.2e} of its update"
    # the end-of-run validation of the layout's model (ZeRO-3: a gathered whole copy) sees those weights
    valid = json.loads((run_dir / "results.json").read_text())["valid_loss"]
    assert valid == pytest.approx(json.loads((reference[0] / "results.json").read_text())["valid_loss"], rel=1e-3)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_world_of_one(layout, reference, layout_run):
    assert_matches_reference(layout_run(layout), reference)


def resume_point(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of `run_dir` as it was right after its mid-run checkpoint."""
    copy = shutil.copytree(run_dir, tmp_path / f"from_{run_dir.name}")
    middle = f"step{STEPS // 2:08d}"
    shutil.rmtree(copy / "checkpoints" / f"step{STEPS:08d}")
    (copy / "checkpoints" / "latest").write_text(middle)
    for name in ("results.json",):
        (copy / name).unlink(missing_ok=True)
    return copy


@pytest.mark.parametrize("source,ranks,target", [
    ("ep2", 1, {"parallel": "none", "train.accumulate": 2}),   # ep 2 -> 1, world 2 -> 1
    ("world1", 2, {"parallel": "ed"}),                        # ep 1 -> 2, world 1 -> 2
    ("world1", 2, {"parallel": "none"}),                      # world 1 -> 2 only
    # ZeRO-1/2: each rank's partitions of the flat fp32 weights and Adam moments are cut anew
    ("ep2_zero2", 1, {"train.zero_stage": 2, "train.accumulate": 2}),  # ep 2 -> 1, world 2 -> 1
    ("ep2_zero1", 2, {"train.zero_stage": 2}),                         # ep 2 -> 1, world 2, ZeRO-1 -> 2
    ("ep2_zero2_offload", 1, {"train.zero_stage": 2, "train.offload_optimizer": "cpu", "train.accumulate": 2}),
    ("world1_zero2", 2, {"parallel": "ez"}),                           # world 1 -> 2, ep 1 -> 2
    # ZeRO-0 <-> ZeRO-1/2: the per-parameter Adam state named by the resuming optimizer
    ("ep2", 2, {"parallel": "ez"}),                                    # ZeRO-0 -> 2, world 2, ep 2
    ("ep2_zero2", 1, {"parallel": "none", "train.accumulate": 2}),     # ZeRO-2 -> 0, world 2 -> 1, ep 2 -> 1
    ("world1", 2, {"parallel": "ez_offload"}),                         # ZeRO-0 -> 2 with CPU Adam, world 1 -> 2
    # the same layout with the optimizer offloaded: CPU Adam keeps other group settings than torch's
    ("ep2_zero2", 2, {"parallel": "ez_offload"}),
    # ZeRO-3: every parameter's slices cut anew for another world size (and, here, other sub-groups)
    # or for the other Adam (NVMe offload -> none)
    ("dp2_zero3_nvme", 1, {"parallel": "zero3_nvme", "train.accumulate": 2,
                           "+deepspeed.zero_optimization.sub_group_size": 4000}),
    ("dp2_zero3_nvme", 2, {"parallel": "zero3_nvme", "train.offload_param": "none", "train.offload_optimizer": "none"}),
])
def test_resume_at_another_layout(source, ranks, target, reference, layout_run, tmp_path, corpus, cache_dir):
    """Resharding with optimizer state: resuming the step-3 checkpoint of one layout at another
    continues the uninterrupted run (losses of steps 4-6 and final weights). Adam restarted from zero
    moments would not: the first steps after the resume would move every weight by about lr."""
    source_dir = reference[0] if source == "world1" else layout_run(source)
    run_dir = resume_point(source_dir, tmp_path)
    args = parity_args(corpus, cache_dir, run_dir, **target)
    proc = run_cli("mtmoe-train", args) if ranks == 1 else run_ranks(["-m", "mtmoe.train", *args], ranks)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert f"resumed from step {STEPS // 2}" in output
    if not (source == "world1" and target.get("parallel") == "none"):
        assert "resharded step00000003: ep_size" in output
    if source == "ep2_zero2" and target.get("parallel") == "ez_offload":
        assert "(ZeRO-2, optimizer offload none -> cpu)" in output
    if source == "dp2_zero3_nvme" and ranks == 2:
        assert "world 2 -> 2 (ZeRO-3, optimizer offload nvme -> none)" in output
    assert not any(p.name.startswith(".partial") for p in (run_dir / "checkpoints").iterdir())
    assert_matches_reference(run_dir, reference, from_step=STEPS // 2 + 1)


def test_nvme_run_resumes_and_exports(reference, layout_run, tmp_path, corpus, cache_dir):
    """ZeRO-3 with parameters and Adam state on NVMe: the step-3 checkpoint resumed in the same
    layout continues the uninterrupted run (DeepSpeed alone restarts from fresh swap files at the
    wrong lr: mtmoe.train.zero3_swap), the swap files are scratch removed at the end, and the
    checkpoint exports (ZeRO-3 consolidation) to the weights of the uninterrupted run."""
    run_dir = resume_point(layout_run("dp2_zero3_nvme"), tmp_path)
    proc = run_ranks(["-m", "mtmoe.train", *parity_args(corpus, cache_dir, run_dir, parallel="zero3_nvme")])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert f"resumed from step {STEPS // 2}" in output
    assert_matches_reference(run_dir, reference, from_step=STEPS // 2 + 1)
    assert not (run_dir / "nvme_swap").exists()
    out = tmp_path / "export"
    proc = run_cli("mtmoe-export", [f"checkpoint={run_dir}", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    exported = load_file(out / "model.safetensors")
    ratios = update_ratios({k: exported[k] for k in reference[2]}, reference)
    assert max(ratios.values()) < TOLERANCE


def test_zero3_validates_a_whole_copy_as_the_partitioned_model(tmp_path, corpus, cache_dir):
    """ZeRO-3 (parameters and Adam on the CPU, world of one): validation of a whole copy gathered one
    parameter at a time (`train.valid_model=whole`, what `auto` picks where it fits) gives the
    partitioned model's losses, greedy translations' BLEU/chrF, per direction, exactly."""
    results = {}
    for choice in ("partitioned", "auto"):
        run_dir = tmp_path / choice
        proc = run_cli("mtmoe-train", parity_args(corpus, cache_dir, run_dir, **{
            "parallel": "zero3_nvme", "train.offload_param": "cpu", "train.offload_optimizer": "cpu",
            "train.valid_model": choice, "train.valid_bleu": "final", "train.max_steps": 2, "train.save_every": -1,
            "data.max_len": 24}))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[choice] = json.loads((run_dir / "results.json").read_text())
    assert "ZeRO-3 validation runs a whole copy of the model on cpu (train.valid_model=auto" in \
        (tmp_path / "auto" / "train.log").read_text()
    assert "valid_bleu" in results["auto"] and len(results["auto"]["directions"]) == 12
    assert results["auto"]["directions"] == results["partitioned"]["directions"]


def test_zero_checkpoint_refuses_another_stage(layout_run, tmp_path, corpus, cache_dir):
    """ZeRO-2's partitions do not resume under ZeRO-3, which partitions every parameter its own way
    (ZeRO-0 <-> 1 <-> 2 convert: test_resume_at_another_layout)."""
    run_dir = resume_point(layout_run("ep2_zero2"), tmp_path)
    proc = run_cli("mtmoe-train", parity_args(corpus, cache_dir, run_dir, **{"train.zero_stage": 3,
                                                                             "train.accumulate": 2}))
    assert proc.returncode == 2
    assert "cannot resume at this layout" in proc.stderr and "written with train.zero_stage=2" in proc.stderr


def test_checkpoints_before_the_offload_was_recorded_say_it_through_their_zero_config(layout_run, tmp_path):
    """Resuming a ZeRO-2 checkpoint with the optimizer offloaded (or no longer) rewrites its group
    settings for the other Adam; a checkpoint whose mtmoe_state.json predates the record tells it by
    its optimizer file's DeepSpeed config."""
    from mtmoe.formats.reshard import saved_layout

    for source, offload in (("ep2_zero2", "none"), ("ep2_zero2_offload", "cpu")):
        tag = shutil.copytree(layout_run(source) / "checkpoints" / f"step{STEPS // 2:08d}", tmp_path / source)
        assert saved_layout(tag)["offload_optimizer"] == offload
        state = json.loads((tag / "mtmoe_state.json").read_text())
        del state["offload_optimizer"]
        (tag / "mtmoe_state.json").write_text(json.dumps(state))
        assert saved_layout(tag)["offload_optimizer"] == offload


def test_a_conversion_that_fails_leaves_nothing_behind(layout_run, tmp_path):
    """A ZeRO-0 checkpoint resumed by an optimizer of another model is refused with the reason, and
    the staging copy made for the conversion is gone."""
    from mtmoe.errors import CheckpointError
    from mtmoe.train.checkpoint import _prepare_layout

    class Engine:  # what _prepare_layout reads of a DeepSpeed engine: the module, the optimizer, the config
        module = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam([{"params": list(module.parameters()), "name": "parameters"}])
        config = {}

        def zero_optimization_stage(self):
            return 0

    tag = shutil.copytree(layout_run("ep2") / "checkpoints" / f"step{STEPS // 2:08d}", tmp_path / "step")
    layout = {"world_size": 2, "ep_size": 2, "zero_stage": 2, "accumulate": 1, "expert_storage": "stacked"}
    with pytest.raises(CheckpointError, match="dense parameters in the checkpoint's optimizer"):
        _prepare_layout(Engine(), tag, layout, (4, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step"]


def test_a_model_without_moe_layers_moves_to_zero2(tmp_path, corpus, cache_dir):
    """A dense model keeps its ZeRO-0 optimizer state in the main file (no expert files): its step-3
    checkpoint of a world of one resumes on 2 ranks with ZeRO-2 and continues the uninterrupted run."""
    dense = {"moe": "dense", "train.accumulate": 2}
    run_dir = tmp_path / "dense"
    proc = run_cli("mtmoe-train", parity_args(corpus, cache_dir, run_dir, **dense))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = resume_point(run_dir, tmp_path)
    proc = run_ranks(["-m", "mtmoe.train", *parity_args(corpus, cache_dir, resumed, moe="dense", **{"train.zero_stage": 2})])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "(ZeRO-0 -> ZeRO-2)" in output and f"resumed from step {STEPS // 2}" in output
    assert losses(resumed)[STEPS // 2:] == pytest.approx(losses(run_dir)[STEPS // 2:], rel=LOSS_RTOL)


def _optimizer_layout_of(zero_tag: Path):
    """The optimizer of a ZeRO-1/2 checkpoint's layout, as the live engine would describe it."""
    from mtmoe.formats.ds_checkpoint import load_zero_optimizer_file
    from mtmoe.formats.optimizer_state import OptimizerLayout

    groups = load_zero_optimizer_file(zero_tag, 0)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    shapes = torch.load(zero_tag / "mp_rank_00_model_states.pt", weights_only=True)["param_shapes"]
    return OptimizerLayout(shapes=[{k: tuple(v) for k, v in g.items()} for g in shapes],
                           experts=[bool(g.get("moe")) for g in groups],
                           settings=[{k: v for k, v in g.items() if k != "params"} for g in groups])


def test_zero0_and_zero2_checkpoints_convert_into_each_other(layout_run, tmp_path):
    """ep2 (ZeRO-0) and ep2_zero2 (ZeRO-2) train the same run (2 ranks, 2 expert-parallel): each
    one's step-3 checkpoint converted to the other's stage gives the other's optimizer files (fp32
    partitions from the model files, Adam moments, steps, paddings, fragment addresses, groups), and
    ZeRO-0 -> 2 -> 0 gives the ZeRO-0 files back bit for bit."""
    from mtmoe.formats.ds_checkpoint import load_zero_optimizer_file
    from mtmoe.formats.reshard import reshard_checkpoint

    tag = f"step{STEPS // 2:08d}"
    zero0, zero2 = layout_run("ep2") / "checkpoints" / tag, layout_run("ep2_zero2") / "checkpoints" / tag
    target = _optimizer_layout_of(zero2)
    close = dict(rtol=1e-5, atol=1e-8)  # the two runs' states agree to fp32 rounding (identical here)

    reshard_checkpoint(zero0, tmp_path / "as_zero2" / tag, 2, 2, 4, 2, new_zero=2, target=target)
    for rank in range(2):
        got = load_zero_optimizer_file(tmp_path / "as_zero2" / tag, rank)["optimizer_state_dict"]
        want = load_zero_optimizer_file(zero2, rank)["optimizer_state_dict"]
        for key in ("group_paddings", "partition_count", "param_alignment_paddings", "param_slice_mappings"):
            assert got[key] == want[key], key
        for a, b in zip(got["single_partition_of_fp32_groups"], want["single_partition_of_fp32_groups"], strict=True):
            torch.testing.assert_close(a, b, **close)
        assert got["base_optimizer_state"]["param_groups"] == want["base_optimizer_state"]["param_groups"]
        for g, entries in want["base_optimizer_state"]["state"].items():
            for key, value in entries.items():
                torch.testing.assert_close(got["base_optimizer_state"]["state"][g][key], value, **close)
    main = torch.load(tmp_path / "as_zero2" / tag / "mp_rank_00_model_states.pt", weights_only=True)
    assert main["param_shapes"] == torch.load(zero2 / "mp_rank_00_model_states.pt", weights_only=True)["param_shapes"]
    assert main["optimizer"] is None

    for source, out in ((zero2, tmp_path / "as_zero0"), (tmp_path / "as_zero2" / tag, tmp_path / "back")):
        if source != zero2:  # the converted tag says what it now is, as a checkpoint of that layout would
            state = json.loads((source / "mtmoe_state.json").read_text())
            (source / "mtmoe_state.json").write_text(json.dumps({**state, "zero_stage": 2}))
        reshard_checkpoint(source, out, 2, 2, 4, 2, new_zero=0, target=target)
        for rank in range(2):
            got = torch.load(out / f"expp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=True)["optimizer"]
            want = torch.load(zero0 / f"expp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=True)["optimizer"]
            assert got["param_groups"] == want["param_groups"]
            assert got["state"].keys() == want["state"].keys()
            for pid, entries in want["state"].items():
                for key, value in entries.items():
                    if out.name == "back":
                        assert torch.equal(got["state"][pid][key], value), (pid, key)
                    else:
                        torch.testing.assert_close(got["state"][pid][key], value, **close)
        assert not list(out.glob("zero_pp_rank_*"))


@pytest.mark.parametrize("world,ep,max_group", [(1, 1, None), (4, 2, None), (4, 4, None), (2, 1, None),
                                                (1, 1, 10_000)])
def test_zero_partitions_reshard_and_back(world, ep, max_group, layout_run):
    """ZeRO-2 partitions of 2 ranks with 2 expert-parallel (ep2_zero2's step-3 checkpoint) cut for
    another layout and back give the files as DeepSpeed wrote them: fp32 partitions, Adam moments,
    paddings and fragment addresses. With a small cap on an expert group's size (DeepSpeed cuts a
    rank's experts into groups of at most 178,956,971 elements, so big models have more expert
    groups at a smaller ep_size) the experts land in several groups there and in one again back."""
    from mtmoe.formats.ds_checkpoint import load_zero_optimizer_file
    from mtmoe.formats.optimizer_state import reshard_zero_partitions

    tag = layout_run("ep2_zero2") / "checkpoints" / f"step{STEPS // 2:08d}"
    files = [load_zero_optimizer_file(tag, rank) for rank in range(2)]
    shapes = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)["param_shapes"]
    there, there_shapes = reshard_zero_partitions(files, shapes, world, ep, old_ep=2,
                                                  **({"max_expert_group_numel": max_group} if max_group else {}))
    assert len(there) == world
    expert_groups = 1 if max_group is None else 4  # 33,536 expert elements per rank at ep 1, cut by 10,000
    assert [sd["optimizer_state_dict"]["partition_count"] for sd in there] == \
        [[world] + [world // ep] * expert_groups] * world
    assert len(there_shapes) == 1 + expert_groups
    back, back_shapes = reshard_zero_partitions(there, there_shapes, 2, 2, old_ep=ep)
    assert [dict(s) for s in back_shapes] == [{k: tuple(v) for k, v in s.items()} for s in shapes]
    for got, want in zip(back, files):
        got, want = got["optimizer_state_dict"], want["optimizer_state_dict"]
        for key in ("group_paddings", "partition_count", "param_alignment_paddings", "param_slice_mappings"):
            assert got[key] == want[key], key
        for a, b in zip(got["single_partition_of_fp32_groups"], want["single_partition_of_fp32_groups"]):
            assert torch.equal(a, b)
        got_state, want_state = got["base_optimizer_state"], want["base_optimizer_state"]
        assert got_state["param_groups"] == want_state["param_groups"]
        for g, entries in want_state["state"].items():
            for key, value in entries.items():
                assert torch.equal(got_state["state"][g][key], value), (g, key)


def test_multirun_sweep_of_distributed_jobs(tmp_path, corpus, cache_dir):
    """`mtmoe-train -m launch.ranks=2 ...`: each sweep job is its own 2-rank `deepspeed` launch
    writing into its own job dir (no in-process teardown of process groups between jobs)."""
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_overrides(corpus, cache_dir, tmp_path / "unused", steps=2) if not a.startswith("hydra.")]
    proc = run_cli("mtmoe-train", ["-m", *args, "launch.ranks=2", "parallel=ed", "moe.use_rts=true,false",
                                   "train.valid_bleu=never", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for job, rts in (("0", True), ("1", False)):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["world_size"] == 2 and results["step"] == 2
        state = json.loads((sweep / job / "checkpoints" / "step00000002" / "mtmoe_state.json").read_text())
        assert state["ep_size"] == 2
        config = (sweep / job / ".hydra" / "config.yaml").read_text()
        assert f"use_rts: {str(rts).lower()}" in config
        # the launched job resolves `${hydra:sweep.dir}` (moe_efd's dense checkpoint) to this sweep
        assert f"dir: {sweep}\n" in (sweep / job / ".hydra" / "hydra.yaml").read_text().split("sweep:", 1)[1]
    # The sweep collector: one table row per job, and the validation-loss plot.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "scripts/collect_sweep.py", str(sweep)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    rows = [line for line in (sweep / "summary.md").read_text().splitlines() if line.startswith("| 0") or
            line.startswith("| 1")]
    assert len(rows) == 2 and (sweep / "valid_loss.png").stat().st_size > 0
    summary = json.loads((sweep / "summary.json").read_text())
    assert [j["steps"] for j in summary] == [2, 2] and all(j["valid_loss"] > 0 for j in summary)


@pytest.mark.parametrize("source", ["ep2", "ep2_zero2"])
def test_resharding_leaves_the_source_checkpoint_intact(source, layout_run, tmp_path):
    """The staging copy links the source tag's files; what it rewrites (optimizer files, the main
    file under ZeRO, mtmoe_state.json) must replace the links, not write through them: the source
    still verifies against its manifest, so it stays a good resume point if the resumed run dies."""
    from mtmoe.formats.integrity import verify
    from mtmoe.formats.reshard import reshard_checkpoint

    tag = shutil.copytree(layout_run(source) / "checkpoints" / f"step{STEPS // 2:08d}", tmp_path / "step")
    before = {p.name: p.read_bytes() for p in tag.iterdir()}
    reshard_checkpoint(tag, tmp_path / "staging", new_world=1, new_ep=1, num_experts=4, num_moe_layers=2)
    assert verify(tag) is None
    assert {p.name: p.read_bytes() for p in tag.iterdir()} == before
    assert "resharded_from" in json.loads((tmp_path / "staging" / "mtmoe_state.json").read_text())
