"""Memory and scale benchmark: the largest mtmoe model that trains a few steps per memory layout,
on this box's CPUs or on one GPU.

    python scripts/bench_scale.py                       # CPU modes, ~20-30 min on a 2-core box
    python scripts/bench_scale.py --modes ram --budget-gib 8
    python scripts/bench_scale.py --device cuda --gpu-gib 8    # GPU modes, one GPU capped at 8 GiB

Models grow by experts per MoE layer (MoE in every layer, d512, FFN 2048, 6+6 layers): doubling
until a trial fails, then bisecting between the last fit and the first failure. A trial is a real
`mtmoe.train` run (3 steps, 256-token batches, no checkpoint) in its own process tree; it "fits"
when it finishes while the summed resident memory of its processes stays under `--budget-gib`
(default 3/4 of this machine's RAM). A watchdog kills a trial that crosses the budget, so the box
never swaps or OOM-kills. On a GPU the trial's allocator is also capped at `--gpu-gib`
(`train.gpu_memory_gib`: CUDA's out-of-memory error beyond it, as on a GPU that small), which keeps
the search short on a big GPU; the peak GPU memory held comes from the trial's results.json. Writes
`<out>/results.json` + `results.md` (out: bench/scale, or bench/scale_cuda) and prints the table.

CPU modes (`--device cpu`):
  ram            world of one, fp32 weights + grads + Adam state in RAM (16 bytes/parameter)
  zero2_offload  2 ranks, experts split (ep 2), ZeRO-2, optimizer state and step on the CPU
                 (on a CPU-only box "offload" moves nothing out of RAM: the figure shows what ZeRO-2
                 partitioning costs or saves)
  zero3_nvme     2 ranks, ZeRO-3 (`parallel=zero3_nvme`): parameters and Adam state in swap files
                 on disk (~20 B/param of disk), RAM ~4.5 B/param (gradient partitions). Bounded by the
                 free disk, so `--experts 64,128` tries given sizes instead of a doubling search.
GPU modes (`--device cuda`, one GPU, world of one, bf16 autocast):
  gpu            everything on the GPU: fp32 weights, grads, Adam state (16 B/param) + activations
  zero2_cpu_adam ZeRO-2 with the optimizer state and step on the CPU (DeepSpeedCPUAdam, pinned
                 memory): the GPU keeps fp32 weights and grads (8 B/param), Adam's 12 B/param move out
  zero3_cpu      ZeRO-3, parameters and optimizer state in (pinned) CPU RAM: the GPU holds the
                 layers in use; bounded by host RAM
  zero3_nvme     ZeRO-3, parameters and optimizer state in swap files (needs libaio): bounded by disk

    python scripts/bench_scale.py --modes zero3_nvme --experts 64,128 --timeout 2400
    python scripts/bench_scale.py --device cuda --modes zero3_cpu --experts 32,64 --gpu-gib 8
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402


MODES = {
    "cpu": {
        "ram": {"ranks": 1, "overrides": ["parallel=none"]},
        "zero2_offload": {"ranks": 2, "overrides": ["parallel=ez_offload"]},
        "zero3_nvme": {"ranks": 2, "overrides": ["parallel=zero3_nvme"]},
    },
    "cuda": {
        "gpu": {"ranks": 1, "overrides": ["parallel=none"]},
        "zero2_cpu_adam": {"ranks": 1, "overrides": ["parallel=none", "train.zero_stage=2",
                                                     "train.offload_optimizer=cpu"]},
        "zero3_cpu": {"ranks": 1, "overrides": ["parallel=zero3_nvme", "train.offload_param=cpu",
                                                "train.offload_optimizer=cpu"]},
        "zero3_nvme": {"ranks": 1, "overrides": ["parallel=zero3_nvme"]},
    },
}
MODEL = {"model.d_model": 512, "model.n_heads": 8, "model.d_ff": 2048, "model.encoder_layers": 6,
         "model.decoder_layers": 6, "model.dropout": 0.0, "moe.every": 1,
         # Two directions: the final validation of a ZeRO-3/NVMe trial reads every parameter from
         # disk once per direction, which is time, not memory.
         "data.langs": "[en,de]"}


def count_parameters(experts: int) -> int:
    """Parameters of the model with `experts` experts per MoE layer (built on the meta device)."""
    import torch

    from mtmoe.config import ModelConfig, MoEConfig
    from mtmoe.model.seq2seq import Seq2Seq

    model_cfg = ModelConfig(**{k.split(".")[1]: v for k, v in MODEL.items() if k.startswith("model.")})
    # 8000 = data.vocab_size of the default data config
    with torch.device("meta"):
        model = Seq2Seq(8000, model_cfg, MoEConfig(num_experts=experts, every=MODEL["moe.every"]))
    return sum(p.numel() for p in model.parameters())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_blocks * 512  # allocated, not apparent: swap files may be sparse
        except OSError:
            pass
    return total


def trial_command(device: str, mode: str, experts: int, steps: int, run_dir: Path, gpu_gib: float) -> list[str]:
    """The command line of one trial: `python -m mtmoe.train` in a world of one, the deepspeed
    launcher for CPU ranks (module forms: on a GPU machine the console scripts may be missing)."""
    spec = MODES[device][mode]
    args = [*spec["overrides"], *(f"{k}={v}" for k, v in MODEL.items()), f"moe.num_experts={experts}",
            f"train.max_steps={steps}", "train.max_minutes=0", "train.max_tokens=256", "train.warmup_steps=1",
            "train.log_every=1", "train.save_every=-1", "train.valid_bleu=never", "train.progress=false",
            "data.val_lines=2", "wandb.mode=disabled", f"train.device={device}", f"hydra.run.dir={run_dir}"]
    if device == "cuda":
        args.append(f"train.gpu_memory_gib={gpu_gib}")
    if spec["ranks"] == 1:
        return [sys.executable, "-m", "mtmoe.train", *args]
    from mtmoe.train.distributed import free_port

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", str(spec["ranks"]),
            "--master_port", str(free_port()), "--module", "mtmoe.train", *args]


def failure_reason(returncode: int, stderr: str) -> str:
    """Why a trial that exited by itself failed: CUDA's out-of-memory error when it is in the log
    (the line that matters may be far above the last one), else the last line."""
    lines = stderr.strip().splitlines()
    oom = next((line for line in reversed(lines) if "OutOfMemoryError" in line or "CUDA out of memory" in line), None)
    if oom is not None:
        return "over the GPU memory cap (CUDA out of memory)"
    return f"exit code {returncode}: {lines[-1] if lines else ''}"


def run_trial(device: str, mode: str, experts: int, budget: int, steps: int, timeout: int, gpu_gib: float) -> dict:
    """One training run; -> {fits, peak_rss_gib, peak_gpu_gib, peak_disk_gib, seconds, reason}."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"scale-{mode}-{experts}-"))
    cmd = trial_command(device, mode, experts, steps, run_dir, gpu_gib)
    started = time.monotonic()
    # stderr to a file, not a pipe: nothing reads a pipe while the trial runs, and a full one would stall it
    err_path = run_dir / "stderr.log"
    with err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    handle, peak, peak_disk, reason, polls = psutil.Process(proc.pid), 0, 0, None, 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(handle))
        polls += 1
        if polls % 50 == 0:  # disk (swap files) every ~5 s: walking the tree costs more than RSS
            peak_disk = max(peak_disk, tree_size(run_dir))
        if peak > budget:
            reason = "over the memory budget"
        elif time.monotonic() - started > timeout:
            reason = "timeout"
        if reason:
            for p in [handle, *handle.children(recursive=True)]:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            proc.wait()
            break
        time.sleep(0.1)
    stderr = err_path.read_text(errors="replace")
    results = run_dir / "results.json"
    fits = reason is None and proc.returncode == 0 and results.is_file()
    if not fits and reason is None:
        reason = failure_reason(proc.returncode, stderr)
    peak_gpu = json.loads(results.read_text()).get("peak_gpu_memory_gib") if fits else None
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"experts": experts, "parameters": count_parameters(experts), "fits": fits,
            "peak_rss_gib": round(peak / 2**30, 2), "peak_gpu_gib": peak_gpu,
            "peak_disk_gib": round(peak_disk / 2**30, 1), "seconds": round(time.monotonic() - started, 1),
            "reason": reason}


def summary(mode: str, trials: list[dict], fit: Optional[int], fail: Optional[int]) -> dict:
    best = next((t for t in trials if t["experts"] == fit), None)
    return {"mode": mode, "largest_experts": fit, "parameters": count_parameters(fit) if fit else 0,
            **{key: best[key] if best else None for key in ("peak_rss_gib", "peak_gpu_gib", "peak_disk_gib")},
            "first_failure_experts": fail, "trials": trials}


def given_sizes(mode: str, trial, sizes: list[int], log, deadline: float) -> dict:
    """Tries the given expert counts (ascending, stops at the first failure or past `deadline`)."""
    trials, fit, fail, cut = [], None, None, False
    for experts in sorted(sizes):
        if time.monotonic() > deadline:
            cut = True
            break
        t = trial(experts)
        trials.append(t)
        log(mode, t)
        if not t["fits"]:
            fail = experts
            break
        fit = experts
    return {**summary(mode, trials, fit, fail), "cut_by_deadline": cut}


def largest_fit(mode: str, trial, start: int, log, deadline: float) -> dict:
    """Doubles the expert count from `start` until a trial fails, then bisects (even counts, so
    the experts always split over 2 ranks); stops early, keeping the largest fit so far as a lower
    bound, once `deadline` (time.monotonic) has passed."""
    trials, fit, fail, cut = [], None, None, False
    experts = start
    while fail is None:
        if time.monotonic() > deadline:
            cut = True
            break
        t = trial(experts)
        trials.append(t)
        log(mode, t)
        if t["fits"]:
            fit, experts = experts, experts * 2
        else:
            fail = experts
        if fit is None and fail is not None:
            break
    while not cut and fit is not None and fail is not None and fail - fit > max(2, fit // 8):
        if time.monotonic() > deadline:
            cut = True
            break
        experts = (fit + fail) // 4 * 2
        t = trial(experts)
        trials.append(t)
        log(mode, t)
        fit, fail = (experts, fail) if t["fits"] else (fit, experts)
    return {**summary(mode, trials, fit, fail), "cut_by_deadline": cut}


def markdown(results: dict) -> str:
    gpu = results.get("device") == "cuda"
    base_mode = "gpu" if gpu else "ram"
    base = next((r["parameters"] for r in results["modes"] if r["mode"] == base_mode), 0)
    cap = f"; GPU memory capped at {results['gpu_gib']} GiB per trial (train.gpu_memory_gib)" if gpu else ""
    lines = [f"Machine: {results['machine']}; budget {results['budget_gib']} GiB resident (all processes of a trial){cap}.",
             "", f"| mode | largest model (params) | experts/layer |{' peak GPU GiB |' if gpu else ''} peak RSS GiB | "
                 f"peak disk GiB | vs {base_mode} | first failure |",
             f"|---|---:|---:|{'---:|' if gpu else ''}---:|---:|---:|---|"]
    for r in results["modes"]:
        ratio = f"{r['parameters'] / base:.2f}x" if base and r["parameters"] else "-"
        failure = next((t["reason"] for t in r["trials"] if not t["fits"]), "-")
        if r["first_failure_experts"]:
            first_failure = f"{r['first_failure_experts']} experts: {failure}"
        else:
            first_failure = "none tried (search cut by --mode-minutes)" if r.get("cut_by_deadline") else "none tried"
        largest = f"{r['largest_experts']}{'+' if r.get('cut_by_deadline') else ''}"
        gpu_cell = f" {r.get('peak_gpu_gib')} |" if gpu else ""
        lines.append(f"| {r['mode']} | {r['parameters'] / 1e9:.2f} B | {largest} |{gpu_cell} {r['peak_rss_gib']} | "
                     f"{r.get('peak_disk_gib', '-')} | {ratio} | {first_failure} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=sorted(MODES), default="cpu")
    parser.add_argument("--modes", default="", help="comma-separated modes (default: every mode of --device)")
    parser.add_argument("--budget-gib", type=float, default=0.0,
                        help="resident memory a trial's processes may hold (default: 3/4 of this machine's RAM)")
    parser.add_argument("--gpu-gib", type=float, default=8.0, help="GPU memory cap per trial with --device cuda")
    parser.add_argument("--start-experts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per trial")
    parser.add_argument("--mode-minutes", type=float, default=0.0,
                        help="stop a mode's search after this long, its largest fit a lower bound (0 = no limit)")
    parser.add_argument("--experts", default="", help="comma-separated expert counts to try instead of searching")
    parser.add_argument("--out", default="", help="default: bench/scale (cpu), bench/scale_cuda (cuda)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m] or list(MODES[args.device])
    unknown = [m for m in modes if m not in MODES[args.device]]
    if unknown:
        parser.error(f"--modes {','.join(unknown)}: not a mode of --device {args.device} "
                     f"(its modes: {', '.join(MODES[args.device])})")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: this machine has no CUDA device")
        gpu_name = torch.cuda.get_device_name(0)
    budget_gib = args.budget_gib or round(psutil.virtual_memory().total / 2**30 * 0.75, 1)
    budget = int(budget_gib * 2**30)

    def log(mode, t):
        gpu = f"gpu={t['peak_gpu_gib']} GiB " if t.get("peak_gpu_gib") is not None else ""
        print(f"{mode:14s} experts={t['experts']:4d} ({t['parameters'] / 1e9:.2f} B params) fits={t['fits']!s:5s} "
              f"{gpu}rss={t['peak_rss_gib']:6.2f} GiB disk={t['peak_disk_gib']:6.1f} GiB {t['seconds']:6.1f}s "
              f"{t['reason'] or ''}", flush=True)

    machine = f"{cpu_model()}, {psutil.cpu_count()} vCPU, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    if args.device == "cuda":
        machine = f"{gpu_name} + {machine}"
    results = {"machine": machine, "device": args.device, "budget_gib": budget_gib,
               **({"gpu_gib": args.gpu_gib} if args.device == "cuda" else {}), "steps": args.steps,
               "model": MODEL, "modes": []}
    out = Path(args.out or ROOT / "bench" / ("scale" if args.device == "cpu" else "scale_cuda"))
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.experts.split(",") if x]
    for mode in modes:
        def trial(experts, mode=mode):
            return run_trial(args.device, mode, experts, budget, args.steps, args.timeout, args.gpu_gib)

        deadline = time.monotonic() + args.mode_minutes * 60 if args.mode_minutes > 0 else float("inf")
        if sizes:
            results["modes"].append(given_sizes(mode, trial, sizes, log, deadline))
        else:
            results["modes"].append(largest_fit(mode, trial, args.start_experts, log, deadline))
        write_results(out, results, markdown(results))  # after each mode: a long run keeps its figures
    print(markdown(results))


if __name__ == "__main__":
    main()
