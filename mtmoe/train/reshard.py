"""Resuming a checkpoint at another parallel layout (world size, expert-parallel size).

DeepSpeed's own tools do not convert native-MoE checkpoints, and its loader only reads the files a
rank of the *same* layout wrote. What depends on the layout in a ZeRO-0 MoE checkpoint:

    mp_rank_00_model_states.pt              dense weights, lr schedule, step      layout-free
    layer_{L}_expert_{g}_..._states.pt      one file per global expert g          layout-free
    expp_rank_{r}_..._optim_states.pt       Adam state of the dense params (the same on every rank)
                                            + of the E/ep experts rank r holds    depends on ep_size

So resharding rewrites the optimizer files: it takes each expert's Adam moments out of the rank
file that held it (local id l on rank r is global expert r * E/ep + l) and regroups them for the
new ep_size; everything else is linked unchanged. Changing only the world size needs no rewrite.
ZeRO-1/2 checkpoints hold flat per-rank partitions of the optimizer state and must be resumed at
the layout that wrote them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

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
            "accumulate": state.get("accumulate", 1)}


def check_resumable(saved: dict, current: dict, tag_dir: Path) -> bool:
    """True when the optimizer files must be rewritten (ep_size changed); ReshardError when the
    change cannot be made; False when the checkpoint loads as it is."""
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


def reshard_optimizer_states(files: list[dict], num_experts: int, num_moe_layers: int, new_ep: int) -> list[dict]:
    """Regroups the expert Adam states of `files` (one loaded optim file per old ep rank) into
    `new_ep` files. Param order within a rank's expert group is layer-major, then local expert,
    then the expert's parameters (module order), as DeepSpeed's param-group split leaves it."""
    old_ep = len(files)
    if num_experts % old_ep or num_experts % new_ep:
        raise ReshardError(f"{num_experts} experts cannot be split over ep_size {old_ep} -> {new_ep}")
    local_old, local_new = num_experts // old_ep, num_experts // new_ep
    ref = files[0]["optimizer"]
    expert_group = [i for i, g in enumerate(ref["param_groups"]) if g.get("moe")]
    if len(expert_group) != 1:
        raise ReshardError(f"expected one expert parameter group, found {len(expert_group)}")
    e_idx = expert_group[0]
    n_local = len(ref["param_groups"][e_idx]["params"])
    per_expert, rest = divmod(n_local, num_moe_layers * local_old)
    if rest or per_expert == 0:
        raise ReshardError(f"{n_local} expert parameters per rank do not split into {num_moe_layers} layers x "
                           f"{local_old} experts")
    # (layer, global expert, param) -> Adam state
    expert_states: dict[tuple[int, int, int], dict] = {}
    for rank, f in enumerate(files):
        sd = f["optimizer"]
        ids = sd["param_groups"][e_idx]["params"]
        if len(ids) != n_local:
            raise ReshardError(f"ep rank {rank}: {len(ids)} expert parameters, rank 0 has {n_local}")
        for i, pid in enumerate(ids):
            layer, within = divmod(i, local_old * per_expert)
            local, param = divmod(within, per_expert)
            if pid in sd["state"]:
                expert_states[(layer, rank * local_old + local, param)] = sd["state"][pid]
    out = []
    for rank in range(new_ep):
        groups, state, next_id = [], {}, 0
        for g_idx, group in enumerate(ref["param_groups"]):
            new_group = {k: v for k, v in group.items() if k != "params"}
            if g_idx == e_idx:
                new_group["name"] = f"ep_size_{new_ep}"
                keys = [(layer, rank * local_new + local, param) for layer in range(num_moe_layers)
                        for local in range(local_new) for param in range(per_expert)]
                sources = [expert_states.get(k) for k in keys]
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
    for rank, content in enumerate(reshard_optimizer_states(files, num_experts, num_moe_layers, new_ep)):
        torch.save(content, optim_file(out_dir, rank))
    state = json.loads((tag_dir / "mtmoe_state.json").read_text())
    state["resharded_from"] = {"ep_size": saved["ep_size"], "world_size": saved["world_size"]}
    (out_dir / "mtmoe_state.json").write_text(json.dumps(state, indent=1))
    log.info("resharded %s: ep_size %d -> %d", tag_dir.name, saved["ep_size"], new_ep)
