#!/usr/bin/env python
"""Export variants of one trained model, side by side: size, decoding speed, BLEU on every scored direction.

Builds from a training run (or a full export): full; expert-pruned to 1/2 and 1/4 of the model's
experts by the loss rule (the default: the budget spent over the layers); int8; int4; 1/2 + int8 by
the loss rule, the loss rule with the same count in every layer, the coverage and the global rules; and, from the full export without a second one, per-direction expert subsets loaded at run
time (`subset.mass`, 0.9 by default). For each it reports the file bytes
(total, experts; for subsets the expert bytes held, mean over the directions), beam-search
sentences/s on one direction (decoded in this one process with the same thread count, after a
warm-up, in alternating rounds, best round kept, so the ratios compare) and BLEU/chrF on every
scored direction (decoded by `--workers` processes), with the change against the full model.

    python scripts/bench_export.py --run runs/main --out bench/export
    python scripts/bench_export.py --run runs/main --lines 200 --variants full pruned-1/2+int8   # quicker

Each variant's scores are kept in <out>/<variant>/eval.json and reused by a rerun with the same
settings (delete them to recompute).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtmoe.cli.common import friendly_errors  # noqa: E402
from mtmoe.config import SubsetConfig  # noqa: E402
from mtmoe.data.corpus import load_test_set  # noqa: E402
from mtmoe.model.generation import translate  # noqa: E402
from mtmoe.eval.run import evaluate_export  # noqa: E402
from mtmoe.formats.export_format import export_bytes, load_export
from mtmoe.export.pipeline import export_run  # noqa: E402
from mtmoe.export.subset import load_subset  # noqa: E402
from mtmoe.paths import resolve  # noqa: E402
from bench.results import write_results  # noqa: E402

DIRECTIONS = ["en-de", "de-en", "en-fr", "fr-en", "en-cs", "cs-en"]

VARIANTS = {  # name: (prune, quant, built from); "subset" rows are loaded from the full export
    "full": (None, "none", None),
    "pruned-1/2": ({"keep": 0.5, "rule": "loss"}, "none", "full"),
    "pruned-1/4": ({"keep": 0.25, "rule": "loss"}, "none", "full"),
    "int8": (None, "int8", "full"),
    "int4": (None, "int4", "full"),
    "pruned-1/2+int8": (None, "int8", "pruned-1/2"),  # the same kept set, quantized
    "pruned-1/2+int8 loss per layer": ({"keep": 0.5, "rule": "loss", "per_layer": True}, "int8", "full"),
    "pruned-1/2+int8 coverage": ({"keep": 0.5, "rule": "coverage"}, "int8", "full"),
    "pruned-1/2+int8 global": ({"keep": 0.5, "rule": "global"}, "int8", "full"),
    "subset": (None, "none", None),
}


def folder(name: str) -> str:
    return name.replace("/", "_").replace(" ", "-").replace("+", "-")


RECIPE = "bench_recipe.json"
"""What a variant's export was built from (written beside it): a folder built from another run or
with other settings is built again, not reported under the new run's name."""


def build(args, out: Path, names: list[str]) -> tuple[dict[str, Path], dict[str, dict]]:
    """Exports every variant (the full one with routing statistics, which subsets read), reusing
    one whose recipe (run, pruning, quantization, calibration; its base's recipe) is unchanged
    -> ({variant: export dir}, {variant: recipe})."""
    calibration = {"calibration": str(resolve(args.calibration)), "lines": args.calibration_lines}
    dirs, recipes = {}, {}
    for name in names:
        prune, quant, base = VARIANTS[name]
        if name == "subset":
            dirs[name], recipes[name] = dirs["full"], recipes["full"]
            continue
        export_dir = out / folder(name)
        recipe = {"from": recipes[base] if base else str(resolve(args.run)), "prune": prune, "quant": quant,
                  "calibration": calibration if prune or name == "full" else None,
                  "loss_lines": args.loss_lines if prune and prune.get("rule") == "loss" else None}
        built = export_dir / RECIPE
        if not (export_dir / "config.json").is_file() or not built.is_file() or json.loads(built.read_text()) != recipe:
            source = dirs[base] if base else resolve(args.run)
            started = time.monotonic()
            loss_rule = prune and prune.get("rule") == "loss"  # the only rule that reads --loss-lines
            export_run(source, export_dir,
                       prune and {**prune, **calibration, **({"loss_lines": args.loss_lines} if loss_rule else {})},
                       quant, routing=calibration if name == "full" else None, overwrite=True)
            built.write_text(json.dumps(recipe, indent=1))
            print(f"built {name} in {time.monotonic() - started:.0f} s", flush=True)
        dirs[name], recipes[name] = export_dir, recipe
    return dirs, recipes


def scores(args, name: str, export_dir: Path, out: Path, recipe: dict) -> dict:
    """The variant's evaluation report on every direction (reused when its settings and the
    export's recipe match)."""
    path = out / folder(name) / "eval.json"
    settings = {"test": args.test, "lines": args.lines, "beam": args.beam, "directions": args.directions,
                "subset_mass": args.subset_mass if name == "subset" else None, "export": recipe}
    if path.is_file():
        report = json.loads(path.read_text())
        if report.get("bench_settings") == settings:
            return report
    started = time.monotonic()
    report = evaluate_export(export_dir, args.test, directions=args.directions, beam=args.beam, limit=args.lines,
                             workers=args.workers, threads=1,
                             subset=SubsetConfig(mass=args.subset_mass) if name == "subset" else None)
    report["bench_settings"] = settings
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"scored {name} in {time.monotonic() - started:.0f} s: mean BLEU {report['mean']['bleu']}", flush=True)
    return report


def speeds(args, dirs: dict[str, Path]) -> dict[str, list[float]]:
    """Sentences/s of every variant on --speed-lines lines of the first direction, one thread, in
    alternating rounds after a warm-up (a throttled stretch of the CPU hits every variant alike)."""
    src, tgt = args.directions[0].split("-")
    sources = load_test_set(args.test, [src])[src][:args.speed_lines]
    models = {name: (load_subset(d, args.directions[0], args.subset_mass)[:2] if name == "subset"
                     else load_export(d)[:2]) for name, d in dirs.items()}
    out: dict[str, list[float]] = {name: [] for name in dirs}
    for round_index in range(args.rounds):
        for name, (model, vocab) in models.items():
            translate(model, vocab, sources[:16], tgt, args.beam)  # warm-up
            started = time.monotonic()
            translate(model, vocab, sources, tgt, args.beam)
            out[name].append(len(sources) / (time.monotonic() - started))
            print(f"round {round_index + 1}: {name:<24} {out[name][-1]:.1f} sent/s", flush=True)
    return out


@friendly_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="training run dir (or a full export dir)")
    ap.add_argument("--out", default="bench/export")
    ap.add_argument("--test", default="data/multi30k/test_2016_flickr")
    ap.add_argument("--directions", nargs="+", default=DIRECTIONS, help="scored directions (the first is timed)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--lines", type=int, default=1000, help="test lines per direction (0 = all)")
    ap.add_argument("--speed-lines", type=int, default=300)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the timed decoding")
    ap.add_argument("--workers", type=int, default=2, help="decoding processes for the scores")
    ap.add_argument("--subset-mass", type=float, default=0.9)
    ap.add_argument("--calibration", default="data/multi30k/val")
    ap.add_argument("--calibration-lines", type=int, default=300)
    ap.add_argument("--loss-lines", type=int, default=100, help="calibration lines of the loss rule")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = resolve(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["full"] + [n for n in args.variants if n != "full"]
    for name in list(names):  # a variant built from another needs it built first
        base = VARIANTS[name][2]
        if base and base not in names[:names.index(name)]:
            names.insert(names.index(name), base)

    dirs, recipes = build(args, out, names)
    reports = {name: scores(args, name, dirs[name], out, recipes[name]) for name in names}
    rounds = speeds(args, dirs)

    rows = []
    for name in names:
        report = reports[name]
        sizes = export_bytes(dirs[name])
        row = {"variant": name, **sizes, "sentences_per_s": round(max(rounds[name]), 2),
               "sentences_per_s_rounds": [round(v, 2) for v in rounds[name]],
               "bleu": {d: report["directions"][d]["bleu"] for d in args.directions},
               "chrf": {d: report["directions"][d]["chrf"] for d in args.directions},
               "mean_bleu": report["mean"]["bleu"], "mean_chrf": report["mean"]["chrf"]}
        if name == "subset":
            held = report["subset"]["directions"]
            row["expert_bytes"] = round(sum(h["expert_bytes_held"] for h in held.values()) / len(held))
            row["file_bytes"] = sizes["file_bytes"] - sizes["expert_bytes"] + row["expert_bytes"]
            row["subset"] = {d: {k: h[k] for k in ("kept", "experts_held", "experts_total", "expert_bytes_held")}
                             for d, h in held.items()}
        else:
            config = load_export(dirs[name])[2] if name != "full" else {}
            row["kept_experts"] = config.get("pruning", {}).get("kept")
            row["coverage"] = config.get("pruning", {}).get("coverage")
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["expert_ratio"] = round(r["expert_bytes"] / base["expert_bytes"], 3)
        r["speedup"] = round(r["sentences_per_s"] / base["sentences_per_s"], 2)
        r["bleu_delta"] = {d: round(r["bleu"][d] - base["bleu"][d], 2) for d in args.directions}
        r["mean_bleu_delta"] = round(r["mean_bleu"] - base["mean_bleu"], 2)
        r["worst_bleu_delta"] = min(r["bleu_delta"].values())

    table = markdown(rows, args)
    print("\n" + table)
    meta = {"run": str(args.run), "test": args.test, "directions": args.directions, "lines": args.lines,
            "beam": args.beam, "threads": args.threads, "workers": args.workers, "speed_lines": args.speed_lines,
            "rounds": args.rounds, "subset_mass": args.subset_mass, "calibration": args.calibration,
            "calibration_lines": args.calibration_lines, "torch": torch.__version__}
    write_results(out, {"meta": meta, "rows": rows}, table)
    plot(rows, args.directions, out / "delta_bleu.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {out / 'delta_bleu.png'}")


def markdown(rows: list[dict], args) -> str:
    speed_dir = args.directions[0]
    lines = [f"| variant | file MB | expert MB | experts vs full | sent/s {speed_dir} | speed vs full | "
             + " | ".join(f"BLEU {d}" for d in args.directions) + " | mean BLEU | Δ mean | worst Δ |",
             "|" + "---|" * (9 + len(args.directions))]
    for r in rows:
        bleus = " | ".join(f"{r['bleu'][d]:.2f} ({r['bleu_delta'][d]:+.2f})" for d in args.directions)
        lines.append(f"| {r['variant']} | {r['file_bytes'] / 1e6:.2f} | {r['expert_bytes'] / 1e6:.2f} | "
                     f"{r['expert_ratio']:.3f} | {r['sentences_per_s']:.1f} | {r['speedup']:.2f}x | {bleus} | "
                     f"{r['mean_bleu']:.2f} | {r['mean_bleu_delta']:+.2f} | {r['worst_bleu_delta']:+.2f} |")
    subset = next((r for r in rows if r["variant"] == "subset"), None)
    if subset:
        lines += ["", f"subset (mass {args.subset_mass}): experts held per direction (of "
                  f"{next(iter(subset['subset'].values()))['experts_total']}): "
                  + ", ".join(f"{d} {h['experts_held']} ({h['expert_bytes_held'] / 1e6:.2f} MB)"
                              for d, h in subset["subset"].items())
                  + "; file/expert MB of the subset row are those held, averaged over the directions."]
    covered = [r for r in rows if r.get("coverage")]
    if covered:
        lines += ["", "Routing share each language keeps (calibration set; encoder layers by source, decoder "
                  "layers by target language):", ""]
        for r in covered:
            parts = [f"{layer}: " + ", ".join(f"{lang} {v:.2f}" for lang, v in langs.items())
                     for layer, langs in r["coverage"].items()]
            lines.append(f"- {r['variant']} (kept {r['kept_experts']}): " + "; ".join(parts))
    lines += ["", f"BLEU: {args.test}, first {args.lines or 'all'} lines per direction, beam {args.beam} "
              f"(ΔBLEU vs full in brackets); speed: {speed_dir}, {args.speed_lines} lines, {args.threads} "
              f"thread(s), best of {args.rounds} alternating rounds."]
    return "\n".join(lines)


def plot(rows: list[dict], directions: list[str], path: Path) -> None:
    """ΔBLEU vs the full model per direction, one group of bars per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [r for r in rows if r["variant"] != "full"]
    fig, ax = plt.subplots(figsize=(1.3 * len(shown) + 3, 4))
    width = 0.8 / len(directions)
    for j, d in enumerate(directions):
        ax.bar(np.arange(len(shown)) + (j - (len(directions) - 1) / 2) * width,
               [r["bleu_delta"][d] for r in shown], width, label=d)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xticks(range(len(shown)), [r["variant"].replace(" ", "\n") for r in shown], fontsize=8)
    ax.set_ylabel("ΔBLEU vs full")
    ax.legend(ncol=len(directions), fontsize=7, loc="lower left")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
