"""Shared CLI plumbing: config registration, the run-dir resolver, friendly errors, the tools' log format."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from typing import NoReturn, Sequence

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from mtmoe.config import TrainAppConfig, register_configs
from mtmoe.errors import CheckpointError, ConfigError, CorpusError, ExportError, TrainingDiverged
from mtmoe.paths import CONF_DIR


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


def compose_train_config(overrides: Sequence[str] = ()) -> TrainAppConfig:
    """The mtmoe-train config the shipped YAML and `overrides` compose, not validated (the trainer
    validates it): for scripts, benchmarks and tests that build a trainer or model in-process."""
    setup()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=list(overrides)))


def refusals() -> tuple[type[BaseException], ...]:
    """The errors that mean "bad input or config": one line and exit code 2, never a traceback."""
    return ConfigError, CorpusError, CheckpointError, ExportError, MissingMandatoryValue


def refuse(e: BaseException) -> NoReturn:
    """Prints a refusal as one line on stderr and exits with code 2."""
    if isinstance(e, MissingMandatoryValue):
        print(f"mtmoe: error: {e.full_key} is required: give {e.full_key}=... on the command line "
              f"(--help lists the options)", file=sys.stderr)
    else:
        print(f"mtmoe: error: {e}", file=sys.stderr)
    sys.exit(2)


def friendly_errors(fn):
    """Known errors become one line on stderr and no traceback: bad input or config (exit code 2),
    a diverged run (exit code 3)."""
    refused = refusals()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except refused as e:
            refuse(e)
        except TrainingDiverged as e:
            print(f"mtmoe: error: {e}", file=sys.stderr)
            sys.exit(3)

    return wrapper


class CliFormatter(logging.Formatter):
    """Log lines of the tools (eval, export, translate) on stderr: plain messages, warnings and
    errors marked like the tools' own errors (`mtmoe: warning: ...`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"mtmoe: {record.levelname.lower()}: {message}"
        return message
