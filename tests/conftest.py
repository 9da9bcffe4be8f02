"""Shared fixtures (a small line-aligned corpus cut from the bundled Multi30k, a tiny trained run
and its exports) and the `gpu` marker's skip; helpers the tests import are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpus, cache_dir) -> Path:
    """A tiny MoE run of 12 steps with checkpoints every 6 (tests copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    proc = run_cli("mtmoe-train", tiny_overrides(corpus, cache_dir, run_dir, steps=12,
                                                 **{"train.save_every": 6, "train.plot": "true"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


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
