"""Where the trainer's own step goes, on the CPU or on one GPU: the real loop (`Trainer.train_step`:
the engine's forward, backward and step, the divergence guard, the feed's copy-ahead), world of one.

    python scripts/train_step_profile.py                                  # this machine's device
    python scripts/train_step_profile.py --variant fp32:train.bf16=false --variant bf16:train.bf16=true
    python scripts/train_step_profile.py --set +experiment=main_gpu --steps 50
    python scripts/train_step_profile.py --variant bf16:train.bf16=true \
        --variant bf16_cudnn:train.bf16=true --env bf16_cudnn:MTMOE_CUDNN_ATTENTION=1

Each variant (`NAME:OVERRIDE,OVERRIDE...`, Hydra overrides on top of `--set`; default: the device's
default precision only) runs in a process of its own (DeepSpeed keeps per-process state), with the
environment variables `--env NAME:KEY=VALUE` gives it, and reports:
- wall time per step (mean over `--steps` steps after `--warmup`, the device synchronised at both
  ends) and target tokens/s;
- the torch ops per step (on a GPU each is a kernel launch or more) and the host's time in them
  (torch.profiler over `--profile-steps` steps), and on a GPU the kernels' own time per step, so
  `GPU busy` = kernel time / wall time says whether the step waits on the host (launch-bound) or on
  the GPU;
- on a GPU, the host-device synchronisations per step (`torch.cuda.set_sync_debug_mode`), each of
  which stalls the host until the GPU has caught up;
- the ops that took the most host time.
Writes `<out>/results.json` + `results.md` (default out: bench/train_step/<device type>).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402

DEFAULT_SET = ["+experiment=main", "parallel=none", "moe.ep_size=1", "train.max_tokens=4096"]
"""The main job's model in a world of one with GPU-sized batches (the CPU recipe's 640-token batches
leave a GPU idle); `--set` replaces it."""


def top_level_ops(events) -> list:
    """The profiler's op events that no other op called (what the step's Python code issued)."""
    return [e for e in events if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


def measure(overrides: list[str], steps: int, warmup: int, profile_steps: int, run_dir: Path) -> dict:
    """One variant, in this process: -> its figures (see the module docstring)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from mtmoe.cli.common import compose_train_config
    from mtmoe.data.batching import DeviceFeed
    from mtmoe.train.trainer import Trainer

    cfg = compose_train_config([*overrides, "train.max_minutes=0", f"train.max_steps={warmup + steps + profile_steps + 1}",
                   "train.save_every=0", "train.valid_every=0", "train.progress=false", "wandb.mode=disabled"])
    trainer = Trainer(cfg, run_dir)
    device, feed = trainer.device, DeviceFeed(trainer.stream, trainer.device)
    trainer.engine.train()
    on_gpu = device.type == "cuda"

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    def run(n: int) -> int:
        tokens = 0
        for _ in range(n):
            micro_batches = [next(feed) for _ in range(cfg.train.accumulate)]
            tokens += sum(b.num_target_tokens for b in micro_batches)
            trainer.train_step(micro_batches)
            trainer.step += 1
        return tokens

    run(warmup)
    sync()
    started = time.perf_counter()
    tokens = run(steps)
    sync()
    wall = (time.perf_counter() - started) / steps

    syncs = None
    if on_gpu:  # every synchronising call warns once per call in "warn" mode
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(2)
                sync()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught) / 2

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        run(profile_steps)
        sync()
    ops = top_level_ops(prof.events())
    host_time = collections.Counter()
    for e in ops:
        host_time[e.name] += e.cpu_time_total
    # the GPU's own events (kernels, copies, memsets), each timed on the device
    kernel_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return {
        "overrides": overrides, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "bf16": trainer.bf16, "steps": steps, "target_tokens_per_step": round(tokens / steps, 1),
        "ms_per_step": round(wall * 1e3, 2), "target_tokens_per_s": round(tokens / steps / wall, 1),
        "ops_per_step": round(len(ops) / profile_steps, 1),
        "op_host_ms_per_step": round(sum(host_time.values()) / 1e3 / profile_steps, 2),
        "kernel_ms_per_step": round(kernel_us / 1e3 / profile_steps, 2) if on_gpu else None,
        "syncs_per_step": syncs,
        "top_ops_host_ms_per_step": {k: round(v / 1e3 / profile_steps, 3) for k, v in host_time.most_common(12)},
    }


def markdown(results: list[dict]) -> str:
    lines = ["# The trainer's step, world of one (`python scripts/train_step_profile.py`)", "",
             f"Device: {results[0]['device_name']}; overrides: `{' '.join(results[0]['base'])}`.", "",
             *[f"- {r['name']}: `{' '.join([*(f'{k}={v}' for k, v in r.get('env', {}).items()), *r['overrides'][len(r['base']):]]) or '(none)'}`"
               for r in results], "",
             "| variant | ms/step | target tok/s | tokens/step | ops/step | host ms in ops | kernel ms | GPU busy | syncs/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        busy = f"{r['kernel_ms_per_step'] / r['ms_per_step']:.0%}" if r.get("kernel_ms_per_step") else "-"
        lines.append(f"| {r['name']} | {r['ms_per_step']} | {r['target_tokens_per_s']:.0f} | {r['target_tokens_per_step']}"
                     f" | {r['ops_per_step']} | {r['op_host_ms_per_step']} | {r['kernel_ms_per_step'] or '-'} | {busy}"
                     f" | {r['syncs_per_step'] if r['syncs_per_step'] is not None else '-'} |")
    for r in results:
        lines += ["", f"Host time per step in the ops that took the most, {r['name']}:", "",
                  "| op | ms/step |", "|---|---:|"]
        lines += [f"| `{k}` | {v} |" for k, v in r["top_ops_host_ms_per_step"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", action="append", default=None, metavar="OVERRIDE",
                    help=f"Hydra overrides for every variant (default: {' '.join(DEFAULT_SET)})")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDE,...")
    ap.add_argument("--env", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="an environment variable for variant NAME's process")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # a variant's own process: JSON file to write
    args = ap.parse_args(argv)
    base = args.set if args.set is not None else DEFAULT_SET
    bad = [v for v in args.variant if ":" not in v]
    if bad:
        ap.error(f"--variant {bad[0]}: expected NAME:OVERRIDES (overrides space-separated, may be empty: 'plain:')")
    variants = [v.split(":", 1) for v in args.variant] or [["default", ""]]
    env: dict[str, dict[str, str]] = {}
    for item in args.env:
        name, _, assignment = item.partition(":")
        key, eq, value = assignment.partition("=")
        if not eq or name not in dict(variants):
            ap.error(f"--env {item}: expected NAME:KEY=VALUE with NAME one of the variants")
        env.setdefault(name, {})[key] = value

    if args.one:  # in a variant's process
        name, extra = variants[0]
        with tempfile.TemporaryDirectory() as tmp:
            result = measure([*base, *filter(None, extra.split(","))], args.steps, args.warmup, args.profile_steps,
                             Path(tmp) / "run")
        seen = {key: os.environ.get(key) for key in env.get(name, {})}  # what this process was given
        Path(args.one).write_text(json.dumps({"name": name, "base": base, "env": seen, **result}))
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in variants:
            out = Path(tmp) / f"{len(results)}.json"
            cmd = [sys.executable, __file__, "--one", str(out), "--variant", f"{name}:{extra}", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--profile-steps", str(args.profile_steps),
                   *[f"--set={s}" for s in base], *[f"--env={name}:{k}={v}" for k, v in env.get(name, {}).items()]]
            settings = [f"{k}={v}" for k, v in env.get(name, {}).items()]
            print(f"== {name}: {' '.join([*settings, *filter(None, extra.split(','))])}", flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env.get(name, {}), "PYTHONPATH": os.pathsep.join(
                                      filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))})
            if proc.returncode != 0 or not out.is_file():
                raise SystemExit(f"variant {name} failed (exit code {proc.returncode})")
            results.append(json.loads(out.read_text()))
            r = results[-1]
            print(f"   {r['ms_per_step']} ms/step, {r['target_tokens_per_s']:.0f} target tok/s, {r['ops_per_step']} ops, "
                  f"syncs {r['syncs_per_step']}, kernels {r['kernel_ms_per_step']} ms", flush=True)
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "train_step" / results[0]["device"].split(":")[0]
    write_results(out_dir, results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
