"""scripts/bench_scale.py's search and trial commands, without training: the search finds the
largest fit by doubling and bisecting, stops at its deadline with a lower bound, and a GPU trial is
a world-of-one `python -m mtmoe.train` capped at the asked GPU memory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "scripts" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_trial(limit: int, tried: list):
    def trial(experts):
        tried.append(experts)
        return {"experts": experts, "parameters": experts * 10**6, "fits": experts <= limit, "peak_rss_gib": 1.0,
                "peak_gpu_gib": 2.0 if experts <= limit else None, "peak_disk_gib": 0.0, "seconds": 1.0,
                "reason": None if experts <= limit else "over the GPU memory cap (CUDA out of memory)"}
    return trial


def test_search_doubles_then_bisects_to_the_largest_fit(bench, monkeypatch):
    monkeypatch.setattr(bench, "count_parameters", lambda experts: experts * 10**6)
    tried = []
    result = bench.largest_fit("gpu", fake_trial(22, tried), 8, lambda *a: None, float("inf"))
    assert tried == [8, 16, 32, 24, 20, 22]
    assert result["largest_experts"] == 22 and result["first_failure_experts"] == 24
    assert result["peak_gpu_gib"] == 2.0 and result["cut_by_deadline"] is False
    # past its deadline the search stops, its largest fit a lower bound (marked "+" in the table)
    tried = []
    cut = bench.largest_fit("gpu", fake_trial(22, tried), 8, lambda *a: None, 0.0)
    assert tried == [] and cut["cut_by_deadline"] and cut["largest_experts"] is None
    given = bench.given_sizes("zero3_cpu", fake_trial(40, tried), [64, 32], lambda *a: None, float("inf"))
    assert given["largest_experts"] == 32 and given["first_failure_experts"] == 64
    table = bench.markdown({"machine": "H100 + test", "device": "cuda", "budget_gib": 96, "gpu_gib": 8,
                            "modes": [result, {**given, "cut_by_deadline": True}]})
    assert "GPU memory capped at 8 GiB per trial" in table and "| peak GPU GiB |" in table
    assert "| gpu | 0.02 B | 22 | 2.0 | 1.0 | 0.0 | 1.00x | 24 experts: over the GPU memory cap" in table
    assert "| zero3_cpu | 0.03 B | 32+ |" in table


def test_trial_commands(bench, tmp_path):
    gpu = bench.trial_command("cuda", "zero2_cpu_adam", 16, 3, tmp_path, 8.0)
    assert gpu[:3] == [sys.executable, "-m", "mtmoe.train"]
    assert {"train.device=cuda", "train.gpu_memory_gib=8.0", "train.zero_stage=2", "train.offload_optimizer=cpu",
            "moe.num_experts=16", "train.max_steps=3", f"hydra.run.dir={tmp_path}"} <= set(gpu)
    cpu = bench.trial_command("cpu", "zero2_offload", 16, 3, tmp_path, 8.0)
    assert cpu[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"] and "--num_gpus" in cpu
    assert "train.device=cpu" in cpu and not any(a.startswith("train.gpu_memory_gib") for a in cpu)
    assert bench.failure_reason(1, "Traceback\ntorch.OutOfMemoryError: CUDA out of memory. Tried\nexit\n") == \
        "over the GPU memory cap (CUDA out of memory)"
    assert bench.failure_reason(2, "x\nConfigError: bad\n") == "exit code 2: ConfigError: bad"
