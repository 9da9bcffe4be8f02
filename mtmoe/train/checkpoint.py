"""Crash-safe DeepSpeed checkpoints of a live training engine: save, and load the newest good one.

The files and their layout are `mtmoe.formats.ds_checkpoint`'s (integrity: `mtmoe.formats.integrity`).
A save writes into `.partial-<tag>/` on every rank, fsyncs, then rank 0 writes `manifest.json`
(size and sha256 of every file), renames the directory to `<tag>` and only then replaces `latest`
(write-to-temp + rename). A kill at any point leaves either the old checkpoints untouched or a new
one that is complete: a directory named `step*` always has its manifest (re-saving a step moves
the old one aside until the new one is in place; `remove_stale_partials` puts it back after a
kill). Loading verifies the manifest; a truncated or corrupt checkpoint is skipped with a warning
and the previous one is used.

The mtmoe training state (step, data-stream position, wandb id, time spent) travels in DeepSpeed's
`client_state` and is mirrored to `<tag>/mtmoe_state.json` for people and tools. Shared storage
across nodes is assumed (as DeepSpeed assumes by default): rank 0 renames what all ranks wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from mtmoe.errors import CheckpointError
from mtmoe.formats.ds_checkpoint import (PARTIAL_PREFIX, RETIRED_PREFIX, checkpoint_dir, complete_tags, is_snapshot,
                                         latest_tag, summarize_load_error, tag_for_step)
from mtmoe.formats.integrity import STATE_JSON, fsync_dir, fsync_file, verify, write_atomic, write_manifest
from mtmoe.formats.optimizer_state import OptimizerLayout, group_kinds
from mtmoe.formats.reshard import ReshardError, check_resumable, reshard_checkpoint, saved_layout
from mtmoe.train.distributed import any_rank, barrier, broadcast_object, is_first_rank
from mtmoe.train.zero3_swap import needs_swapped_restore, restore_swapped_partitions

log = logging.getLogger("mtmoe")

# -- save -------------------------------------------------------------------------------------------
def remove_stale_partials(run_dir: Path) -> None:
    """Deletes staging directories a killed save left behind, and puts back a checkpoint a killed
    re-save of its step had moved aside (call on one rank, before loading or saving)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.startswith(PARTIAL_PREFIX):
            log.warning("removing %s (left by a save or a pruning that did not finish)", p)
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(RETIRED_PREFIX):
            final = root / p.name[len(RETIRED_PREFIX):]
            if final.exists():  # the re-save was in place: only the deletion did not finish
                shutil.rmtree(p, ignore_errors=True)
            else:
                log.warning("restoring %s (a re-save of its step did not finish)", final)
                os.replace(p, final)
                fsync_dir(root)


def prune_old_tags(run_dir: Path, keep: int, keep_snapshots: int = 0) -> None:
    """Deletes the run's checkpoints but the newest `keep` (all when keep <= 0) and the newest
    `keep_snapshots` snapshots (`ds_checkpoint.is_snapshot`): `save_every` checkpoints inside the
    snapshots' span never push a snapshot out."""
    if keep <= 0:
        return
    root = checkpoint_dir(run_dir)
    tags = complete_tags(run_dir)
    kept = set(tags[-keep:])
    if keep_snapshots > 0:
        kept |= set([t for t in tags if is_snapshot(root / t)][-keep_snapshots:])
    for old in tags:
        if old not in kept:
            # Renamed first: a kill during the deletion leaves a `.partial-` folder the next start
            # removes, never a tag without its manifest that would pass for a pre-manifest checkpoint.
            doomed = root / f"{PARTIAL_PREFIX}pruned-{old}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(root / old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def save(engine, run_dir: Path, step: int, state: dict, keep: int, is_writer: bool, keep_snapshots: int = 0) -> str:
    """Saves on every rank (DeepSpeed writes each rank's experts and optimizer shards) into a
    staging directory, then rank 0 seals it (manifest, rename, `latest`) and prunes old tags
    (`prune_old_tags`)."""
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
            fsync_file(path)
    barrier()
    if is_writer:
        write_atomic(staging / STATE_JSON, json.dumps(state, indent=1))
        write_manifest(staging)
        final, retired = root / tag, root / f"{RETIRED_PREFIX}{tag}"
        if final.exists():  # re-saving a step (e.g. a resumed run that ended where it began): the
            shutil.rmtree(retired, ignore_errors=True)  # old one is moved aside, not deleted, until
            os.replace(final, retired)  # the new one has its name (remove_stale_partials puts it back)
        os.replace(staging, final)
        fsync_dir(root)
        shutil.rmtree(retired, ignore_errors=True)
        write_atomic(root / "latest", tag)
        prune_old_tags(run_dir, keep, keep_snapshots)
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


def optimizer_layout(engine) -> OptimizerLayout:
    """The live engine's optimizer as resharding needs it: per parameter group its parameters' names
    and shapes in order, whether it holds experts, its settings. DeepSpeed's ZeRO-1/2 optimizer
    keeps the model's parameters of each group in `bit16_groups` and steps flat copies in its
    wrapped optimizer; ZeRO-3's keeps them per sub-group in `fp16_groups` (whole shapes: `ds_shape`),
    with each sub-group's group in `sub_group_to_group_id`; without ZeRO the engine holds the torch
    optimizer itself."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    layout = OptimizerLayout(shapes=[], experts=group_kinds(base.param_groups), settings=settings,
                             ds_config=dict(engine.config))
    if engine.zero_optimization_stage() == 3:
        layout.sub_groups = [(optimizer.sub_group_to_group_id[i], {names[id(p)]: tuple(p.ds_shape) for p in group})
                             for i, group in enumerate(optimizer.fp16_groups)]
        return layout
    params = getattr(optimizer, "bit16_groups", None) or [g["params"] for g in base.param_groups]
    layout.shapes = [{names[id(p)]: tuple(p.shape) for p in group} for group in params]
    return layout


def _prepare_layout(engine, tag_dir: Path, layout: Optional[dict], moe_shape: tuple[int, int]) -> str:
    """The tag DeepSpeed should load: `tag_dir` itself, or a resharded copy of it when the layout
    changed as `mtmoe.formats.reshard.check_resumable` says (written by rank 0). CheckpointError
    when the change is impossible."""
    error, load_tag = None, tag_dir.name
    staging = tag_dir.parent / f"{PARTIAL_PREFIX}reshard-{tag_dir.name}"
    if is_first_rank() and layout is not None and (tag_dir / STATE_JSON).is_file():
        try:
            if check_resumable(saved_layout(tag_dir), layout, tag_dir):
                reshard_checkpoint(tag_dir, staging, layout["world_size"], layout["ep_size"], *moe_shape,
                                   new_zero=layout["zero_stage"], target=optimizer_layout(engine),
                                   new_offload=layout.get("offload_optimizer"))
                load_tag = staging.name
        except ReshardError as e:
            error = str(e)
        except Exception as e:  # whatever stops rank 0 here must reach the other ranks, which wait for it
            error = f"{tag_dir}: could not reshard ({type(e).__name__}: {e})"
        if error:  # a conversion that stopped halfway leaves nothing behind
            shutil.rmtree(staging, ignore_errors=True)
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
    checkpoint written with another ep_size, a ZeRO-1/2 one written with another world size or
    ep_size or optimizer offload, one written at ZeRO-0 resumed at ZeRO-1/2 or back, and a ZeRO-3 one
    written with another world size or optimizer offload, is resharded
    on the way in (`moe_shape` = experts per MoE layer, number of MoE layers)."""
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
            load_tag = _prepare_layout(engine, tag_dir, layout, moe_shape)
            try:
                path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=load_tag,
                                                            load_optimizer_states=True, load_lr_scheduler_states=True)
                if path is None or not client_state or "mtmoe" not in client_state:
                    error = f"{tag_dir}: not an mtmoe checkpoint (no training state)"
                else:
                    state = client_state["mtmoe"]
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
