"""Resuming a ZeRO-3 run whose parameters and Adam state are swapped to NVMe.

DeepSpeed 0.19's ZeRO-3 `load_checkpoint` does not restore swapped state: with
`offload_optimizer: nvme` it reads the checkpoint's fp32 master partitions and Adam moments into
memory, then `purge_state()` and the swap-in that follows overwrite them with what the fresh run
wrote to the swap files, and with `offload_param: nvme` the parameters (which live in swap files,
not in a flat buffer) are never rewritten at all. The run then continues silently from freshly
initialised weights with the checkpoint's step count (measured: step-4 loss 6.50 instead of 6.13
on the tiny parity run).

`restore_swapped_partitions` repeats, after DeepSpeed's load, what ZeRO-3's own optimizer step
does per sub-group: restore the param groups' hyperparameters (lr: DeepSpeed leaves the construction-time value
in place here, measured as a step taken at 1/sqrt(2) of the scheduled lr), swap the sub-group's fp32 partition and Adam state in, overwrite them with
this rank's saved values, write the parameters from the fp32 partition (swapped out to NVMe), and
swap everything out again. It goes through the optimizer's sub-group methods, so the swap-file
layout stays DeepSpeed's business. Peak extra memory: one sub-group (`sub_group_size` elements).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtmoe.formats.ds_checkpoint import load_zero3_optimizer_state


def needs_swapped_restore(engine) -> bool:
    optimizer = getattr(engine, "optimizer", None)
    params_swapped = getattr(optimizer, "offload_param", False) and any(
        flat is None for flat in getattr(optimizer, "fp16_partitioned_groups_flat", []))
    return bool(getattr(optimizer, "swap_optimizer", False) or params_swapped)


def _saved_partitions(tag_dir: Path, dp_rank: int) -> tuple[list[torch.Tensor], list[dict], list[dict]]:
    """This rank's fp32 master partitions and Adam state (one per sub-group) and the optimizer's
    param-group hyperparameters, from the checkpoint."""
    saved = load_zero3_optimizer_state(tag_dir, dp_rank)
    flats = list(saved["fp32_flat_groups"])
    states = [saved["optimizer_state_dict"]["state"][i] for i in range(len(flats))]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in saved["optimizer_state_dict"]["param_groups"]]
    return flats, states, groups


@torch.no_grad()
def restore_swapped_partitions(engine, tag_dir: Path) -> None:
    import torch.distributed as dist

    optimizer = engine.optimizer
    flats, states, groups = _saved_partitions(tag_dir, dist.get_rank(group=optimizer.dp_process_group))
    if len(flats) != len(optimizer.fp32_partitioned_groups_flat):
        raise RuntimeError(f"{tag_dir}: {len(flats)} ZeRO-3 sub-groups saved, {len(optimizer.fp32_partitioned_groups_flat)} "
                           f"in this run (train.zero_stage/sub_group_size changed?)")
    # The param groups' hyperparameters: with swapped optimizer state DeepSpeed leaves the
    # construction-time lr in place (the lr scheduler does not re-apply its lr when loaded).
    for group, saved_group in zip(optimizer.optimizer.param_groups, groups):
        group.update(saved_group)
    timers: set = set()
    for i, (saved_flat, saved_state) in enumerate(zip(flats, states)):
        optimizer._prepare_sub_group(i, timers)
        fp32 = optimizer.fp32_partitioned_groups_flat[i]
        if fp32.numel() != saved_flat.numel():
            raise RuntimeError(f"{tag_dir}: sub-group {i} has {saved_flat.numel()} saved elements, {fp32.numel()} here")
        fp32.data.copy_(saved_flat)
        state = optimizer.optimizer.state[fp32]
        for key, value in saved_state.items():
            if torch.is_tensor(value) and value.numel() == fp32.numel():
                if key in state:
                    state[key].copy_(value)
                else:
                    state[key] = value.to(fp32.dtype).clone()
            else:
                state[key] = value
        optimizer._reassign_or_swap_out_partitioned_parameters(i)
        optimizer._release_sub_group(i, timers)
    optimizer._post_step(timers)
