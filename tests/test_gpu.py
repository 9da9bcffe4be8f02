"""mtmoe on one CUDA GPU: train (fp32 and bf16), resume, export, evaluate and translate there.

Each test is marked `gpu` and skips, saying why, on a machine without CUDA. The apps run as
`python -m mtmoe.<app>` (the GPU machine has no console scripts). The device decision itself and
its refusals are tested on the CPU in test_device.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import require_nvme, run_module, run_step_probe, tiny_overrides

pytestmark = pytest.mark.gpu
ON_THE_GPU_RUNS = pytest.mark.xdist_group("gpu_runs")
"""The tests that read the module's trained runs: one pytest-xdist worker under `--dist loadgroup`
(scripts/gpu_checks.sh), so the runs are trained once while the layouts train on other workers."""

BF16_TOLERANCE = 0.03
"""Largest relative difference between the bf16 and the fp32 run's logged training losses (same
seed, same batches): bf16 rounds activations to 8 significant bits, which moves a tiny model's
loss by well under 1 % in its first steps."""


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def train(corpus, cache_dir, run_dir: Path, steps: int, **extra):
    proc = run_module("mtmoe.train", tiny_overrides(corpus, cache_dir, run_dir, steps=steps, **{
        "train.device": "cuda", "train.save_every": 6, "train.valid_bleu": "final", **extra}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory, corpus, cache_dir) -> dict[str, Path]:
    """A tiny MoE trained 12 steps on the GPU in fp32 and in bf16 (same seed and batches)."""
    root = tmp_path_factory.mktemp("gpu_runs")
    runs = {}
    for name, bf16, cap in (("fp32", "false", 4), ("bf16", "true", 0)):
        train(corpus, cache_dir, root / name, 12, **{"train.bf16": bf16, "train.gpu_memory_gib": cap})
        assert "trains on cuda:0" in (root / name / "train.log").read_text()
        runs[name] = root / name
    return runs


@ON_THE_GPU_RUNS
def test_trains_on_the_gpu_in_fp32_and_bf16(gpu_runs):
    fp32, bf16 = losses(gpu_runs["fp32"]), losses(gpu_runs["bf16"])
    assert sorted(fp32) == sorted(bf16) == list(range(2, 13, 2))
    for step, loss in fp32.items():
        assert abs(bf16[step] - loss) <= BF16_TOLERANCE * loss, (step, loss, bf16[step])
    assert fp32 != bf16  # bf16 really ran (DeepSpeed's engine turns an outer autocast off)
    assert fp32[12] < fp32[2]  # it learns
    results = json.loads((gpu_runs["fp32"] / "results.json").read_text())
    assert results["step"] == 12 and results["target_tokens"] > 0
    # the fp32 run's allocator was capped at 4 GiB (train.gpu_memory_gib); both report their peak
    assert "memory capped at 4.0 GiB" in (gpu_runs["fp32"] / "train.log").read_text()
    assert 0 < results["peak_gpu_memory_gib"] <= 4
    assert json.loads((gpu_runs["bf16"] / "results.json").read_text())["peak_gpu_memory_gib"] > 0


def test_gpu_memory_cap_makes_a_bigger_allocation_fail():
    """`cap_memory` makes the GPU as small as asked: an allocation beyond it raises CUDA's
    out-of-memory error (what scripts/bench_scale.py --device cuda reads as "does not fit")."""
    from mtmoe.device import cap_memory

    device = torch.device("cuda", 0)
    torch.cuda.empty_cache()
    cap_memory(device, 0.25)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
        torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # under the cap: fine
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_masked_bf16_attention_takes_a_kernel_without_per_shape_plans():
    """After the device decision a masked bf16 attention of the model's kind runs the memory-efficient
    kernel, not cuDNN's, which would build a plan per new shape (`choose_attention_kernels`), and
    agrees with the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mtmoe.device import resolve_device

    device = resolve_device("cuda")
    q, k, v = (torch.randn(3, 4, 9, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    keep = torch.ones(3, 1, 1, 9, dtype=torch.bool, device=device)
    keep[0, ..., 6:] = False  # a padded row
    assert torch._fused_sdp_choice(q, k, v, keep) == SDPBackend.EFFICIENT_ATTENTION.value
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    with sdpa_kernel(SDPBackend.MATH):
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)


def test_training_steps_do_not_wait_for_the_gpu(tmp_path, corpus, cache_dir):
    """The GPU's default layout (world of one, no ZeRO, bf16): from step 2 on (the first steps
    allocate the optimizer state) each step runs under `set_sync_debug_mode("error")`, so any
    host-device sync in it, mtmoe's, DeepSpeed's or torch's, fails the step; step 3's loss is
    made NaN, and that step is withheld on the device (weights unchanged) without a sync either."""
    report, = run_step_probe(tmp_path, corpus, cache_dir, [], ["3:0"], steps=5, device="cuda", forbid_syncs_from=2)
    assert report["device"].startswith("cuda")
    assert [s["syncs_forbidden"] for s in report["steps"]] == [False, False, True, True, True]
    assert [s["withheld"] for s in report["steps"]] == [0, 0, 0, 1, 0]
    assert [s["weights_changed"] for s in report["steps"]] == [True, True, True, False, True]


@ON_THE_GPU_RUNS
def test_resumes_on_the_gpu(gpu_runs, tmp_path, corpus, cache_dir):
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(gpu_runs["fp32"], run)
    train(corpus, cache_dir, run, 16, **{"train.bf16": "false"})
    assert "resumed from step 12" in (run / "train.log").read_text()
    assert json.loads((run / "results.json").read_text())["step"] == 16
    assert sorted(losses(run)) == [2, 4, 6, 8, 10, 12, 14, 16]


LAYOUTS = {
    "zero1": {"train.zero_stage": 1},
    "zero2": {"train.zero_stage": 2},
    "zero2_cpu_adam": {"train.zero_stage": 2, "train.offload_optimizer": "cpu"},
    "zero3_cpu": {"parallel": "zero3_nvme", "train.offload_param": "cpu", "train.offload_optimizer": "cpu"},
    "zero3_nvme": {"parallel": "zero3_nvme"},
}
"""The layouts of one GPU besides plain data parallelism (the fixture's runs): ZeRO-1/2, ZeRO-2 with
DeepSpeedCPUAdam on pinned host memory, ZeRO-3 with parameters and optimizer on the CPU or NVMe."""


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trains_on_the_gpu_in_every_layout(layout, tmp_path, corpus, cache_dir):
    if layout == "zero3_nvme":
        require_nvme()  # an H200 lent here had no libaio: async_io cannot build there
    run = tmp_path / layout
    train(corpus, cache_dir, run, 6, **{"moe.ep_size": 1, **LAYOUTS[layout]})
    assert "trains on cuda:0" in (run / "train.log").read_text()
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 6 and all(0 < loss < 10 for loss in losses(run).values())


@pytest.fixture(scope="module")
def gpu_export(gpu_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_export") / "exp"
    proc = run_module("mtmoe.export", [f"checkpoint={gpu_runs['fp32']}", f"out={out}", "device=cuda"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@ON_THE_GPU_RUNS
def test_export_on_the_gpu_equals_it_on_the_cpu(gpu_export, corpus):
    """The export's model computes the same teacher-forced logits on the GPU and on the CPU (fp32,
    atol 1e-4), and its routing statistics were computed on the GPU."""
    from mtmoe.data.batching import collate
    from mtmoe.formats.export_format import load_export

    gpu, vocab, config = load_export(gpu_export, device="cuda")
    cpu = load_export(gpu_export)[0]
    assert next(gpu.parameters()).device.type == "cuda" and (gpu_export / "routing.json").is_file()
    lines = (corpus / "val.en").read_text().splitlines()[:8]
    targets = (corpus / "val.de").read_text().splitlines()[:8]
    batch = collate([torch.tensor(x).numpy() for x in vocab.encode(lines)],
                    [torch.tensor(x).numpy() for x in vocab.encode(targets)], [vocab.tag_id("de")] * 8, 64)
    with torch.no_grad():
        on_cpu = cpu(batch.src, batch.tgt_in)[0]
        on_gpu = gpu(batch.src.cuda(), batch.tgt_in.cuda())[0].cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)


@ON_THE_GPU_RUNS
def test_pruned_int8_export_on_the_gpu(gpu_runs, tmp_path):
    """The main job's export (half the experts by the loss rule, int8 experts) made on the GPU: the
    calibration passes, the quantized experts and the routing statistics all run there."""
    out = tmp_path / "pruned_int8"
    proc = run_module("mtmoe.export", [f"checkpoint={gpu_runs['fp32']}", f"out={out}", "device=cuda",
                                       "prune.keep=0.5", "quant=int8"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and (out / "routing.json").is_file()


@ON_THE_GPU_RUNS
def test_eval_and_translate_on_the_gpu(gpu_export, corpus, tmp_path):
    """mtmoe-eval device=cuda scores what device=cpu scores (beam 4: the same hypotheses, up to a
    tie broken the other way by float rounding), and mtmoe-translate device=cuda writes the same
    lines as eval's hypotheses (batched otherwise: at least 90 % identical)."""
    from mtmoe.eval.run import evaluate_export

    test = str(corpus / "test_2016_flickr")
    on_gpu = evaluate_export(gpu_export, test, directions="en-de,de-en", beam=4, out=tmp_path / "gpu.json",
                             device="cuda")
    on_cpu = evaluate_export(gpu_export, test, directions="en-de,de-en", beam=4, out=tmp_path / "cpu.json",
                             device="cpu")
    assert on_gpu["device"] == "cuda:0" and on_cpu["device"] == "cpu"
    for name in ("en-de", "de-en"):
        gpu_hyps = (tmp_path / f"gpu.{name}.hyp").read_text().splitlines()
        cpu_hyps = (tmp_path / f"cpu.{name}.hyp").read_text().splitlines()
        same = sum(a == b for a, b in zip(gpu_hyps, cpu_hyps))
        assert same >= 0.9 * len(cpu_hyps), (name, same, len(cpu_hyps))
        assert abs(on_gpu["directions"][name]["bleu"] - on_cpu["directions"][name]["bleu"]) <= 1.0

    source = (corpus / "test_2016_flickr.en").read_text()
    proc = run_module("mtmoe.translate", [f"model={gpu_export}", "src=en", "tgt=de", "device=cuda"], stdin=source)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines, hyps = proc.stdout.splitlines(), (tmp_path / "gpu.en-de.hyp").read_text().splitlines()
    assert len(lines) == len(hyps) and sum(a == b for a, b in zip(lines, hyps)) >= 0.9 * len(hyps)


def test_free_memory_counts_what_the_caching_allocator_holds_unused():
    """ZeRO-3's `train.valid_model=auto` compares the weights with the free memory: memory torch's
    caching allocator reserved and no tensor uses (most of it, after training steps) is free to this
    process, though the device no longer reports it free. Compared with what the device reports free
    at the same moment, not with a reading from before: other pytest workers share the GPU and
    allocate meanwhile (64 MiB of slack for what they do between the two adjacent readings)."""
    from mtmoe.device import free_memory_bytes

    device = torch.device("cuda")
    torch.cuda.set_per_process_memory_fraction(1.0, device)  # no cap left by an earlier test of this worker
    torch.cuda.empty_cache()
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    del block  # reserved by the allocator, allocated to nothing
    assert torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) >= 256 * 2**20
    counted = free_memory_bytes(device)
    device_free, _ = torch.cuda.mem_get_info(device)
    assert counted >= device_free + 192 * 2**20
