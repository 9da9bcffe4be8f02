#!/usr/bin/env python
"""Export variants of one trained model, side by side: size, decoding speed, BLEU.

Builds from a training run (or a full export): full, global-pruned to 1/2 and 1/4 of the experts,
pruned for one direction (routing mass 0.9), int8, int4, and pruned-1/2 + int8. For each it reports
the file bytes (total, experts), beam-search sentences/s on the test set and BLEU/chrF, all
decoded in this one process with the same thread count, after a warm-up, so the ratios compare.

    python scripts/bench_export.py --run runs/main --out bench/export
    python scripts/bench_export.py --run runs/main --lines 200 --direction en-de   # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtmoe.data.corpus import load_test_set  # noqa: E402
from mtmoe.eval.decode import translate  # noqa: E402
from mtmoe.eval.score import score_direction  # noqa: E402
from mtmoe.export.artifact import export_bytes, export_run, load_export  # noqa: E402
from mtmoe.paths import resolve  # noqa: E402


def variants(direction: str) -> list[tuple[str, dict | None, str]]:
    return [("full", None, "none"),
            ("pruned-1/2", {"keep": 0.5}, "none"),
            ("pruned-1/4", {"keep": 0.25}, "none"),
            (f"pruned-{direction}", {"direction": direction, "mass": 0.9}, "none"),
            ("int8", None, "int8"),
            ("int4", None, "int4"),
            ("pruned-1/2+int8", {"keep": 0.5}, "int8")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="training run dir (or a full export dir)")
    ap.add_argument("--out", default="bench/export")
    ap.add_argument("--test", default="data/multi30k/test_2016_flickr")
    ap.add_argument("--direction", default="en-de")
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibration", default="data/multi30k/val")
    ap.add_argument("--calibration-lines", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = resolve(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src, tgt = args.direction.split("-")
    texts = load_test_set(args.test, [src, tgt])
    sources, refs = texts[src][:args.lines], texts[tgt][:args.lines]

    # Build every variant, then time decoding in alternating rounds (best round counts), so a
    # throttled stretch of the CPU does not land on one variant only.
    built = []
    for name, prune, quant in variants(args.direction):
        export_dir = out / name.replace("/", "_")
        if prune:
            prune = {**prune, "calibration": str(resolve(args.calibration)), "lines": args.calibration_lines}
        started = time.monotonic()
        export_run(resolve(args.run), export_dir, prune, quant, overwrite=True)  # the bench rebuilds its own exports
        built.append((name, export_dir, round(time.monotonic() - started, 1)))
        print(f"built {name} in {built[-1][2]} s", flush=True)
    models = {name: load_export(export_dir) for name, export_dir, _ in built}
    speeds: dict[str, list[float]] = {name: [] for name, _, _ in built}
    hyps: dict[str, list[str]] = {}
    for round_index in range(args.rounds):
        for name, _, _ in built:
            model, vocab, _ = models[name]
            translate(model, vocab, sources[:16], tgt, args.beam)  # warm-up
            started = time.monotonic()
            hyps[name] = translate(model, vocab, sources, tgt, args.beam)
            speeds[name].append(len(sources) / (time.monotonic() - started))
            print(f"round {round_index + 1}: {name:<18} {speeds[name][-1]:.1f} sent/s", flush=True)
    rows = []
    for name, export_dir, build_s in built:
        score = score_direction(hyps[name], refs)
        config = models[name][2]
        rows.append({"variant": name, **export_bytes(export_dir), "sentences_per_s": round(max(speeds[name]), 2),
                     "sentences_per_s_rounds": [round(v, 2) for v in speeds[name]],
                     "bleu": score["bleu"], "chrf": score["chrf"],
                     "kept_experts": config.get("pruning", {}).get("kept"), "build_seconds": build_s})

    base = rows[0]
    for r in rows:
        r["file_ratio"] = round(r["file_bytes"] / base["file_bytes"], 3)
        r["expert_ratio"] = round(r["expert_bytes"] / base["expert_bytes"], 3)
        r["speedup"] = round(r["sentences_per_s"] / base["sentences_per_s"], 2)
        r["bleu_delta"] = round(r["bleu"] - base["bleu"], 2)
    header = (f"| variant | file MB | expert MB | experts vs full | sent/s (beam {args.beam}) | speed vs full "
              f"| BLEU {args.direction} | ΔBLEU | chrF |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['file_bytes'] / 1e6:.2f} | {r['expert_bytes'] / 1e6:.2f} | "
                     f"{r['expert_ratio']:.3f} | {r['sentences_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['bleu']:.2f} | {r['bleu_delta']:+.2f} | {r['chrf']:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    meta = {"run": str(args.run), "test": args.test, "direction": args.direction, "lines": len(sources),
            "beam": args.beam, "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "results.md").write_text(table + "\n")
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
