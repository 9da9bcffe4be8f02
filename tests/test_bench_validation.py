"""scripts/bench_validation.py: validation's decoding of all directions together timed beside one
direction at a time in one process, their translations checked equal, and the table + JSON written."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from helpers import ROOT, clean_env

pytestmark = pytest.mark.slow


def test_times_both_decodings_and_checks_they_agree(corpus, cache_dir, tmp_path):
    out = tmp_path / "bench"
    sets = [f"data.corpus_dir={corpus}", f"data.cache_dir={cache_dir}", "data.vocab_size=300", "data.val_lines=4"]
    proc = subprocess.run([sys.executable, "scripts/bench_validation.py", "--rounds", "1", "--out", str(out),
                           *[f"--set={s}" for s in sets]],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["model"] == "tiny" and result["device"] == "cpu"
    assert result["directions"] == 12 and result["lines_per_direction"] == 4
    assert all(len(result["seconds"][c]) == 1 and result["median_s"][c] > 0 for c in ("together", "per_direction"))
    assert result["identical_share"] == 1.0  # on a CPU the script fails on any difference
    assert "| per_direction |" in (out / "results.md").read_text()


def test_identical_share_counts_lines_over_all_directions():
    """What a GPU run's check reads (there, a few last-bit differences may pick another token)."""
    spec = importlib.util.spec_from_file_location("bench_validation", ROOT / "scripts" / "bench_validation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = {"en-de": ["a", "b", "c"], "de-en": ["d"]}
    assert bench.identical_share(a, a) == 1.0
    assert bench.identical_share(a, {"en-de": ["a", "x", "c"], "de-en": ["y"]}) == 0.5
    with pytest.raises(ValueError):  # a direction that lost a line is not a share
        bench.identical_share(a, {"en-de": ["a"], "de-en": ["d"]})
