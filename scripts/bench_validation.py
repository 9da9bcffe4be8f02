"""Validation's greedy decoding: every direction in shared batches vs one direction at a time, side by side.

    python scripts/bench_validation.py                                   # tiny model, 16 lines per direction
    python scripts/bench_validation.py --set model=base --set data.val_lines=64 --device cuda

The training data of the composed mtmoe-train config (`--set` overrides; the tokenized caches are
reused) and its model with initial weights, in a world of one: an untrained model rarely emits
</s>, so each sentence decodes to its length limit, the most steps a validation takes.
`greedy_translations` (what `Trainer.validate` runs) and `greedy_translations_per_direction` (its
reference) are run `--rounds` times each, interleaved after one warm-up call of each, so a busy
machine slows both alike. Both must give the same translations, or the script fails; on a GPU at
least `CUDA_MIN_IDENTICAL` of the lines (its matrix kernels differ with the batch's shape, and an
untrained model's near-tied logits let such last-bit differences pick another token).
Writes `<out>/results.json` + `results.md` (default out: bench/validation/<model name>-<device>).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import interleaved_rounds, medians, timing_table, write_results  # noqa: E402

DEFAULT_SET = ["model=tiny", "data.val_lines=16"]
CHOICES = {"together": "greedy_translations", "per_direction": "greedy_translations_per_direction"}
CUDA_MIN_IDENTICAL = 0.95
"""The share of translations that must be identical on a GPU (on a CPU: all of them)."""


def identical_share(a: dict[str, list[str]], b: dict[str, list[str]]) -> float:
    """The share of lines, over all directions, that `a` and `b` translate alike."""
    pairs = [(x, y) for name in a for x, y in zip(a[name], b[name], strict=True)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def measure(overrides: list[str], rounds: int, device: str) -> dict:
    import torch

    from mtmoe.cli.common import compose_train_config
    from mtmoe.data.prepare import prepare_training_data
    from mtmoe.device import resolve_device
    from mtmoe.model.seq2seq import build_model
    from mtmoe.train import validation

    cfg = compose_train_config(overrides)
    torch.set_num_threads(1)
    where = resolve_device(device, "--device")
    data = prepare_training_data(cfg.data)
    model = build_model(len(data.vocab), cfg.model, cfg.moe, seed=cfg.train.seed).to(where).eval()
    max_tokens = cfg.train.max_tokens * 2  # what Trainer.validate passes
    calls = {choice: functools.partial(getattr(validation, function), model, data, max_tokens)
             for choice, function in CHOICES.items()}
    sync = torch.cuda.synchronize if where.type == "cuda" else (lambda: None)
    seconds, outputs = interleaved_rounds(calls, rounds, sync)
    identical = identical_share(outputs["together"], outputs["per_direction"])
    if identical < (CUDA_MIN_IDENTICAL if where.type == "cuda" else 1.0):
        differ = [name for name in outputs["together"] if outputs["together"][name] != outputs["per_direction"][name]]
        raise SystemExit(f"decoding the directions together changed the translations of {differ} "
                         f"({identical:.1%} of the lines identical)")
    median = medians(seconds)
    return {"overrides": overrides, "device": str(where), "model": cfg.model.name, "rounds": rounds,
            "directions": len(data.directions), "lines_per_direction": len(data.valid),
            "max_tokens": max_tokens, "seconds": seconds, "median_s": median, "identical_share": identical,
            "speedup": round(median["per_direction"] / median["together"], 2)}


def markdown(r: dict) -> str:
    return "\n".join([
        "# Validation decoding: all directions together vs one at a time (`python scripts/bench_validation.py`)", "",
        f"`{' '.join(r['overrides'])}` on {r['device']}; {r['directions']} directions x {r['lines_per_direction']} "
        f"lines, greedy, batches of {r['max_tokens'] * 4} source tokens; untrained model (decodes to the length "
        f"limit); median of {r['rounds']} interleaved rounds after a warm-up.", "",
        *timing_table("decoding", r["seconds"]), "",
        f"Together: **{r['speedup']}x** faster; {r['identical_share']:.1%} of the translations identical.", ""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", action="append", default=None, metavar="OVERRIDE",
                    help=f"Hydra overrides of mtmoe-train's config, added to {' '.join(DEFAULT_SET)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda[:N]")
    ap.add_argument("--out", default="", help="default: bench/validation/<model name>-<device type>")
    args = ap.parse_args(argv)
    result = measure([*DEFAULT_SET, *(args.set or [])], args.rounds, args.device)
    out = Path(args.out) if args.out else ROOT / "bench" / "validation" / f"{result['model']}-{result['device'].split(':')[0]}"
    write_results(out, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
