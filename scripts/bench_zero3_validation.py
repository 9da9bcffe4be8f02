"""ZeRO-3 validation: the partitioned model vs a gathered whole copy (`train.valid_model`), side by side.

    python scripts/bench_zero3_validation.py                       # tiny model, 16 lines per direction
    python scripts/bench_zero3_validation.py --set model=base --rounds 3

One training process in a world of one under ZeRO-3 with parameters and Adam state on the CPU
(`parallel=zero3_nvme train.offload_param=cpu train.offload_optimizer=cpu`), the trainer's own
end-of-run validation (`Trainer.validate(final=True)`: per-direction loss and greedy BLEU/chrF) run
`--rounds` times per choice, the choices interleaved (partitioned, whole, partitioned, ...) after one
warm-up call of each, so a busy machine slows both alike. The model is the untrained initial one: it
rarely emits </s>, so greedy decoding runs to the length limit (`data.max_len`), the most decoder
steps a validation can take. Both choices must give the same results, or the script fails.
Writes `<out>/results.json` + `results.md` (default out: bench/zero3_validation/<model name>).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import interleaved_rounds, medians, timing_table, write_results  # noqa: E402

LAYOUT = ["parallel=zero3_nvme", "train.offload_param=cpu", "train.offload_optimizer=cpu", "train.device=cpu"]
DEFAULT_SET = ["model=tiny", "data.val_lines=16", "data.max_len=64"]
CHOICES = ("partitioned", "whole")


def measure(overrides: list[str], rounds: int) -> dict:
    import torch

    from mtmoe.cli.common import compose_train_config
    from mtmoe.train.trainer import Trainer

    cfg = compose_train_config([*LAYOUT, *overrides, "train.max_steps=1", "train.max_minutes=0", "train.progress=false",
                                "train.valid_bleu=final", "wandb.mode=disabled"])
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")

        def validate(choice: str) -> dict:
            cfg.train.valid_model = choice  # the layout reads it at each validation
            return trainer.validate(final=True)

        seconds, results = interleaved_rounds({c: functools.partial(validate, c) for c in CHOICES}, rounds)
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
    if results["whole"]["directions"] != results["partitioned"]["directions"]:
        raise SystemExit("the whole copy's validation differs from the partitioned model's")
    median = medians(seconds)
    return {"overrides": [*LAYOUT, *overrides], "parameters": parameters, "rounds": rounds,
            "directions": len(results["whole"]["directions"]), "lines_per_direction": cfg.data.val_lines,
            "seconds": seconds, "median_s": median, "speedup": round(median["partitioned"] / median["whole"], 2),
            "valid_loss": results["whole"]["valid_loss"], "valid_bleu": results["whole"].get("valid_bleu"),
            "model": cfg.model.name}


def markdown(r: dict) -> str:
    return "\n".join([
        "# ZeRO-3 validation: partitioned model vs gathered whole copy (`python scripts/bench_zero3_validation.py`)", "",
        f"World of one on the CPU, `{' '.join(r['overrides'])}`; {r['parameters'] / 1e6:.2f} M parameters; "
        f"{r['directions']} directions x {r['lines_per_direction']} lines, loss + greedy BLEU; untrained model "
        f"(decodes to the length limit); median of {r['rounds']} interleaved rounds after a warm-up.", "",
        *timing_table("train.valid_model", r["seconds"]), "",
        f"Whole copy: **{r['speedup']}x** faster, identical results (valid loss {r['valid_loss']}).", ""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", action="append", default=None, metavar="OVERRIDE",
                    help=f"Hydra overrides on top of the layout and of {' '.join(DEFAULT_SET)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="", help="default: bench/zero3_validation/<model name>")
    args = ap.parse_args(argv)
    result = measure([*DEFAULT_SET, *(args.set or [])], args.rounds)
    out = Path(args.out) if args.out else ROOT / "bench" / "zero3_validation" / result["model"]
    write_results(out, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
