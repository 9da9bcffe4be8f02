"""A training run's `model.json` (+ `spm.model`): what export needs besides weights, and what
a resume must not change.

model.json holds the architecture (`model`, `moe`), the vocabulary size and the `data.*`
settings that made the vocabulary, the languages, and what the run trains on (`training`).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import yaml

from mtmoe.config import RUN_DEFINING
from mtmoe.data.vocab import Vocab
from mtmoe.errors import ConfigError
from mtmoe.formats.ds_checkpoint import complete_tags
from mtmoe.formats.integrity import copy_atomic, write_atomic

MODEL_JSON = "model.json"


def describe_run(cfg, vocab_size: int, sources=()) -> dict:
    """The run's model.json: what export needs besides weights (architecture, vocabulary size,
    languages), the `data.*` settings that made the vocabulary, and what the run trains on:
    `training.directions` (translation directions) and `training.tasks` ({task: source labels})."""
    tasks: dict[str, list[str]] = {}
    for source in sources:
        tasks.setdefault(source.task, []).append(source.label)
    return {"vocab_size": vocab_size, "langs": list(cfg.data.langs), **_settings(cfg),
            "training": {"directions": tasks.get("translation", []), "tasks": tasks}}


def read_description(run_dir: Path) -> Optional[dict]:
    """The run's model.json (None when it has none or it is unreadable)."""
    try:
        return json.loads((run_dir / MODEL_JSON).read_text())
    except (OSError, ValueError):
        return None


def merged_training(old: Optional[dict], new: dict) -> dict:
    """A resumed run's training record: what it trained on before plus what it trains on now."""
    if not old:
        return new
    tasks = {name: list(labels) for name, labels in old.get("tasks", {}).items()}
    for name, labels in new["tasks"].items():
        tasks[name] = tasks.get(name, []) + [x for x in labels if x not in tasks.get(name, [])]
    return {"directions": tasks.get("translation", []), "tasks": tasks}


def _settings(cfg) -> dict:
    """model.json's `model`, `moe` and `vocab` sections for a training config."""
    return {"model": asdict(cfg.model), "moe": asdict(cfg.moe),
            "vocab": {k: getattr(cfg.data, k) for k in RUN_DEFINING["vocab"]}}


def model_conflicts(run_dir: Path, cfg) -> list[str]:
    """The weight-defining settings of `cfg` (`config.RUN_DEFINING`, and data.langs) that differ from
    those the run recorded in model.json, as `model.d_model=256 (the run has 32)`. Empty when the
    run has no checkpoint to resume or no model.json."""
    recorded = read_description(run_dir)
    if recorded is None or not cfg.train.resume or not complete_tags(run_dir):
        return []
    requested = _settings(cfg)
    out = []
    if list(cfg.data.langs) != list(recorded.get("langs", [])):
        out.append(f"data.langs={list(cfg.data.langs)} (the run has {recorded.get('langs')})")
    for section, keys in RUN_DEFINING.items():
        if section not in recorded:  # runs from before the vocabulary settings were recorded
            continue
        prefix = "data" if section == "vocab" else section
        for key in keys:
            if key in recorded[section] and requested[section][key] != recorded[section][key]:
                out.append(f"{prefix}.{key}={requested[section][key]} (the run has {recorded[section][key]})")
    return out


def check_same_model(run_dir: Path, cfg, vocab=None) -> None:
    """ConfigError (one line) when resuming `run_dir` with `cfg` would build another model than the
    one its checkpoints hold: the differing settings and how to resume it (the run's recorded Hydra
    overrides). With `vocab`, also when its pieces differ from the run's spm.model. Nothing is
    written, so the run stays as it was."""
    conflicts = model_conflicts(run_dir, cfg)
    if not conflicts and vocab is not None and complete_tags(run_dir) and cfg.train.resume \
            and (run_dir / "spm.model").is_file():
        if Vocab(run_dir / "spm.model").pieces() != vocab.pieces():
            conflicts.append(f"the vocabulary (data.corpus_dir / data.train_prefix / data.max_train_lines "
                             f"give another one than the run's {run_dir / 'spm.model'})")
    if not conflicts:
        return
    hint = "repeat the settings it was trained with"
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        try:
            recorded = [str(o) for o in yaml.safe_load(overrides.read_text()) or []]
            hint += f" (its overrides, from {overrides}: {shlex.join(recorded) or 'none'})"
        except (yaml.YAMLError, TypeError):
            pass
    raise ConfigError(f"{run_dir} holds checkpoints of another model: {', '.join(conflicts)}. To resume it, "
                      f"{hint}; for a new run, give another hydra.run.dir")


def write_model_description(run_dir: Path, vocab_path: Path, desc: dict) -> None:
    """Writes the run's model.json (`describe_run`) and its spm.model."""
    copy_atomic(vocab_path, run_dir / "spm.model")
    write_atomic(run_dir / MODEL_JSON, json.dumps(desc, indent=1))
