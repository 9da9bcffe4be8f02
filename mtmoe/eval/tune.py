"""Decoding settings picked on a held-out set (`mtmoe-eval tune.on=data/multi30k/val`), not on the test.

Every (beam, length penalty) of the grid is scored on the first `tune.lines` lines of each scored
direction of the held-out set; the setting with the best mean BLEU over those directions (ties: the
first in grid order, beams outer) is the one the test set is then decoded with. Each beam size is one
decoding (`evaluate_penalties`): the length penalty only ranks the finished hypotheses of a search, so
all penalties of the grid come from the same search. Serving and subset options apply to the tuning as
to the test.
"""

from __future__ import annotations

from typing import Optional, Sequence

from mtmoe.config import ServeConfig, SubsetConfig, TuneConfig
from mtmoe.eval.run import evaluate_penalties, select_directions
from mtmoe.formats.export_format import read_export_config
from mtmoe.paths import resolve
from mtmoe.scoring import summarize


def tune_decoding(model_dir, tune: TuneConfig, beam: int, test: str, langs: Optional[Sequence[str]] = None,
                  directions=None, max_tokens: int = 4096, workers: int = 1, threads: int = 0,
                  serve: Optional[ServeConfig] = None, subset: Optional[SubsetConfig] = None, device="cpu") -> dict:
    """-> {"on", "lines", "directions", "grid": [{"beam", "length_penalty", "bleu", "chrf", "directions":
    {name: bleu}}], "beam", "length_penalty"} (the picked setting last). The scored directions are the
    ones `test` would score (`select_directions`); the held-out set `tune.on` must have their languages."""
    pairs = select_directions(read_export_config(str(resolve(model_dir))), test, langs, directions)
    names = [f"{s}-{t}" for s, t in pairs]
    grid = []
    for b in tune.beams or [beam]:
        reports = evaluate_penalties(model_dir, tune.on, tune.length_penalties, directions=names, beam=b,
                                     max_tokens=max_tokens, limit=tune.lines, workers=workers, threads=threads,
                                     serve=serve, subset=subset, device=device)
        for lp, report in zip(tune.length_penalties, reports):
            scored = {**report["directions"], **report.get("zero_shot", {}).get("directions", {})}
            mean = summarize(scored)
            grid.append({"beam": b, "length_penalty": lp, "bleu": mean["bleu"], "chrf": mean["chrf"],
                         "directions": {name: scored[name]["bleu"] for name in names}})
    best = max(grid, key=lambda g: g["bleu"])  # max keeps the first of equals
    return {"on": str(tune.on), "lines": tune.lines, "directions": names, "grid": grid,
            "beam": best["beam"], "length_penalty": best["length_penalty"]}


def format_tuning(tuned: dict) -> str:
    """The grid as a table, the picked setting marked."""
    lines = [f"decoding settings tuned on {tuned['on']} ({tuned['lines'] or 'all'} lines per direction, "
             f"mean over {', '.join(tuned['directions'])})", f"{'beam':>4} {'len.pen.':>8} {'BLEU':>7} {'chrF':>7}"]
    for g in tuned["grid"]:
        picked = "  <- picked" if (g["beam"], g["length_penalty"]) == (tuned["beam"], tuned["length_penalty"]) else ""
        lines.append(f"{g['beam']:>4} {g['length_penalty']:>8.2f} {g['bleu']:>7.2f} {g['chrf']:>7.2f}{picked}")
    return "\n".join(lines)
