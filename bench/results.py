"""How every benchmark under scripts/ leaves its figures: `<out>/results.json` (the numbers, for
tools) beside `<out>/results.md` (the table, for people).

Each file is replaced whole (`mtmoe.formats.integrity.write_atomic`), the JSON first: a benchmark
killed mid-write (most run for minutes, some rewrite their files after each mode to keep what they
measured) leaves the previous figures or the new ones, never a truncated file, and the table never
describes numbers that were not written."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from mtmoe.formats.integrity import write_atomic


def write_results(out: Path, results, table: str) -> Path:
    """Writes `results` (anything `json` encodes; other values as `str`) and the markdown `table`
    into the folder `out` (created) -> `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    write_atomic(out / "results.md", table if table.endswith("\n") else table + "\n")
    return out


def interleaved_rounds(calls: dict[str, Callable[[], object]], rounds: int,
                       sync: Callable[[], None] = lambda: None) -> tuple[dict[str, list[float]], dict[str, object]]:
    """({name: seconds of each timed round}, {name: what its last call returned}): every call once to
    warm up, then `rounds` rounds of all of them in turn, so a busy machine slows each alike. `sync`
    runs before a call's clock stops (a GPU's queue)."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    outputs: dict[str, object] = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name, call in calls.items():
            started = time.perf_counter()
            outputs[name] = call()
            sync()
            took = time.perf_counter() - started
            if r:
                seconds[name].append(took)
            print(f"round {r} {name}: {took:.2f} s", flush=True)
    return seconds, outputs


def medians(seconds: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(times) for name, times in seconds.items()}


def timing_table(label: str, seconds: dict[str, list[float]]) -> list[str]:
    """Markdown rows: per choice (`label` names the column), the median and every round's seconds."""
    median = medians(seconds)
    return [f"| {label} | seconds (median) | rounds |", "|---|---:|---|",
            *[f"| {name} | {median[name]:.2f} | {', '.join(f'{s:.2f}' for s in times)} |"
              for name, times in seconds.items()]]
