"""Shared fixtures (a small line-aligned corpus cut from the bundled Multi30k, a tiny trained run
and its exports) and the `gpu` marker's skip; helpers the tests import are in helpers.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

from helpers import cut_corpus, export_of, run_cli, tiny_overrides


SLOW_FIXTURES = {"trained", "exports"}
"""Fixtures that train or export a model through the console scripts: a test using one is `slow`."""


def pytest_collection_modifyitems(config, items):
    """Tests using a trained run are `slow`; `gpu` tests skip, saying why, on a machine without CUDA.
    The fast part (`pytest -m "not slow and not distributed"`) runs in about a minute."""
    import torch

    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return cut_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` once per test session -> the folder. pytest-xdist gives each worker its own
    session fixtures; what tests only read is built by the first worker to ask for it, under a lock,
    in the folder the workers share, and read by the others (the corpus it was built from is a
    byte-identical cut in each worker's own folder)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if folder.exists():  # a build that failed in another worker: start again
                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpus, cache_dir) -> Path:
    """A tiny MoE run of 12 steps with checkpoints at steps 6 and 12 (the two `train.snapshots` of
    its second half: no other save), shared by the workers (tests copy it before changing it)."""
    def train(folder: Path) -> None:
        proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, folder / "tiny", steps=12, **{
            "train.save_every": 0, "train.snapshots": 2, "train.snapshot_span": 0.5, "train.plot": "true",
            "train.valid_bleu": "final"}))
        assert proc.returncode == 0, proc.stderr[-3000:]

    return built_once(tmp_path_factory, "trained", train) / "tiny"


@pytest.fixture(scope="session")
def exports(trained, tmp_path_factory, corpus):
    """The tiny trained run exported as is (with routing statistics on the bundled val set, as
    mtmoe-export writes them), expert-pruned to 2 of 4 in each MoE layer, and int8-quantized;
    shared by the workers."""
    from mtmoe.export.pipeline import export_run

    def export(root: Path) -> None:
        full = export_of(trained, root / "full")
        export_run(full, root / "pruned", prune={"keep": 0.5, "per_layer": True, "calibration": f"{corpus}/val",
                                                 "lines": 10})
        export_run(full, root / "int8", quant="int8")

    root = built_once(tmp_path_factory, "exports", export)
    return {name: root / name for name in ("full", "pruned", "int8")}
