"""mtmoe-train's run dir across a refused start.

Hydra creates the run dir, writes `.hydra/{config,hydra,overrides}.yaml` and starts `train.log`
before the app's `main()` runs. A start that is refused (a bad config, bad data, resuming with
another model) must leave an existing run as it was, and no new run dir behind.

`RunDirGuard` is a Hydra callback (`hydra.callbacks` in conf/train.yaml); `on_run_start` runs
after the config is composed and before Hydra writes anything. It

- refuses, there and then, a config that `validate()` rejects, training or validation text that
  the data layer rejects (`check_training_corpus`: missing, misaligned or broken files, named with
  their line) and a resume whose model settings differ from the run's model.json, so nothing is
  written at all, before torch is imported;
- records what the run dir holds (its entries, the `.hydra` files, the length of `train.log`), so
  that a refusal found later (bad data, an unusable checkpoint) restores it (`restore_if_refused`
  around `main()`): a new run dir is removed, an existing one gets its files back.

The snapshot is dropped once the trainer accepts the run (`accepted()`, its `on_start`): from then
on the run dir is in use (a finished run's re-run gets its `.hydra` files back then). Only the
first process of a launch (RANK 0 or no launcher) snapshots and restores; Hydra multirun jobs (-m)
are checked by the trainer alone.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from mtmoe.cli.common import refusals, refuse


STARTUP_ENTRIES = (".hydra", "nvme_swap")
"""What a start writes into a run dir before the trainer accepts the run (besides `*.log`)."""


class Snapshot:
    """What a run dir held before this start: enough to undo what a refused start wrote."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.existed = run_dir.is_dir()
        self.entries = {p.name for p in run_dir.iterdir()} if self.existed else set()
        hydra_dir = run_dir / ".hydra"
        self.hydra_files = ({p.name: p.read_bytes() for p in hydra_dir.iterdir() if p.is_file()}
                            if hydra_dir.is_dir() else {})
        self.logs = {p.name: p.stat().st_size for p in run_dir.glob("*.log")} if self.existed else {}

    def restore(self) -> None:
        """Removes a run dir this start created; otherwise removes what it added (Hydra's files,
        logs, ZeRO-3 swap files; nothing else, should another program share the dir) and puts back
        the `.hydra` files and the logs' old length."""
        if not self.existed:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        if not self.run_dir.is_dir():
            return
        for p in self.run_dir.iterdir():
            if p.name in self.entries or not (p.name in STARTUP_ENTRIES or p.suffix == ".log"):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
        self.restore_hydra_files()
        for name, size in self.logs.items():
            path = self.run_dir / name
            if path.is_file() and path.stat().st_size > size:
                os.truncate(path, size)

    def restore_hydra_files(self) -> None:
        """Puts back the `.hydra` files this start replaced (and removes those it added)."""
        hydra_dir = self.run_dir / ".hydra"
        if hydra_dir.is_dir():
            for p in hydra_dir.iterdir():
                if p.is_file() and p.name not in self.hydra_files:
                    p.unlink()
        for name, data in self.hydra_files.items():
            hydra_dir.mkdir(exist_ok=True)
            (hydra_dir / name).write_bytes(data)


_snapshot: Optional[Snapshot] = None


def _first_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _preflight(config: DictConfig) -> None:
    """The checks that need no process group, before Hydra writes anything: the config, the
    training and validation text (read and checked, not tokenized), the run dir's model. A config
    or data refusal comes before the run-dir check imports torch (~3 s of CPU)."""
    from mtmoe.config import validate
    from mtmoe.data.prepare import check_training_corpus

    task = config.copy()
    with open_dict(task):
        del task["hydra"]
    cfg = OmegaConf.to_object(task)
    world = int(os.environ.get("WORLD_SIZE") or (cfg.launch.ranks if cfg.launch.ranks > 0 else 1))
    validate(cfg, world)
    check_training_corpus(cfg.data)
    from mtmoe.formats.run_description import check_same_model

    check_same_model(Path(config.hydra.run.dir).absolute(), cfg)


class RunDirGuard(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _snapshot
        try:
            _preflight(config)
        except refusals() as e:
            refuse(e)  # exit code 2; Hydra has not written anything yet
        except Exception:  # e.g. an interpolation only a running job resolves: the trainer checks it
            pass
        if _first_process():
            _snapshot = Snapshot(Path(config.hydra.run.dir).absolute())


def accepted(finished: bool = False) -> None:
    """The trainer accepted the run: from now on the run dir is in use and kept as it is.

    `finished`: the run had already trained to its budget, and this start changes nothing, so its
    `.hydra` files go back to those of the run that wrote the results (this start's overrides, say
    another `train.lr`, never took effect); its lines in train.log stay."""
    global _snapshot
    if finished and _snapshot is not None and _snapshot.existed:
        _snapshot.restore_hydra_files()
    _snapshot = None


def refused() -> None:
    """The start was refused: the run dir goes back to what it was (once)."""
    global _snapshot
    if _snapshot is not None:
        _snapshot.restore()
        _snapshot = None


def restore_if_refused(fn):
    """Around the train app's main(): a refusal restores the run dir as it was before this start."""
    refused_errors = refusals()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except refused_errors:
            refused()
            raise

    return wrapper
