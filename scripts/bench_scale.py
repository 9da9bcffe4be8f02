"""Memory and scale benchmark: the largest mtmoe model that trains a few steps on this box, per
memory layout.

    python scripts/bench_scale.py                       # all modes, ~20-30 min on a 2-core box
    python scripts/bench_scale.py --modes ram --budget-gib 8

Models grow by experts per MoE layer (MoE in every layer, d512, FFN 2048, 6+6 layers): doubling
until a trial fails, then bisecting between the last fit and the first failure. A trial is a real
`mtmoe-train` run (3 steps, 256-token batches, no checkpoint) in its own process tree; it "fits"
when it finishes while the summed resident memory of its processes stays under `--budget-gib`. A
watchdog kills a trial that crosses the budget, so the box never swaps or OOM-kills. Writes
`bench/scale/results.json` + `results.md` and prints the table.

Modes:
  ram            world of one, fp32 weights + grads + Adam state in RAM (16 bytes/parameter)
  zero2_offload  2 ranks, experts split (ep 2), ZeRO-2, optimizer state and step on the CPU
                 (on a CPU-only box "offload" moves nothing out of RAM; on a GPU it frees 12 B/param
                 of GPU memory: the figure here shows what ZeRO-2 partitioning costs or saves)
  zero3_nvme     2 ranks, ZeRO-3 (`parallel=zero3_nvme`): parameters and Adam state in swap files
                 on disk (~20 B/param of disk), RAM ~4.5 B/param (gradient partitions). Bounded by the
                 free disk, so `--experts 64,128` tries given sizes instead of a doubling search.

    python scripts/bench_scale.py --modes zero3_nvme --experts 64,128 --timeout 2400
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

import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

MODES = {
    "ram": {"ranks": 1, "overrides": ["parallel=none"]},
    "zero2_offload": {"ranks": 2, "overrides": ["parallel=ez_offload"]},
    "zero3_nvme": {"ranks": 2, "overrides": ["parallel=zero3_nvme"]},
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


def run_trial(mode: str, experts: int, budget: int, steps: int, timeout: int) -> dict:
    """One training run; -> {fits, peak_rss_gib, peak_disk_gib, seconds, reason}."""
    spec = MODES[mode]
    run_dir = Path(tempfile.mkdtemp(prefix=f"scale-{mode}-{experts}-"))
    args = [*spec["overrides"], *(f"{k}={v}" for k, v in MODEL.items()), f"moe.num_experts={experts}",
            f"train.max_steps={steps}", "train.max_minutes=0", "train.max_tokens=256", "train.warmup_steps=1",
            "train.log_every=1", "train.save_every=-1", "train.valid_bleu=never", "train.progress=false",
            "data.val_lines=2", "wandb.mode=disabled", f"hydra.run.dir={run_dir}"]
    if spec["ranks"] == 1:
        cmd = [str(BIN / "mtmoe-train"), *args]
    else:
        from mtmoe.train.distributed import free_port

        cmd = [str(BIN / "deepspeed"), "--no_local_rank", "--num_gpus", str(spec["ranks"]), "--master_port",
               str(free_port()), "--module", "mtmoe.train", *args]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
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
    stderr = proc.stderr.read() if proc.stderr else ""
    results = run_dir / "results.json"
    fits = reason is None and proc.returncode == 0 and results.is_file()
    if not fits and reason is None:
        reason = f"exit code {proc.returncode}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"experts": experts, "parameters": count_parameters(experts), "fits": fits,
            "peak_rss_gib": round(peak / 2**30, 2), "peak_disk_gib": round(peak_disk / 2**30, 1),
            "seconds": round(time.monotonic() - started, 1), "reason": reason}


def given_sizes(mode: str, budget: int, steps: int, timeout: int, sizes: list[int], log) -> dict:
    """Tries the given expert counts (ascending, stops at the first failure)."""
    trials, fit, fail = [], None, None
    for experts in sorted(sizes):
        t = run_trial(mode, experts, budget, steps, timeout)
        trials.append(t)
        log(mode, t)
        if not t["fits"]:
            fail = experts
            break
        fit = experts
    best = next((t for t in trials if t["experts"] == fit), None)
    return {"mode": mode, "largest_experts": fit, "parameters": count_parameters(fit) if fit else 0,
            "peak_rss_gib": best["peak_rss_gib"] if best else None,
            "peak_disk_gib": best["peak_disk_gib"] if best else None, "first_failure_experts": fail,
            "trials": trials}


def largest_fit(mode: str, budget: int, steps: int, timeout: int, start: int, log) -> dict:
    """Doubles the expert count from `start` until a trial fails, then bisects (even counts, so
    the experts always split over 2 ranks)."""
    trials, fit, fail = [], None, None
    experts = start
    while fail is None:
        t = run_trial(mode, experts, budget, steps, timeout)
        trials.append(t)
        log(mode, t)
        if t["fits"]:
            fit, experts = experts, experts * 2
        else:
            fail = experts
        if fit is None and fail is not None:
            break
    while fit is not None and fail - fit > max(2, fit // 8):
        experts = (fit + fail) // 4 * 2
        t = run_trial(mode, experts, budget, steps, timeout)
        trials.append(t)
        log(mode, t)
        fit, fail = (experts, fail) if t["fits"] else (fit, experts)
    best = next((t for t in trials if t["experts"] == fit), None)
    return {"mode": mode, "largest_experts": fit, "parameters": count_parameters(fit) if fit else 0,
            "peak_rss_gib": best["peak_rss_gib"] if best else None,
            "peak_disk_gib": best["peak_disk_gib"] if best else None, "first_failure_experts": fail,
            "trials": trials}


def markdown(results: dict) -> str:
    base = next((r["parameters"] for r in results["modes"] if r["mode"] == "ram"), 0)
    lines = [f"Machine: {results['machine']}; budget {results['budget_gib']} GiB resident (all processes of a trial).",
             "", "| mode | largest model (params) | experts/layer | peak RSS GiB | peak disk GiB | vs ram | first failure |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results["modes"]:
        ratio = f"{r['parameters'] / base:.2f}x" if base and r["parameters"] else "-"
        failure = next((t["reason"] for t in r["trials"] if not t["fits"]), "-")
        first_failure = f"{r['first_failure_experts']} experts: {failure}" if r["first_failure_experts"] else "none tried"
        lines.append(f"| {r['mode']} | {r['parameters'] / 1e9:.2f} B | {r['largest_experts']} | {r['peak_rss_gib']} | "
                     f"{r.get('peak_disk_gib', '-')} | {ratio} | {first_failure} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--budget-gib", type=float, default=20.0)
    parser.add_argument("--start-experts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per trial")
    parser.add_argument("--experts", default="", help="comma-separated expert counts to try instead of searching")
    parser.add_argument("--out", default=str(ROOT / "bench" / "scale"))
    args = parser.parse_args()
    budget = int(args.budget_gib * 2**30)

    def log(mode, t):
        print(f"{mode:14s} experts={t['experts']:4d} ({t['parameters'] / 1e9:.2f} B params) fits={t['fits']!s:5s} "
              f"peak={t['peak_rss_gib']:6.2f} GiB disk={t['peak_disk_gib']:6.1f} GiB {t['seconds']:6.1f}s "
              f"{t['reason'] or ''}", flush=True)

    results = {"machine": f"{cpu_model()}, {psutil.cpu_count()} vCPU, "
                          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM",
               "budget_gib": args.budget_gib, "model": MODEL, "modes": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.experts.split(",") if x]
    for mode in args.modes.split(","):
        if sizes:
            results["modes"].append(given_sizes(mode, budget, args.steps, args.timeout, sizes, log))
        else:
            results["modes"].append(largest_fit(mode, budget, args.steps, args.timeout, args.start_experts, log))
        (out / "results.json").write_text(json.dumps(results, indent=1))  # after each mode: a long run keeps its figures
        (out / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
