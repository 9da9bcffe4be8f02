"""DeepSpeed checkpoints of a run: `RUN_DIR/checkpoints/<tag>/` plus DeepSpeed's `latest` file,
and the run's model description (`RUN_DIR/model.json`, `RUN_DIR/spm.model`) that export reads.

The mtmoe training state (step, data-stream position, wandb id, time spent) travels in DeepSpeed's
`client_state` and is mirrored to `<tag>/mtmoe_state.json` for people and tools.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from mtmoe.train.distributed import barrier

log = logging.getLogger("mtmoe")

MODEL_JSON = "model.json"


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint; the message names the path."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_tag(run_dir: Path) -> Optional[str]:
    latest = checkpoint_dir(run_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise CheckpointError(f"{latest} names checkpoint {tag!r}, but {checkpoint_dir(run_dir) / tag} is missing")
    return tag


def save(engine, run_dir: Path, step: int, state: dict, keep: int, is_writer: bool) -> str:
    """Saves on every rank (DeepSpeed writes each rank's experts), then prunes old tags."""
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, client_state={"mtmoe": state})
    barrier()
    if is_writer:
        (checkpoint_dir(run_dir) / tag / "mtmoe_state.json").write_text(json.dumps(state, indent=1))
        tags = sorted(p.name for p in checkpoint_dir(run_dir).iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(checkpoint_dir(run_dir) / old, ignore_errors=True)
    barrier()
    return tag


def load(engine, run_dir: Path) -> Optional[dict]:
    """Loads the latest checkpoint of the run into `engine`; returns its mtmoe state (None when
    the run has no checkpoint yet)."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    try:
        path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as e:
        raise CheckpointError(f"{checkpoint_dir(run_dir) / tag}: cannot load checkpoint ({type(e).__name__}: {e})") from e
    if path is None or not client_state or "mtmoe" not in client_state:
        raise CheckpointError(f"{checkpoint_dir(run_dir) / tag}: not an mtmoe checkpoint (no training state)")
    return client_state["mtmoe"]


def write_model_description(run_dir: Path, vocab_path: Path, vocab_size: int, langs: list[str],
                            model_cfg, moe_cfg) -> None:
    """What export needs besides weights: architecture, vocabulary, languages."""
    shutil.copyfile(vocab_path, run_dir / "spm.model")
    desc = {"vocab_size": vocab_size, "langs": list(langs), "model": asdict(model_cfg), "moe": asdict(moe_cfg)}
    (run_dir / MODEL_JSON).write_text(json.dumps(desc, indent=1))
