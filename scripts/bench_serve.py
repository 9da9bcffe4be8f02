#!/usr/bin/env python
"""Serving with only some experts resident: speed and cache behaviour vs the all-resident model.

Sweeps, per export, the fast-tier size (1/4, 1/2 and all of each MoE layer's experts) x budget
(--budgets: serve.budget, slots per layer or shared) x prefetch policy (none, speculative, language
when the export has routing statistics, and pregate when the model was trained with
moe.pregate=true) x simulated slow-tier bandwidth, decoding --lines lines of one test direction, and reports
sentences/s, speed relative to that model all resident (plain `load_export`), hit rate, prefetch
hits, bytes moved slow -> fast, stall time and peak resident expert bytes. All settings are loaded
and warmed up first, then timed in --rounds interleaved rounds in this one process; each keeps its
fastest round (and that round's metrics). Writes <out>/results.json and <out>/results.md and
prints the table.

    python scripts/bench_serve.py --export exports/main               # existing export(s)
    python scripts/bench_serve.py                                     # trains small MoEs first
    python scripts/bench_serve.py --slow-gbps 0 2 --lines 200         # two slow tiers
    python scripts/bench_serve.py --export runs/main/export --beam 4 --lines 200 --sizes 1/2 --out bench/serve/main

Without --export, two small MoEs with an MoE FFN in every layer (so prefetching has a next layer
to predict) are benchmarked: one trained for --train-steps steps (runs/bench_serve/train, exported
to runs/bench_serve/export), and the same fine-tuned for --pregate-steps steps with
moe.pregate=true (init.from_moe; runs/bench_serve/train_pregate, export_pregate). Runs and exports
are reused when they exist. Decoding defaults to greedy, one sentence at a time: interactive
serving, the case offloading is for (a batch of many sentences needs nearly every expert of every
layer at every step).

The slow tier is the memory-mapped experts.safetensors on disk. Page caches cannot be dropped here,
so after their first read the OS page cache serves the store from RAM: unthrottled figures measure
a RAM-to-RAM copy, not a disk. --slow-gbps G models a slower tier: one channel of G GB/s that every
expert read queues for (on-demand loads and prefetches share it; each read returns once the channel
has carried its bytes, sleeping the remainder); the output says which was used.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtmoe.cli.common import friendly_errors  # noqa: E402
from mtmoe.errors import ConfigError  # noqa: E402
from mtmoe.errors import ExportError  # noqa: E402
from mtmoe.data.corpus import load_test_set  # noqa: E402
from mtmoe.model.generation import translate  # noqa: E402
from mtmoe.formats.export_format import load_export  # noqa: E402
from mtmoe.paths import resolve  # noqa: E402
from mtmoe.config import ServeBudget, ServeConfig  # noqa: E402
from mtmoe.serve.runtime import load_for_serving  # noqa: E402
from mtmoe.serve.validate import POLICIES  # noqa: E402
from bench.results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"1/4": 0.25, "1/2": 0.5, "all": None}  # None: every expert of the layer (through the runtime)
BIN = Path(sys.executable).parent

SMALL_MOE = ["model=base", "model.d_model=128", "model.n_heads=4", "model.d_ff=512", "model.encoder_layers=3",
             "model.decoder_layers=3", "model.dropout=0.1", "moe.every=1", "moe.num_experts=8", "moe.top_k=1",
             "data.directions='en-de,de-en'", "data.val_lines=20", "train.max_tokens=1024",
             "train.warmup_steps=100", "train.lr=2e-3", "train.max_minutes=0", "train.valid_every=0",
             "train.valid_bleu=never", "train.save_every=0", "train.progress=false", "wandb.mode=disabled"]
"""The default model: d128, 3+3 layers, an MoE FFN (8 experts, top-1) in every layer, trained on
en-de and de-en only (a few minutes on a 2-core CPU: enough for routing to specialise, not for
good translations)."""


def small_moe_export(name: str, overrides: list[str]) -> Path:
    """Trains runs/bench_serve/<train name> with `overrides` and exports it; reuses either if present."""
    run = ROOT / "runs/bench_serve" / name.replace("export", "train")
    export = ROOT / "runs/bench_serve" / name
    if (export / "config.json").is_file():
        print(f"reusing {export}", file=sys.stderr)
        return export
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not (run / "checkpoints" / "latest").is_file():
        print(f"training {run} ...", file=sys.stderr)
        subprocess.run([str(BIN / "mtmoe-train"), *SMALL_MOE, *overrides, f"hydra.run.dir={run}"],
                       check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    subprocess.run([str(BIN / "mtmoe-export"), f"checkpoint={run}", f"out={export}"], check=True, env=env,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    return export


def default_exports(steps: int, pregate_steps: int) -> list[Path]:
    plain = small_moe_export("export", [f"train.max_steps={steps}"])
    pregate = small_moe_export("export_pregate", [
        f"train.max_steps={pregate_steps}", "train.warmup_steps=20", "train.lr=1e-3", "moe.pregate=true",
        f"init.from_moe={ROOT / 'runs/bench_serve/train'}"])
    return [plain, pregate]


def decode(model, vocab, lines: list[str], tgt: str, beam: int, batch: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) to translate `lines`, `batch` sentences per call."""
    started, cpu = time.perf_counter(), time.thread_time()
    for i in range(0, len(lines), batch):
        translate(model, vocab, lines[i:i + batch], tgt, beam)
    return time.perf_counter() - started, time.thread_time() - cpu


@friendly_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", nargs="+", help="export dir(s) (default: train and export small MoEs, see above)")
    ap.add_argument("--train-steps", type=int, default=300, help="steps of the default model's training")
    ap.add_argument("--pregate-steps", type=int, default=120, help="steps of its pre-gated fine-tuning")
    ap.add_argument("--test", default="data/multi30k/test_2016_flickr")
    ap.add_argument("--direction", default="en-de")
    ap.add_argument("--lines", type=int, default=15)
    ap.add_argument("--warmup-lines", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds; each setting keeps its fastest")
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--batch-sentences", type=int, default=1, help="sentences per decoding call")
    ap.add_argument("--slow-gbps", type=float, nargs="+", default=[0.0],
                    help="simulated slow-tier bandwidths to sweep, GB/s (0 = no limit)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the compute thread")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES),
                    help="fast-tier sizes (fractions of each MoE layer's experts)")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--budgets", nargs="+", default=["model"], choices=list(get_args(ServeBudget)),
                    help="serve.budget: slots per layer, or the same total shared by all MoE layers")
    ap.add_argument("--store-dir", help="where experts.safetensors goes (default: the export dir)")
    ap.add_argument("--out", default="bench/serve")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    exports = [resolve(e) for e in args.export] if args.export else default_exports(args.train_steps,
                                                                                      args.pregate_steps)
    src, tgt = args.direction.split("-")
    texts = load_test_set(resolve(args.test), [src])[src]
    warmup, lines = texts[:args.warmup_lines], texts[args.warmup_lines:args.warmup_lines + args.lines]

    # Every setting is built and warmed up first, then timed in interleaved rounds (the box may be
    # shared: a burst of load then hits all settings alike, and each keeps its fastest round).
    settings, configs = [], {}
    for export in exports:
        model, vocab, configs[str(export)] = load_export(export)
        layer_experts = max(len(layer.experts) for _, layer in model.moe_layers())
        settings.append({"export": str(export), "label": "all (plain model)", "policy": "-", "slow_gbps": None,
                         "model": model, "vocab": vocab, "runtime": None})
        for gbps in args.slow_gbps:
            for label in args.sizes:
                size = SIZES[label] or float(layer_experts)
                for budget in args.budgets if SIZES[label] else ["layer"]:  # all resident: nothing to share
                    for policy in args.policies:
                        serve = ServeConfig(experts_per_layer=size, prefetch=policy, slow_gbps=gbps,
                                            store_dir=args.store_dir, budget=budget)
                        try:
                            served, _, _, runtime = load_for_serving(export, serve)
                        except (ConfigError, ExportError):
                            if policy in ("pregate", "language"):  # not a pre-gate model / no routing.json: noted
                                continue
                            raise
                        runtime.set_direction(src, tgt)  # the language policy seeds and holds its caches
                        settings.append({"export": str(export), "label": label, "policy": policy, "budget": budget,
                                         "slow_gbps": gbps or None, "model": served, "vocab": vocab,
                                         "runtime": runtime})
    for setting in settings:
        decode(setting["model"], setting["vocab"], warmup, tgt, args.beam, args.batch_sentences)
    for round_ in range(args.rounds):
        for setting in settings:
            runtime = setting["runtime"]
            if runtime is not None:
                runtime.wait_idle()
                runtime.metrics.reset()
            seconds, cpu = decode(setting["model"], setting["vocab"], lines, tgt, args.beam, args.batch_sentences)
            if seconds < setting.get("seconds", float("inf")):
                setting["seconds"] = seconds
                if runtime is not None:
                    runtime.metrics.add_decode(len(lines), seconds)
                    setting["summary"] = runtime.metrics.summary()
                # What the wall time would be on an idle box: the compute thread's own CPU time (its
                # copies, and its stalls: it busy-waits for the simulated tier, store.wait_until).
                setting["busy_s"] = cpu
            print(f"round {round_ + 1}: {Path(setting['export']).name} {setting['label']} "
                  f"{setting.get('budget', '')} {setting['policy']} "
                  f"gbps={setting['slow_gbps']}: {len(lines) / seconds:.2f} sentences/s", file=sys.stderr)

    rows = []
    for setting in settings:
        if setting["runtime"] is None:  # each model's all-resident reference comes first
            base, base_busy = len(lines) / setting["seconds"], len(lines) / setting["busy_s"]
        speed, busy = len(lines) / setting["seconds"], len(lines) / setting["busy_s"]
        row = {"export": setting["export"], "experts_resident": setting["label"], "policy": setting["policy"],
               "budget": setting.get("budget"),
               "slow_gbps": setting["slow_gbps"], "sentences_per_s": round(speed, 2),
               "speed_vs_resident": round(speed / base, 3), "sentences_per_cpu_s": round(busy, 2),
               "cpu_speed_vs_resident": round(busy / base_busy, 3)}
        if setting["runtime"] is not None:
            setting["runtime"].close()
            s = setting["summary"]
            row.update({k: s[k] for k in ("experts_per_layer", "hit_rate", "prefetch_hits", "activations",
                                          "late_prefetches", "wasted_prefetches", "bytes_moved", "stall_s",
                                          "peak_resident_expert_bytes", "all_expert_bytes", "layers")})
            row.update({f"{stack}_hit_rate": stack_hit_rate(s["layers"], stack) for stack in ("enc", "dec")})
        rows.append(row)

    pregate_ran = any(r["policy"] == "pregate" for r in rows)
    language_ran = any(r["policy"] == "language" for r in rows)
    setup = {"exports": {e: {"model": c["model"], "moe": c["moe"]} for e, c in configs.items()},
             "direction": args.direction, "lines": len(lines), "warmup_lines": len(warmup), "rounds": args.rounds,
             "beam": args.beam, "batch_sentences": args.batch_sentences, "threads": args.threads,
             "slow_gbps": args.slow_gbps, "cpu": platform.processor() or platform.machine(),
             "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(), "torch": torch.__version__}
    notes = [
        "Slow tier: the memory-mapped experts.safetensors on disk; the OS page cache may serve its reads "
        "from RAM (page caches cannot be dropped here), so rows without a simulated bandwidth measure a "
        "RAM-to-RAM copy.",
        "Simulated bandwidth (slow GB/s column): one channel of that bandwidth shared by every expert read "
        "(on-demand loads and prefetches queue for it, a prefetch not started yet can be cancelled; an expert is "
        "usable once the channel has carried its bytes); it is a model of a slower tier, not a measurement of one. "
        "Every copy (page cache -> slot) is made by the compute thread and counts in its CPU time.",
        "pregate: run on exports trained with moe.pregate=true only (the model's plan for the next MoE layer "
        "drives the prefetch; on such a model `speculative` computes the same prediction from a hook)."
        if pregate_ran else "pregate: not run (no export was trained with moe.pregate=true).",
        "language: each layer's cache seeded for the direction from the export's routing statistics, each MoE "
        "layer's router applied ahead at up to two points for every token, and each call's missing experts "
        "streamed while its others compute; per layer, the mode (predict or not; decoder: capacity - 1 experts "
        "held or none; encoder: capacity - 2 held) with the best hit rate over windows of 64 calls, tried in "
        "turn and then kept for 8 windows (the trials are part of the figures)."
        if language_ran else "language: not run (no export has routing statistics, routing.json).",
        "budget (serve.budget): `layer` = each MoE layer its own slots (N/layer); `model` = the same total "
        "shared by all MoE layers (N shared): a prediction may take any layer's least recently used slot, a "
        "miss only while its layer holds fewer than its share.",
        "Hit rate = expert calls (with > 0 rows) served from the fast tier without waiting; enc/dec: the "
        "encoder runs a whole sentence at once (prefill: most experts of every layer), the decoder one token "
        "per step. Speed is relative to the plain all-resident model, timed in the same process, interleaved, "
        "best of the rounds; the offloaded runtime also skips the expert calls with 0 rows that the plain "
        "model makes.",
        "sent/s (wall) depends on what else the box runs; sent/s (cpu) = lines / CPU time of the compute "
        "thread, which makes every copy and busy-waits through its stalls on the simulated tier: the wall time "
        "an idle box would show, for comparing settings on a shared one.",
    ]
    out = resolve(args.out)
    table = markdown(rows, setup, notes)
    write_results(out, {"setup": setup, "notes": notes, "rows": rows}, table)
    plot(rows, out / "hit_rate.png")
    print(table)


def plot(rows: list[dict], path: Path) -> None:
    """Hit rate and speed vs all-resident per policy, one panel per model and slow tier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    served = [r for r in rows if "hit_rate" in r and r["experts_resident"] != "all"]
    panels = list(dict.fromkeys((Path(r["export"]).name, r["slow_gbps"]) for r in served))
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7.5), squeeze=False)
    for j, (model, gbps) in enumerate(panels):
        part = [r for r in served if (Path(r["export"]).name, r["slow_gbps"]) == (model, gbps)]
        sizes = list(dict.fromkeys(r["experts_resident"] for r in part))
        policies = list(dict.fromkeys(bar(r) for r in part))
        width = 0.8 / len(policies)
        for i, policy in enumerate(policies):
            for k, key in enumerate(("hit_rate", "cpu_speed_vs_resident")):
                values = [next((r[key] for r in part if bar(r) == policy and r["experts_resident"] == size), 0)
                          for size in sizes]
                axes[k, j].bar(np.arange(len(sizes)) + (i - (len(policies) - 1) / 2) * width, values, width,
                               label=policy)
        for k, label in enumerate(("hit rate", "speed vs all-resident\n(compute thread's cpu)")):
            axes[k, j].set_xticks(range(len(sizes)), [f"{s} resident" for s in sizes])
            axes[k, j].set_ylabel(label)
            axes[k, j].axhline(1.0, color="k", linewidth=0.6)
        axes[0, j].set_title(f"{model}, slow tier {gbps or 'page cache'}" + (" GB/s" if gbps else ""))
        axes[1, j].legend(*axes[0, j].get_legend_handles_labels(), fontsize=7, ncol=2, loc="upper center",
                          bbox_to_anchor=(0.5, -0.12))  # below the panels, hiding no bar
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bar(row: dict) -> str:
    """A served setting's name in the plot: its policy, and whether the layers share one budget."""
    return row["policy"] + (" (shared)" if row.get("budget") == "model" else "")


def stack_hit_rate(layers: dict, stack: str) -> float:
    """Activation-weighted hit rate of the MoE layers of one stack ('enc' or 'dec')."""
    parts = [(v["hit_rate"] or 0.0, v["activations"]) for name, v in layers.items() if name.startswith(stack)]
    total = sum(n for _, n in parts)
    return round(sum(rate * n for rate, n in parts) / total, 4) if total else 0.0


def describe(export: str, config: dict) -> str:
    m, moe = config["model"], config["moe"]
    return (f"`{Path(export).name}`: d{m['d_model']}, {m['encoder_layers']}+{m['decoder_layers']} layers, "
            f"{moe['num_experts']} experts top-{moe['top_k']} in every {moe['every']} layer(s)"
            + (", pre-gated" if moe.get("pregate") else ""))


def markdown(rows: list[dict], setup: dict, notes: list[str]) -> str:
    mib = 1 << 20
    lines = [f"{setup['direction']}, {setup['lines']} lines (+{setup['warmup_lines']} warm-up), beam {setup['beam']}, "
             f"{setup['batch_sentences']} sentence(s) per call, {setup['threads']} compute thread(s), best of "
             f"{setup['rounds']} rounds. Models:", ""]
    lines += [f"- {describe(e, c)}" for e, c in setup["exports"].items()]
    lines += ["",
              "| model | experts resident | prefetch | slow GB/s | sent/s (wall) | vs resident | sent/s (cpu) "
              "| vs resident | hit rate | enc / dec hit rate | prefetch hits | late | wasted | MiB moved | stall s "
              "| peak resident MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = Path(r["export"]).name
        speeds = (f"{r['sentences_per_s']} | {r['speed_vs_resident']:.2f}x | {r['sentences_per_cpu_s']} | "
                  f"{r['cpu_speed_vs_resident']:.2f}x")
        if "hit_rate" not in r:
            lines.append(f"| {name} | {r['experts_resident']} | {r['policy']} | - | {speeds} | - | - | - | - | - | - "
                         f"| - | all |")
            continue
        per_layer = r["experts_per_layer"]
        resident = (f"{r['experts_resident']} ({sum(per_layer.values())} shared)" if r.get("budget") == "model"
                    else f"{r['experts_resident']} ({min(per_layer.values())}/layer)")
        lines.append(f"| {name} | {resident} | {r['policy']} | {r['slow_gbps'] or '-'} | {speeds} | "
                     f"{r['hit_rate']:.3f} | {r['enc_hit_rate']:.2f} / {r['dec_hit_rate']:.2f} | "
                     f"{r['prefetch_hits']}/{r['activations']} | {r['late_prefetches']} | {r['wasted_prefetches']} | "
                     f"{r['bytes_moved'] / mib:.1f} | {r['stall_s']:.2f} | "
                     f"{r['peak_resident_expert_bytes'] / mib:.2f} of {r['all_expert_bytes'] / mib:.2f} |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
