"""Crash-safe DeepSpeed checkpoints of a run, and the run's model description for export.

Layout of `RUN_DIR/checkpoints/`:

    step00000400/            one complete checkpoint (DeepSpeed's files + mtmoe_state.json + manifest.json)
    step00000600/
    latest                   the tag to resume from, written last
    .partial-step00000800/   a save in progress (or one a crash interrupted; removed on the next start)

A save writes into `.partial-<tag>/` on every rank, fsyncs, then rank 0 writes `manifest.json`
(size and sha256 of every file), renames the directory to `<tag>` and only then replaces `latest`
(write-to-temp + rename). A kill at any point leaves either the old checkpoints untouched or a new
one that is complete: a directory named `step*` always has its manifest. Loading verifies the
manifest; a truncated or corrupt checkpoint is skipped with a warning and the previous one is used.

The mtmoe training state (step, data-stream position, wandb id, time spent) travels in DeepSpeed's
`client_state` and is mirrored to `<tag>/mtmoe_state.json` for people and tools. Shared storage
across nodes is assumed (as DeepSpeed assumes by default): rank 0 renames what all ranks wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from mtmoe.config import RUN_DEFINING, ConfigError
from mtmoe.train.distributed import any_rank, barrier, broadcast_object, is_first_rank

log = logging.getLogger("mtmoe")

MODEL_JSON = "model.json"
MANIFEST = "manifest.json"
STATE_JSON = "mtmoe_state.json"
PARTIAL_PREFIX = ".partial-"


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint; the message names the path."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(run_dir: Path) -> list[str]:
    """Finished checkpoint tags of the run, oldest first (staging directories excluded)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))


def latest_tag(run_dir: Path) -> Optional[str]:
    """The tag `latest` names (None when the run has no checkpoint)."""
    latest = checkpoint_dir(run_dir) / "latest"
    if not latest.is_file():
        return None
    return latest.read_text().strip() or None


# -- integrity --------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Makes a rename or new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        _fsync_file(path)
    except OSError:
        pass


def write_atomic(path: Path, text: str) -> None:
    """Replaces `path` with `text` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_manifest(tag_dir: Path) -> dict:
    files = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(tag_dir))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": 1, "files": files}
    write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify(tag_dir: Path, check_hashes: bool = True) -> Optional[str]:
    """None when `tag_dir` matches its manifest, else the first problem (naming the file).

    A checkpoint without a manifest (written before manifests existed) is accepted unverified."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        return None if (tag_dir / STATE_JSON).is_file() else f"{tag_dir}: no {MANIFEST} (incomplete save)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, OSError) as e:
        return f"{manifest_path}: unreadable manifest ({e})"
    for name, expected in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated?)"
        if check_hashes and _sha256(path) != expected["sha256"]:
            return f"{path}: sha256 differs from the manifest (corrupt)"
    return None


# -- save -------------------------------------------------------------------------------------------
def remove_stale_partials(run_dir: Path) -> None:
    """Deletes staging directories a killed save left behind (call on one rank, before saving)."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(PARTIAL_PREFIX):
                log.warning("removing %s (a save that did not finish)", p)
                shutil.rmtree(p, ignore_errors=True)


def save(engine, run_dir: Path, step: int, state: dict, keep: int, is_writer: bool) -> str:
    """Saves on every rank (DeepSpeed writes each rank's experts and optimizer shards) into a
    staging directory, then rank 0 seals it (manifest, rename, `latest`) and prunes old tags."""
    tag = tag_for_step(step)
    root = checkpoint_dir(run_dir)
    staging = root / f"{PARTIAL_PREFIX}{tag}"
    if is_writer:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=staging.name, client_state={"mtmoe": state}, save_latest=False)
    for path in staging.rglob("*"):  # each rank makes what it wrote durable (cheap for the rest)
        if path.is_file():
            _fsync_file(path)
    barrier()
    if is_writer:
        write_atomic(staging / STATE_JSON, json.dumps(state, indent=1))
        write_manifest(staging)
        final = root / tag
        if final.exists():  # re-saving a step (e.g. a resumed run that ended where it began)
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
        write_atomic(root / "latest", tag)
        tags = complete_tags(run_dir)
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(root / old, ignore_errors=True)
    barrier()
    return tag


# -- load -------------------------------------------------------------------------------------------
def _candidates(run_dir: Path) -> list[str]:
    """Tags to try, best first: the one `latest` names, then the others newest first."""
    tags = complete_tags(run_dir)[::-1]
    named = latest_tag(run_dir)
    if named is not None and named not in tags:
        log.warning("%s names checkpoint %r, which is missing; using the newest complete one",
                    checkpoint_dir(run_dir) / "latest", named)
    if named in tags:
        tags.remove(named)
        tags.insert(0, named)
    return tags


def _prepare_layout(tag_dir: Path, layout: Optional[dict], moe_shape: tuple[int, int]) -> str:
    """The tag DeepSpeed should load: `tag_dir` itself, or a resharded copy of it when the
    expert-parallel size changed (written by rank 0). CheckpointError when the change is impossible."""
    from mtmoe.train.reshard import ReshardError, check_resumable, reshard_checkpoint, saved_layout

    error, load_tag = None, tag_dir.name
    if is_first_rank() and layout is not None and (tag_dir / STATE_JSON).is_file():
        try:
            if check_resumable(saved_layout(tag_dir), layout, tag_dir):
                staging = tag_dir.parent / f"{PARTIAL_PREFIX}reshard-{tag_dir.name}"
                reshard_checkpoint(tag_dir, staging, layout["ep_size"], *moe_shape)
                load_tag = staging.name
        except (ReshardError, OSError, RuntimeError, ValueError) as e:
            error = str(e)
    error, load_tag = broadcast_object((error, load_tag))
    if error:
        raise CheckpointError(f"cannot resume at this layout: {error}")
    return load_tag


def load(engine, run_dir: Path, check_hashes: bool = True, layout: Optional[dict] = None,
         moe_shape: tuple[int, int] = (1, 0)) -> Optional[dict]:
    """Loads the newest good checkpoint of the run into `engine` and returns its mtmoe state (None
    when the run has no checkpoint yet). A checkpoint that fails verification or loading is skipped
    with a warning; CheckpointError when none is usable. Every rank takes the same decision.

    `layout` (world_size, ep_size, zero_stage, accumulate) is the layout resuming; a ZeRO-0
    checkpoint written with another ep_size is resharded on the way in (`moe_shape` = experts per
    MoE layer, number of MoE layers)."""
    first = is_first_rank()
    candidates = broadcast_object(_candidates(run_dir) if first else None)
    if not candidates:
        return None
    problems = []
    for tag in candidates:
        tag_dir = checkpoint_dir(run_dir) / tag
        problem = broadcast_object(verify(tag_dir, check_hashes) if first else None)
        state, error, misfit = None, None, None
        if problem is None:
            load_tag = _prepare_layout(tag_dir, layout, moe_shape)
            try:
                path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=load_tag,
                                                            load_optimizer_states=True, load_lr_scheduler_states=True)
                if path is None or not client_state or "mtmoe" not in client_state:
                    error = f"{tag_dir}: not an mtmoe checkpoint (no training state)"
                else:
                    state = client_state["mtmoe"]
                    from mtmoe.train.zero3_swap import needs_swapped_restore, restore_swapped_partitions

                    if needs_swapped_restore(engine):
                        restore_swapped_partitions(engine, checkpoint_dir(run_dir) / load_tag)
            except Exception as e:
                misfit = summarize_load_error(str(e))
                error = (f"{tag_dir} does not fit the model of this config ({misfit}): the checkpoint is intact, "
                         f"it was written for another model; resume with the settings the run was trained with"
                         if misfit else f"{tag_dir}: cannot load checkpoint ({type(e).__name__}: {e})")
            if load_tag != tag:
                barrier()
                if first:
                    shutil.rmtree(checkpoint_dir(run_dir) / load_tag, ignore_errors=True)
            if any_rank(misfit is not None):  # older checkpoints of the run have the same shapes: no fallback
                raise CheckpointError(error if misfit else f"{tag_dir} does not fit the model of this config "
                                                           f"on another rank")
            if any_rank(error is not None):
                problem = error or f"{tag_dir}: cannot load checkpoint on another rank"
        if problem is None:
            if problems:
                log.warning("resuming from %s instead of a newer, unusable checkpoint", tag)
            return state
        problems.append(problem)
        log.warning("skipping checkpoint %s: %s", tag, problem)
    raise CheckpointError("no usable checkpoint: " + "; ".join(problems))


def summarize_load_error(message: str) -> Optional[str]:
    """"N size mismatches, e.g. embed.weight: checkpoint [300, 32], model [8000, 256]" when `message`
    is torch's error for a state dict that does not fit the model (else None): such a checkpoint is
    intact, it belongs to another model config."""
    if "Error(s) in loading state_dict" not in message:
        return None
    sizes = re.findall(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", message)
    parts = []
    if sizes:
        name, saved, wanted = sizes[0]
        parts.append(f"{len(sizes)} size mismatches, e.g. {name}: checkpoint {saved}, model {wanted}")
    for kind in ("Missing", "Unexpected"):
        found = re.search(kind + r' key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)', message)
        if found:
            keys = re.findall(r'"([^"]*)"', found.group(1))
            parts.append(f"{len(keys)} {kind.lower()} keys, e.g. {keys[0]}")
    return "; ".join(parts) or message.splitlines()[0]


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
        from mtmoe.data.vocab import Vocab

        if Vocab(run_dir / "spm.model").pieces() != vocab.pieces():
            conflicts.append(f"the vocabulary (data.corpus_dir / data.train_prefix / data.max_train_lines "
                             f"give another one than the run's {run_dir / 'spm.model'})")
    if not conflicts:
        return
    hint = "repeat the settings it was trained with"
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        import shlex

        import yaml

        try:
            recorded = [str(o) for o in yaml.safe_load(overrides.read_text()) or []]
            hint += f" (its overrides, from {overrides}: {shlex.join(recorded) or 'none'})"
        except (yaml.YAMLError, TypeError):
            pass
    raise ConfigError(f"{run_dir} holds checkpoints of another model: {', '.join(conflicts)}. To resume it, "
                      f"{hint}; for a new run, give another hydra.run.dir")


def write_model_description(run_dir: Path, vocab_path: Path, desc: dict) -> None:
    """Writes the run's model.json (`describe_run`) and its spm.model."""
    tmp = run_dir / ".spm.model.tmp"
    shutil.copyfile(vocab_path, tmp)
    os.replace(tmp, run_dir / "spm.model")
    write_atomic(run_dir / MODEL_JSON, json.dumps(desc, indent=1))
