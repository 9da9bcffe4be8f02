"""scripts/bench_zero3_validation.py: both ZeRO-3 validation choices timed in one process, their
results checked equal, and the table + JSON written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT, clean_env

pytestmark = pytest.mark.slow


def test_times_both_choices_and_checks_they_agree(corpus, cache_dir, tmp_path):
    out = tmp_path / "bench"
    sets = ["model=tiny", f"data.corpus_dir={corpus}", f"data.cache_dir={cache_dir}", "data.vocab_size=300",
            "data.val_lines=2", "data.max_len=16", "train.max_tokens=256", "data.directions='en-de,de-en'"]
    proc = subprocess.run([sys.executable, "scripts/bench_zero3_validation.py", "--rounds", "1", "--out", str(out),
                           *[f"--set={s}" for s in sets]],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["model"] == "tiny" and result["directions"] == 2 and result["lines_per_direction"] == 2
    assert all(len(result["seconds"][c]) == 1 and result["median_s"][c] > 0 for c in ("partitioned", "whole"))
    assert result["speedup"] > 0 and result["valid_bleu"] is not None
    assert "| whole |" in (out / "results.md").read_text()
