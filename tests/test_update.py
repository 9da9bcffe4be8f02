"""The step's update without host-device syncs (`mtmoe.train.update`, `mtmoe.train.guard`): a step
with a non-finite loss is withheld on every rank in every layout (weights and optimizer state
unchanged; the run goes on), mtmoe's own code reads no tensor value on the host between log
records, without ZeRO no op of the step (mtmoe's, DeepSpeed's or torch's) is one that waits for a
GPU (value reads, data-dependent shapes: the CPU's view of `set_sync_debug_mode`, which
tests/test_gpu.py applies on a GPU), and mtmoe's clipping equals DeepSpeed's in a world of one (and is the whole model's norm
under expert parallelism). Each case runs `tests/step_probe.py` in a process (or launch) of its
own; DeepSpeed keeps per-process state."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import run_step_probe
from mtmoe.train.update import keep_fused

pytestmark = pytest.mark.slow

SYNC_FREE_READS = {"distributed.py:all_reduce_sum", "moe.py:run_expert_parallel"}
"""The host reads allowed in a step with several ranks: the host group's sum of the batch's token
counts (a CPU tensor, gloo: no device involved) and expert parallelism's split sizes, which the
all-to-all needs on the host (the one sync of expert parallelism, `mtmoe.model.moe`)."""

DEEPSPEED_ZERO_WAITS = {"utils.py:is_invalid_grad_norm",  # ZeRO 1-3: the overflow check of the norm
                        "stage_1_and_2.py:complete_grad_norm_calculation_for_cpu_offload",  # CPU Adam
                        "stage_1_and_2.py:update_offload_overflow_tracker",
                        "stage3.py:complete_grad_norm_calculation_for_cpu_offload",
                        "utils.py:assert_lst_len_same_as_other_ranks", "utils.py:<listcomp>",  # ZeRO-3's fetch plan
                        "utils.py:get_lst_from_rank0",
                        "utils.py:mask_nan_or_inf_with_val_inplace"}  # torch.tensor(-1.0, device=...) per norm
"""Where DeepSpeed's ZeRO optimizers wait for the device in a step (`DeviceWaits` of
tests/step_probe.py: `item` of the gradient norm and of overflow flags, ZeRO-3's parameter
trace checks, a tensor made from a host number on the device): those layouts wait for the device
there, mtmoe cannot move it."""

PER_EXPERT_READS = {"experts.py:forward"}
"""ZeRO-3's experts are one module each (`moe.expert_storage=per_expert`), run one after another on
their rows, whose counts the host needs (one read per MoE layer); ZeRO-3 gathers every module's
parameters through the host anyway."""


def assert_third_step_withheld(report: dict) -> None:
    """Steps 0, 1 and 3 update weights and optimizer state; step 2 changes neither, and is counted."""
    steps = report["steps"]
    assert [s["withheld"] for s in steps] == [0, 0, 1, 0] and report["skipped"] == 1
    assert [s["weights_changed"] for s in steps] == [True, True, False, True]
    assert [s["state_changed"] for s in steps] == [True, True, False, True]
    assert all(math.isfinite(s["loss_sum"]) for s in steps)  # the withheld loss stays out of the log's sums
    assert all(s["settle_host_reads"] >= 1 for s in steps)  # the log's one read: the counter does see reads
    norms = [s["grad_norm"] for s in steps]  # before clipping, for the log
    assert all(math.isfinite(norms[i]) and norms[i] > 0 for i in (0, 1, 3)) and not math.isfinite(norms[2])


@pytest.mark.parametrize("case", ["zero0", "zero0_bf16", "zero0_accumulate2", "zero2", "zero2_cpu_adam", "zero3_cpu_offload"])
def test_a_withheld_step_changes_nothing_and_the_step_reads_nothing(case, tmp_path, corpus, cache_dir):
    overrides, bad = {
        "zero0": ([], ["2:0"]),
        "zero0_bf16": (["train.bf16=true"], ["2:0"]),  # the GPU's default precision
        "zero0_accumulate2": (["train.accumulate=2"], ["2:1"]),  # the second micro-batch voids the step
        "zero2": (["train.zero_stage=2"], ["2:0"]),
        "zero2_cpu_adam": (["train.zero_stage=2", "train.offload_optimizer=cpu"], ["2:0"]),
        "zero3_cpu_offload": (["parallel=zero3_nvme", "train.offload_param=cpu", "train.offload_optimizer=cpu"],
                              ["2:0"]),
    }[case]
    report, = run_step_probe(tmp_path, corpus, cache_dir, overrides, bad, clip_check=case == "zero0")
    assert report["optimizer"] == {"zero0": "Adam", "zero2": "DeepSpeedZeroOptimizer",
                                   "zero3": "DeepSpeedZeroOptimizer_Stage3"}[case[:5]]
    assert_third_step_withheld(report)
    allowed = PER_EXPERT_READS if case.startswith("zero3") else set()
    assert all(set(s["step_host_reads"]) <= allowed for s in report["steps"])
    # The whole step (mtmoe's, DeepSpeed's and torch's code): without ZeRO no op in it waits for the
    # device, from the first step on; under ZeRO only DeepSpeed's own reads, and at least its norm's.
    waits = [{w.split("@")[1] for w in s["device_waits"]} for s in report["steps"]]
    if case.startswith("zero0"):
        assert waits == [set()] * 4
    else:
        assert all("utils.py:is_invalid_grad_norm" in w and w <= DEEPSPEED_ZERO_WAITS for w in waits), waits
    if case == "zero0_accumulate2":
        assert report["steps"][2]["loss_sum"] > 0  # the finite micro-batch's loss is still logged
    else:
        assert report["steps"][2]["loss_sum"] == 0
    if case == "zero0":
        clip = report["clip"]
        assert clip["experts"] > 0 and clip["mtmoe_norm"] > 0.05  # there are experts, and the clip bites
        assert clip["mtmoe_norm"] == pytest.approx(clip["deepspeed_norm"], rel=1e-6)
        assert clip["mtmoe_norm"] == pytest.approx(clip["reference_norm"], rel=1e-6)
        assert clip["max_grad_difference"] <= 1e-6 * clip["max_grad"]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["ed", "ez_offload"])
def test_two_ranks_withhold_a_step_that_went_bad_on_one(layout, tmp_path, corpus, cache_dir):
    """Only rank 1's loss is NaN at step 2: both ranks withhold it. Expert parallelism without ZeRO
    (`ed`): mtmoe's clipping norm is the whole model's (experts' squares summed over the expert-
    parallel group), the same on both ranks."""
    reports = run_step_probe(tmp_path, corpus, cache_dir, [f"parallel={layout}"], ["2:0:1"], ranks=2,
                             clip_check=layout == "ed")
    for report in reports:
        assert report["world"] == 2
        assert_third_step_withheld(report)
        assert all(set(s["step_host_reads"]) <= SYNC_FREE_READS for s in report["steps"])
        waits = {w.split("@")[1] for s in report["steps"] for w in s["device_waits"]}
        assert waits <= (set() if layout == "ed" else DEEPSPEED_ZERO_WAITS)
    if layout == "ed":
        norms = [r["clip"]["mtmoe_norm"] for r in reports]
        assert norms[0] == norms[1]
        assert norms[0] == pytest.approx(reports[0]["clip"]["reference_norm"], rel=1e-6)


HOST_HELPERS = {"all_reduce_sum", "all_reduce_max", "any_rank"}
"""mtmoe's collectives of host numbers (`mtmoe.train.distributed`), which take the host group."""


@pytest.mark.distributed
def test_host_numbers_take_the_host_group_and_nothing_else_does(tmp_path, corpus, cache_dir):
    """On GPUs the default group is NCCL, which takes GPU tensors only, and mtmoe adds a gloo group
    for host numbers. The same arrangement on two CPU ranks (`--separate-host-group`), with expert
    parallelism: in every step the host group carries exactly the sum of the batch's token counts,
    every other collective (the verdict, the clipping norm's expert squares, DeepSpeed's gradient
    reduction, the experts' all-to-all) takes another group, and the bad step is still withheld."""
    reports = run_step_probe(tmp_path, corpus, cache_dir, ["parallel=ed"], ["2:0:1"], ranks=2,
                             separate_host_group=True)
    for report in reports:
        assert_third_step_withheld(report)
        for step in report["steps"]:
            calls = [tuple(c) for c in step["collectives"]]
            assert {site for kind, site in calls if kind == "host"} == {"distributed.py:all_reduce_sum"}
            others = {site for kind, site in calls if kind == "other"}
            assert not {site for site in others if site.split(":")[1] in HOST_HELPERS}
            assert {"distributed.py:any_rank_on_device", "update.py:global_grad_norm",
                    "moe.py:run_expert_parallel"} <= others
            assert any(site.startswith(("engine.py", "utils.py")) for site in others), others  # DeepSpeed's


def test_a_checkpoint_of_a_foreach_optimizer_resumes_fused():
    """Loading the state of a foreach Adam (a checkpoint of an older mtmoe) restores its groups'
    flags; `keep_fused` makes the groups fused again, so the step still takes `found_inf`."""
    old = torch.nn.Parameter(torch.randn(6))
    written = torch.optim.Adam([old], foreach=True)
    old.grad = torch.randn(6)
    written.step()
    param = torch.nn.Parameter(old.detach().clone())
    optimizer = torch.optim.Adam([param], fused=True)
    optimizer.load_state_dict(written.state_dict())
    assert not optimizer.param_groups[0]["fused"]  # what a resume would leave
    assert keep_fused(optimizer) and optimizer.param_groups[0]["fused"]
    before = param.detach().clone()
    param.grad = torch.full((6,), float("nan"))
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert torch.equal(param.detach(), before) and optimizer.state[param]["step"] == 1
    assert not keep_fused(written) and not keep_fused(None)
