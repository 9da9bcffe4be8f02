"""How every benchmark under scripts/ leaves its figures: `<out>/results.json` (the numbers, for
tools) beside `<out>/results.md` (the table, for people).

Each file is replaced whole (`mtmoe.formats.integrity.write_atomic`), the JSON first: a benchmark
killed mid-write (most run for minutes, some rewrite their files after each mode to keep what they
measured) leaves the previous figures or the new ones, never a truncated file, and the table never
describes numbers that were not written."""

from __future__ import annotations

import json
from pathlib import Path

from mtmoe.formats.integrity import write_atomic


def write_results(out: Path, results, table: str) -> Path:
    """Writes `results` (anything `json` encodes; other values as `str`) and the markdown `table`
    into the folder `out` (created) -> `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    write_atomic(out / "results.md", table if table.endswith("\n") else table + "\n")
    return out
