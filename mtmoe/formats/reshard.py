"""Resuming a checkpoint at another parallel layout (world size, expert-parallel size).

DeepSpeed's own tools do not convert native-MoE checkpoints, and its loader only reads the files a
rank of the *same* layout wrote. What depends on the layout in a ZeRO-0 MoE checkpoint:

    mp_rank_00_model_states.pt              dense weights, lr schedule, step      layout-free
    layer_{L}_expert_{g}_..._states.pt      one file per global expert g          layout-free
    expp_rank_{r}_..._optim_states.pt       Adam state of the dense params (the same on every rank)
                                            + of the E/ep experts rank r holds    depends on ep_size

So resharding rewrites the optimizer files: it takes each expert's Adam moments out of the rank
file that held it (local id l on rank r is global expert r * E/ep + l) and regroups them for the
new ep_size: rows of the stacked expert tensors (`moe.expert_storage=stacked`, the default) or
whole per-expert tensors (`per_expert`); everything else is linked unchanged. Changing only the world size needs no rewrite.
ZeRO-1/2 checkpoints hold flat per-rank partitions of the optimizer state and must be resumed at
the layout that wrote them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("mtmoe")


class ReshardError(RuntimeError):
    """A layout change that cannot be converted; the message says which and why."""


def optim_file(tag_dir: Path, ep_rank: int) -> Path:
    return tag_dir / f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def saved_layout(tag_dir: Path) -> dict:
    """world_size, ep_size, zero_stage and accumulate the checkpoint was written with."""
    state = json.loads((tag_dir / "mtmoe_state.json").read_text())
    zero = state.get("zero_stage")
    if zero is None:  # checkpoints written before the stage was recorded
        zero = 1 if any(tag_dir.glob("zero_pp_rank_*")) else 0
    return {"world_size": state.get("world_size", 1), "ep_size": state.get("ep_size", 1), "zero_stage": zero,
            "accumulate": state.get("accumulate", 1),
            "expert_storage": state.get("expert_storage", "per_expert")}  # before stacked experts: per expert


def check_resumable(saved: dict, current: dict, tag_dir: Path) -> bool:
    """True when the optimizer files must be rewritten (ep_size changed); ReshardError when the
    change cannot be made; False when the checkpoint loads as it is."""
    if current.get("expert_storage") not in (None, saved["expert_storage"]):
        raise ReshardError(f"{tag_dir}: its experts' optimizer state is laid out {saved['expert_storage']} "
                           f"(one entry per expert tensor unless 'stacked'; checkpoints from before stacked experts "
                           f"are per_expert), this run's is {current['expert_storage']}: resume with "
                           f"moe.expert_storage={saved['expert_storage']}, or export the run (weights are "
                           f"layout-free) and continue in a new run dir with init.from_moe=<export>")
    if saved["zero_stage"] != current["zero_stage"]:
        raise ReshardError(f"{tag_dir}: written with train.zero_stage={saved['zero_stage']}, resumed with "
                           f"{current['zero_stage']}: the optimizer state is laid out differently; resume with "
                           f"train.zero_stage={saved['zero_stage']}")
    changed = saved["ep_size"] != current["ep_size"] or saved["world_size"] != current["world_size"]
    if changed and saved["zero_stage"] > 0:
        raise ReshardError(f"{tag_dir}: a ZeRO-{saved['zero_stage']} checkpoint (world {saved['world_size']}, "
                           f"ep_size {saved['ep_size']}) holds per-rank optimizer partitions and resumes only at "
                           f"that layout (asked: world {current['world_size']}, ep_size {current['ep_size']}); "
                           f"resharding converts ZeRO-0 checkpoints")
    if changed and saved["world_size"] * saved["accumulate"] != current["world_size"] * current["accumulate"]:
        log.warning("%s: the global batch changes from %d to %d micro-batches per step (world x train.accumulate): "
                    "training continues, but not with the batches of the original layout", tag_dir,
                    saved["world_size"] * saved["accumulate"], current["world_size"] * current["accumulate"])
    return saved["ep_size"] != current["ep_size"]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _split_state(state: dict, start: int, stop: int, local: int) -> dict:
    """Rows start..stop-1 of every per-row tensor (dim 0 of size `local`) of an Adam state entry;
    scalars (step) unchanged."""
    return {key: value[start:stop].clone() if torch.is_tensor(value) and value.dim() and value.shape[0] == local
            else value for key, value in state.items()}


def _join_states(states: list[dict]) -> dict:
    """Adam state entries of the same stacked parameter from several ranks, concatenated along dim 0."""
    first = states[0]
    return {key: torch.cat([s[key] for s in states]) if torch.is_tensor(value) and value.dim() else value
            for key, value in first.items()}


def _expert_states(files: list[dict], e_idx: int) -> list[list[Optional[dict]]]:
    """[old ep rank][i]: the Adam state of the i-th parameter of each rank's expert group."""
    n_local = len(files[0]["optimizer"]["param_groups"][e_idx]["params"])
    out = []
    for rank, f in enumerate(files):
        ids = f["optimizer"]["param_groups"][e_idx]["params"]
        if len(ids) != n_local:
            raise ReshardError(f"ep rank {rank}: {len(ids)} expert parameters, rank 0 has {n_local}")
        out.append([f["optimizer"]["state"].get(pid) for pid in ids])
    return out


def _regroup_stacked(states: list[list[Optional[dict]]], num_experts: int, new_ep: int) -> list[list[Optional[dict]]]:
    """Stacked experts (mtmoe.model.experts.GroupedExperts): a rank's expert group holds, per MoE
    layer, the layer's w1, b1, w2, b2 [local experts, ...]; expert g is row g % local of rank
    g // local's tensors. The ranks' rows are concatenated and cut into new_ep blocks."""
    local_old, local_new = num_experts // len(states), num_experts // new_ep
    full: list[Optional[dict]] = []
    for i, parts in enumerate(zip(*states)):
        rows = {v.shape[0] for p in parts if p is not None for v in p.values() if torch.is_tensor(v) and v.dim()}
        if rows and rows != {local_old}:
            raise ReshardError(f"expert parameter {i}: Adam state rows {sorted(rows)}, expected {local_old} experts "
                               f"per ep rank (is moe.expert_storage the checkpoint's?)")
        if any(p is None for p in parts) and not all(p is None for p in parts):
            raise ReshardError(f"expert parameter {i} has optimizer state on some ep ranks only")
        full.append(None if parts[0] is None else _join_states(list(parts)))
    return [[None if s is None else _split_state(s, r * local_new, (r + 1) * local_new, num_experts) for s in full]
            for r in range(new_ep)]


def _regroup_per_expert(states: list[list[Optional[dict]]], num_experts: int, num_moe_layers: int,
                        new_ep: int) -> list[list[Optional[dict]]]:
    """One module per expert (ExpertList, and checkpoints from before stacked experts): a rank's
    expert group is layer-major, then local expert, then the expert's parameters (module order)."""
    local_old, local_new = num_experts // len(states), num_experts // new_ep
    per_expert, rest = divmod(len(states[0]), num_moe_layers * local_old)
    if rest or per_expert == 0:
        raise ReshardError(f"{len(states[0])} expert parameters per rank do not split into {num_moe_layers} layers x "
                           f"{local_old} experts")
    by_key: dict[tuple[int, int, int], Optional[dict]] = {}  # (layer, global expert, param) -> Adam state
    for rank, rank_states in enumerate(states):
        for i, state in enumerate(rank_states):
            layer, within = divmod(i, local_old * per_expert)
            local, param = divmod(within, per_expert)
            by_key[(layer, rank * local_old + local, param)] = state
    return [[by_key[(layer, r * local_new + local, param)] for layer in range(num_moe_layers)
             for local in range(local_new) for param in range(per_expert)] for r in range(new_ep)]


def reshard_optimizer_states(files: list[dict], num_experts: int, num_moe_layers: int, new_ep: int,
                             expert_storage: str = "stacked") -> list[dict]:
    """Regroups the expert Adam states of `files` (one loaded optim file per old ep rank) into
    `new_ep` files, for experts stored `expert_storage` (`stacked` or `per_expert`); the dense
    parameters' states (the same on every rank) are rank 0's."""
    old_ep = len(files)
    if num_experts % old_ep or num_experts % new_ep:
        raise ReshardError(f"{num_experts} experts cannot be split over ep_size {old_ep} -> {new_ep}")
    ref = files[0]["optimizer"]
    expert_group = [i for i, g in enumerate(ref["param_groups"]) if g.get("moe")]
    if len(expert_group) != 1:
        raise ReshardError(f"expected one expert parameter group, found {len(expert_group)}")
    e_idx = expert_group[0]
    states = _expert_states(files, e_idx)
    if num_moe_layers == 0 or len(states[0]) % num_moe_layers:
        raise ReshardError(f"{len(states[0])} expert parameters per rank do not split into {num_moe_layers} MoE layers")
    if expert_storage == "stacked":
        regrouped = _regroup_stacked(states, num_experts, new_ep)
    else:
        regrouped = _regroup_per_expert(states, num_experts, num_moe_layers, new_ep)
    out = []
    for rank in range(new_ep):
        groups, state, next_id = [], {}, 0
        for g_idx, group in enumerate(ref["param_groups"]):
            new_group = {k: v for k, v in group.items() if k != "params"}
            if g_idx == e_idx:
                new_group["name"] = f"ep_size_{new_ep}"
                sources = regrouped[rank]
            else:
                sources = [ref["state"].get(pid) for pid in group["params"]]
            new_group["params"] = list(range(next_id, next_id + len(sources)))
            for pid, s in zip(new_group["params"], sources):
                if s is not None:
                    state[pid] = s
            next_id += len(sources)
            groups.append(new_group)
        out.append({**{k: v for k, v in files[0].items() if k != "optimizer"},
                    "optimizer": {"state": state, "param_groups": groups}})
    return out


def reshard_checkpoint(tag_dir: Path, out_dir: Path, new_ep: int, num_experts: int, num_moe_layers: int) -> None:
    """Writes `out_dir`: `tag_dir` with optimizer files for `new_ep` ranks (other files linked)."""
    saved = saved_layout(tag_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for path in tag_dir.iterdir():
        if path.is_file() and not path.name.startswith("expp_rank_") and path.name != "manifest.json":
            _link_or_copy(path, out_dir / path.name)
    files = []
    for rank in range(saved["ep_size"]):
        path = optim_file(tag_dir, rank)
        if not path.is_file():
            raise ReshardError(f"{path}: missing (needed to reshard ep_size {saved['ep_size']} -> {new_ep})")
        files.append(torch.load(path, map_location="cpu", weights_only=True))
    regrouped = reshard_optimizer_states(files, num_experts, num_moe_layers, new_ep, saved["expert_storage"])
    for rank, content in enumerate(regrouped):
        torch.save(content, optim_file(out_dir, rank))
    state = json.loads((tag_dir / "mtmoe_state.json").read_text())
    state["resharded_from"] = {"ep_size": saved["ep_size"], "world_size": saved["world_size"]}
    (out_dir / "mtmoe_state.json").write_text(json.dumps(state, indent=1))
    log.info("resharded %s: ep_size %d -> %d", tag_dir.name, saved["ep_size"], new_ep)
