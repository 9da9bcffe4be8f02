"""Shared fixtures: a small line-aligned corpus cut from the bundled Multi30k, and helpers to run
the mtmoe console scripts (world of one) and the `deepspeed` launcher (2 CPU ranks)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "data" / "multi30k"
LANGS = ["en", "de", "fr", "cs"]
BIN = Path(sys.executable).parent


def cut_corpus(out: Path, train_lines: int = 400, val_lines: int = 30, test_lines: int = 20) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_lines), ("val", val_lines), ("test_2016_flickr", test_lines)):
        for lang in LANGS:
            with gzip.open(BUNDLED / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [next(f).strip() for _ in range(n)]
            (out / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip, saying why, on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return cut_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_overrides(corpus: Path, cache_dir: Path, run_dir: Path, steps: int = 12, **extra) -> list[str]:
    """A seconds-scale training config on the small corpus."""
    args = {
        "model": "tiny", "data.corpus_dir": str(corpus), "data.vocab_size": 300, "data.cache_dir": str(cache_dir),
        "data.val_lines": 8, "train.max_steps": steps, "train.max_minutes": 0, "train.max_tokens": 256,
        "train.warmup_steps": 5, "train.log_every": 2, "train.valid_every": 0, "train.save_every": 0,
        "train.progress": "false", "wandb.mode": "disabled", "hydra.run.dir": str(run_dir),
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpus, cache_dir) -> Path:
    """A tiny MoE run of 12 steps with checkpoints every 6 (tests copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, steps=12, **{"train.save_every": 6}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def export_of(trained: Path, out: Path) -> Path:
    proc = run_cli("mtmoe-export", [f"checkpoint={trained}", f"out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra) -> dict:
    """The environment minus a process group's variables (a test that built a Trainer in-process
    has set them), so each child starts its own world."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_cli(name: str, args: list[str], stdin: str | None = None, timeout: int = 600, env_extra=None):
    env = clean_env(**(env_extra or {}))
    return subprocess.run([str(BIN / name), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def deepspeed_command(module: str, args: list[str], num_ranks: int = 2) -> list[str]:
    """A `deepspeed` launch on a free port (another launch on this box, e.g. a sweep, may hold 29500)."""
    from mtmoe.train.distributed import free_port

    return [str(BIN / "deepspeed"), "--no_local_rank", "--num_gpus", str(num_ranks), "--master_port",
            str(free_port()), "--module", module, *args]


def run_deepspeed(module: str, args: list[str], num_ranks: int = 2, timeout: int = 900):
    env = clean_env()
    cmd = deepspeed_command(module, args, num_ranks)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="session")
def exports(trained, tmp_path_factory, corpus):
    """The tiny trained run exported as is (with routing statistics on the bundled val set, as
    mtmoe-export writes them), expert-pruned to 2 of 4 in each MoE layer, and int8-quantized."""
    from mtmoe.export.pipeline import export_run

    root = tmp_path_factory.mktemp("exports")
    full = export_of(trained, root / "full")
    pruned = export_run(full, root / "pruned", prune={"keep": 0.5, "per_layer": True, "calibration": f"{corpus}/val",
                                                      "lines": 10})
    int8 = export_run(full, root / "int8", quant="int8")
    return {"full": full, "pruned": pruned, "int8": int8}
