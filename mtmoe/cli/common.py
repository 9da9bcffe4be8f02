"""Shared CLI plumbing: config registration, the run-dir resolver, friendly errors."""

from __future__ import annotations

import functools
import os
import sys
import time

from omegaconf import OmegaConf

from mtmoe.config import ConfigError, register_configs
from mtmoe.data.corpus import CorpusError


def run_stamp() -> str:
    """A time stamp for the default run dir that every rank of one launch agrees on.

    Under the `deepspeed` launcher all local ranks are children of one launcher process, so its
    start time names the run; a world of one uses the current time."""
    started = time.time()
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            import psutil

            started = psutil.Process(os.getppid()).create_time()
        except Exception:
            pass
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))


def setup() -> None:
    register_configs()
    if not OmegaConf.has_resolver("mtmoe_run_stamp"):
        OmegaConf.register_new_resolver("mtmoe_run_stamp", run_stamp, use_cache=True)


def friendly_errors(fn):
    """Known errors become one line on stderr and no traceback: bad input or config (exit code 2),
    a diverged run (exit code 3)."""
    from mtmoe.export.artifact import ExportError
    from mtmoe.train.checkpoint import CheckpointError
    from mtmoe.train.guard import TrainingDiverged

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, CorpusError, CheckpointError, ExportError) as e:
            print(f"mtmoe: error: {e}", file=sys.stderr)
            sys.exit(2)
        except TrainingDiverged as e:
            print(f"mtmoe: error: {e}", file=sys.stderr)
            sys.exit(3)

    return wrapper
