"""scripts/train_step_profile.py on the CPU: each variant runs the trainer's real step in a process of its own
and the table reports its wall time, throughput and op count (the GPU columns stay empty here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT, clean_env

pytestmark = pytest.mark.slow


def test_profiles_two_variants_side_by_side(corpus, cache_dir, tmp_path):
    out = tmp_path / "profile"
    base = ["model=tiny", f"data.corpus_dir={corpus}", f"data.cache_dir={cache_dir}", "data.vocab_size=300",
            "data.val_lines=8", "train.max_tokens=256", "train.device=cpu"]
    proc = subprocess.run([sys.executable, "scripts/train_step_profile.py", "--steps", "3", "--warmup", "1",
                           "--profile-steps", "1", "--variant", "plain:", "--variant", "dropout:model.dropout=0.1",
                           "--env", "dropout:MTMOE_PROFILE_PROBE=given",
                           "--out", str(out), *[f"--set={s}" for s in base]],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == ["plain", "dropout"]
    for r in results:
        assert r["device"] == "cpu" and r["steps"] == 3 and r["ms_per_step"] > 0
        assert r["target_tokens_per_s"] > 0 and r["ops_per_step"] > 50 and r["top_ops_host_ms_per_step"]
        assert r["kernel_ms_per_step"] is None and r["syncs_per_step"] is None
    assert results[1]["overrides"][-1] == "model.dropout=0.1"
    assert results[0]["env"] == {} and results[1]["env"] == {"MTMOE_PROFILE_PROBE": "given"}  # seen by its process
    table = (out / "results.md").read_text()
    assert "| plain |" in table and "| dropout |" in table
    assert "- dropout: `MTMOE_PROFILE_PROBE=given model.dropout=0.1`" in table
