"""Resuming a checkpoint at another parallel layout (world size, expert-parallel size).

DeepSpeed's own tools do not convert native-MoE checkpoints (its universal checkpoint skips native
MoE, its "elastic" ZeRO loading picks the expert partitions by the new layout's ranks), and its
loader only reads the files a rank of the *same* layout wrote. So mtmoe rewrites the files that
depend on the layout into a staging tag that DeepSpeed then loads as if the new layout had written
it. Expert weights are one file per global expert (`layer_{L}_expert_{g}_...`) and the dense
weights one file: both layout-free in every stage but ZeRO-3.

**ZeRO-0** (`expp_rank_{r}_mp_rank_00_optim_states.pt`: the Adam state of the dense parameters, the
same on every rank, and of the E/ep experts ep rank r holds): changing the ep_size rewrites the
optimizer files, taking each expert's Adam moments out of the rank file that held it (local id l
on rank r is global expert r * E/ep + l) and regrouping them for the new ep_size: rows of the
stacked expert tensors (`moe.expert_storage=stacked`, the default) or whole per-expert tensors
(`per_expert`). Changing only the world size needs no rewrite.

**ZeRO-1/2** (`zero_pp_rank_{r}_mp_rank_00_optim_states.pt`: per parameter group, the flat fp32
weights and Adam moments of rank r's partition): the dense group is one flat tensor (its parameters
in module order, zero-padded to a multiple of 2 x its ranks) cut into equal partitions over all
ranks; the experts' group of ep rank e is partitioned the same way over DeepSpeed's expert-data-
parallel group of e (ranks e, e + ep, e + 2 ep, ...). Changing the world size or the ep_size (stacked
experts) joins each group's partitions back into per-parameter tensors, regroups the experts' rows
by the new ep ranks and cuts new partitions for the new ranks (`reshard_zero_partitions`); the
main file's `dp_world_size` and parameter shapes follow. Rank 0 converts, holding the whole
optimizer state (fp32 weights and two moments: 12 bytes per parameter) about four times over in host
memory for the while (the old files, the joined parameters, the flat copy, the new partitions).
ZeRO-3 checkpoints resume at the layout that wrote them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from mtmoe.formats.ds_checkpoint import MAIN_FILE, load_tensors, load_zero_optimizer_file, zero_optimizer_file
from mtmoe.formats.integrity import MANIFEST, STATE_JSON

log = logging.getLogger("mtmoe")


class ReshardError(RuntimeError):
    """A layout change that cannot be converted; the message says which and why."""


def optim_file(tag_dir: Path, ep_rank: int) -> Path:
    return tag_dir / f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def saved_layout(tag_dir: Path) -> dict:
    """world_size, ep_size, zero_stage and accumulate the checkpoint was written with."""
    state = json.loads((tag_dir / STATE_JSON).read_text())
    zero = state.get("zero_stage")
    if zero is None:  # checkpoints written before the stage was recorded
        zero = 1 if any(tag_dir.glob("zero_pp_rank_*")) else 0
    return {"world_size": state.get("world_size", 1), "ep_size": state.get("ep_size", 1), "zero_stage": zero,
            "accumulate": state.get("accumulate", 1),
            "expert_storage": state.get("expert_storage", "per_expert")}  # before stacked experts: per expert


def check_resumable(saved: dict, current: dict, tag_dir: Path) -> bool:
    """True when the optimizer files must be rewritten (ZeRO-0: the ep_size changed; ZeRO-1/2: the
    world size or the ep_size); ReshardError when the change cannot be made; False when the
    checkpoint loads as it is. ZeRO-1 and ZeRO-2 write the same files (DeepSpeed's one optimizer
    class, with and without partitioned gradients): either resumes the other's."""
    if current.get("expert_storage") not in (None, saved["expert_storage"]):
        raise ReshardError(f"{tag_dir}: its experts' optimizer state is laid out {saved['expert_storage']} "
                           f"(one entry per expert tensor unless 'stacked'; checkpoints from before stacked experts "
                           f"are per_expert), this run's is {current['expert_storage']}: resume with "
                           f"moe.expert_storage={saved['expert_storage']}, or export the run (weights are "
                           f"layout-free) and continue in a new run dir with init.from_moe=<export>")
    one_format = {saved["zero_stage"], current["zero_stage"]} <= {1, 2}  # one optimizer class, one file format
    if saved["zero_stage"] != current["zero_stage"] and not one_format:
        raise ReshardError(f"{tag_dir}: written with train.zero_stage={saved['zero_stage']}, resumed with "
                           f"{current['zero_stage']}: the optimizer state is laid out differently; resume with "
                           f"train.zero_stage={saved['zero_stage']} (ZeRO-1 and ZeRO-2 resume as each other)")
    changed = saved["ep_size"] != current["ep_size"] or saved["world_size"] != current["world_size"]
    if changed and saved["zero_stage"] == 3:
        raise ReshardError(f"{tag_dir}: a ZeRO-3 checkpoint (world {saved['world_size']}) holds per-rank partitions "
                           f"of every parameter and resumes only at that layout (asked: world "
                           f"{current['world_size']}, ep_size {current['ep_size']}); resharding converts ZeRO-0, "
                           f"ZeRO-1 and ZeRO-2 checkpoints")
    if changed and saved["zero_stage"] > 0 and current.get("zero_round_robin"):
        raise ReshardError(f"{tag_dir}: DeepSpeed's round_robin_gradients (zero_optimization) orders each ZeRO "
                           f"parameter group by the number of ranks, which resharding does not; resume at the "
                           f"layout that wrote the checkpoint, or without round_robin_gradients")
    if changed and saved["zero_stage"] > 0 and saved["expert_storage"] != "stacked":
        raise ReshardError(f"{tag_dir}: a ZeRO-{saved['zero_stage']} checkpoint of experts stored per expert resumes "
                           f"only at its layout (world {saved['world_size']}, ep_size {saved['ep_size']}); "
                           f"resharding ZeRO partitions needs moe.expert_storage=stacked")
    if changed and saved["world_size"] * saved["accumulate"] != current["world_size"] * current["accumulate"]:
        log.warning("%s: the global batch changes from %d to %d micro-batches per step (world x train.accumulate): "
                    "training continues, but not with the batches of the original layout", tag_dir,
                    saved["world_size"] * saved["accumulate"], current["world_size"] * current["accumulate"])
    return saved["ep_size"] != current["ep_size"] or (changed and saved["zero_stage"] > 0)


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


def partition_ranks(world: int, ep: int, experts: bool) -> list[list[int]]:
    """The ranks a ZeRO-1/2 parameter group is partitioned over, one list per copy of the group, in
    partition order: the dense group over all ranks; the experts' group of ep rank e over
    DeepSpeed's expert-data-parallel group of e, ranks e, e + ep, ... (`deepspeed.utils.groups`)."""
    return [list(range(e, world, ep)) for e in range(ep)] if experts else [list(range(world))]


def _join_partitions(files: list[dict], group: int, ranks: list[int], shapes: dict) -> dict[str, dict]:
    """One copy of ZeRO-1/2 parameter group `group`, from its partitions on `ranks` (optimizer files,
    `optimizer_state_dict` each) -> {parameter name: {"fp32" | Adam key: tensor of the parameter's
    shape}}, names in the group's order (`shapes`: name -> shape, DeepSpeed's `param_shapes`)."""
    pieces: dict[str, list[torch.Tensor]] = {"fp32": []}
    for rank in ranks:
        sd = files[rank]
        padding = sd["group_paddings"][group]
        if any(sd["param_alignment_paddings"][group]):
            raise ReshardError("ZeRO parameter alignment padding (zero_optimization.parameter_alignment) is not "
                               "resharded; resume at the layout that wrote the checkpoint")
        pieces["fp32"].append(sd["single_partition_of_fp32_groups"][group])  # saved without its padding
        for key, value in sd["base_optimizer_state"]["state"][group].items():
            if torch.is_tensor(value) and value.dim():
                pieces.setdefault(key, []).append(value[:value.numel() - padding])
    numels = [math.prod(shape) for shape in shapes.values()]
    params: dict[str, dict] = {name: {} for name in shapes}
    for key, parts in pieces.items():
        flat = torch.cat(parts)
        if flat.numel() != sum(numels):
            raise ReshardError(f"parameter group {group} over ranks {ranks}: {flat.numel()} {key} values for "
                               f"{sum(numels)} parameter elements (a checkpoint of another model?)")
        for (name, shape), chunk in zip(shapes.items(), flat.split(numels)):
            params[name][key] = chunk.view(shape)
    return params


def _cut_partitions(params: dict[str, dict], dp: int) -> list[tuple[dict, int, dict]]:
    """One parameter group cut into `dp` partitions as DeepSpeed's ZeRO-1/2 lays it out: the
    parameters flattened in order, zero-padded to a multiple of 2 x dp (`nccl_start_alignment_factor`),
    cut into dp equal slices -> per partition ({"fp32" | Adam key: slice}, the padding in it,
    {name: fragment address of the parameter's part in it})."""
    from deepspeed.utils.tensor_fragment import fragment_address

    keys = next(iter(params.values())).keys()
    total = sum(p["fp32"].numel() for p in params.values())
    size = -(-total // (2 * dp)) * 2 * dp // dp
    flats = {}
    for key in keys:
        tensors = [p[key].reshape(-1) for p in params.values()]
        flats[key] = torch.cat([*tensors, tensors[0].new_zeros(size * dp - total)])
    out = []
    for index in range(dp):
        lo, hi = index * size, (index + 1) * size
        mappings, offset = {}, 0
        for name, p in params.items():
            start, stop = max(offset, lo), min(offset + p["fp32"].numel(), hi)
            if start < stop:
                mappings[name] = fragment_address(numel=stop - start, start=start - lo)
            offset += p["fp32"].numel()
        out.append(({key: flat[lo:hi].clone() for key, flat in flats.items()}, max(0, min(size, hi - total)),
                    mappings))
    return out


MAX_EXPERT_GROUP_NUMEL = 178956971
"""DeepSpeed's `split_params_into_different_moe_groups_for_optimizer` default: a rank's expert
parameters are cut into optimizer groups of at most this many elements, so how many expert groups
a layout has depends on its ep_size (experts per rank)."""


def _expert_groups(params: dict[str, dict], max_numel: int = MAX_EXPERT_GROUP_NUMEL) -> list[dict[str, dict]]:
    """One rank's expert parameters (in order) -> its optimizer groups, cut by DeepSpeed's rule."""
    groups: list[dict[str, dict]] = []
    current: dict[str, dict] = {}
    size = 0
    for name, p in params.items():
        numel = p["fp32"].numel()
        if size + numel <= max_numel:
            current[name], size = p, size + numel
        else:
            groups.append(current)
            current, size = {name: p}, numel
    if current:
        groups.append(current)
    return groups


def reshard_zero_partitions(files: list[dict], param_shapes: list[dict], new_world: int, new_ep: int, old_ep: int,
                            max_expert_group_numel: int = MAX_EXPERT_GROUP_NUMEL) -> tuple[list[dict], list[dict]]:
    """ZeRO-1/2 optimizer files of every rank of a layout (`files[r]`: rank r's file, whole) ->
    (the files of the `new_world` ranks of a layout with `new_ep` expert-parallel ranks, the new
    per-group parameter shapes). `param_shapes`: per group, name -> shape on one rank (stacked
    experts: [local experts, ...]). The dense groups keep their partitioning over all ranks; the
    expert groups (after the dense ones, as DeepSpeed's MoE helper orders them) are joined per ep
    rank, their rows regrouped for the new ep ranks, and cut into groups again by DeepSpeed's rule."""
    old_world = len(files)
    optim = [f["optimizer_state_dict"] for f in files]
    first = optim[0]
    if not isinstance(first["base_optimizer_state"], dict) or "param_groups" not in first["base_optimizer_state"]:
        raise ReshardError("the ZeRO optimizer state was saved elastic (zero_optimization.elastic_checkpoint); "
                           "resume at the layout that wrote it")
    groups = first["base_optimizer_state"]["param_groups"]
    if len(groups) != len(param_shapes):
        raise ReshardError(f"{len(groups)} optimizer parameter groups, {len(param_shapes)} in the parameter shapes")
    moe = [bool(g.get("moe")) for g in groups]
    if any(moe) and moe != sorted(moe):
        raise ReshardError("expert parameter groups before dense ones: not an optimizer mtmoe builds")
    # [(group settings, an Adam state entry to fill, copies: one {name: tensors} per new ep rank or one for all)]
    new_groups: list[tuple[dict, dict, list[dict[str, dict]]]] = []
    for g in (g for g in range(len(groups)) if not moe[g]):
        new_groups.append((dict(groups[g]), first["base_optimizer_state"]["state"][g],
                           [_join_partitions(optim, g, list(range(old_world)), param_shapes[g])]))
    expert_ids = [g for g in range(len(groups)) if moe[g]]
    if expert_ids:
        per_ep = [{} for _ in range(old_ep)]  # each old ep rank's expert parameters, in group order
        for g in expert_ids:
            for e, ranks in enumerate(partition_ranks(old_world, old_ep, True)):
                per_ep[e].update(_join_partitions(optim, g, ranks, param_shapes[g]))
        full = {name: {key: torch.cat([copy[name][key] for copy in per_ep]) for key in per_ep[0][name]}
                for name in per_ep[0]}  # rows in global expert order
        num_experts = next(iter(full.values()))["fp32"].shape[0]
        if num_experts % new_ep:
            raise ReshardError(f"{num_experts} experts cannot be split over ep_size {new_ep}")
        local = num_experts // new_ep
        ranks_params = [{name: {key: v[e * local:(e + 1) * local] for key, v in p.items()} for name, p in full.items()}
                        for e in range(new_ep)]
        cut = [_expert_groups(params, max_expert_group_numel) for params in ranks_params]  # [ep rank][group]
        expert_settings = {**groups[expert_ids[0]], "name": f"ep_size_{new_ep}"}
        expert_adam = first["base_optimizer_state"]["state"][expert_ids[0]]
        for i in range(len(cut[0])):
            new_groups.append((dict(expert_settings), expert_adam, [cut[e][i] for e in range(new_ep)]))
    new_shapes = [{name: tuple(p["fp32"].shape) for name, p in copies[0].items()} for _, _, copies in new_groups]
    per_rank: list[list[tuple[dict, int, dict]]] = [[] for _ in range(new_world)]
    for settings, _, copies in new_groups:
        for copy, ranks in zip(copies, partition_ranks(new_world, new_ep, bool(settings.get("moe")))):
            for rank, partition in zip(ranks, _cut_partitions(copy, len(ranks))):
                per_rank[rank].append(partition)
    new_files = []
    for parts in per_rank:
        state = {g: {k: part[k] if torch.is_tensor(v) and v.dim() else v for k, v in adam.items()}
                 for g, ((part, _, _), (_, adam, _)) in enumerate(zip(parts, new_groups))}
        param_groups = [{**s, "params": [g]} for g, (s, _, _) in enumerate(new_groups)]
        new_files.append({**{k: v for k, v in files[0].items() if k != "optimizer_state_dict"},
                          "optimizer_state_dict": {
            **first,
            "base_optimizer_state": {"state": state, "param_groups": param_groups},
            "single_partition_of_fp32_groups": [part["fp32"][:part["fp32"].numel() - pad] for part, pad, _ in parts],
            "group_paddings": [pad for _, pad, _ in parts],
            "param_alignment_paddings": [[0] * len(shapes) for shapes in new_shapes],
            "partition_count": [new_world // new_ep if s.get("moe") else new_world for s, _, _ in new_groups],
            "param_slice_mappings": [mapping for _, _, mapping in parts],
        }})
    return new_files, new_shapes


def _reshard_zero(tag_dir: Path, out_dir: Path, saved: dict, new_world: int, new_ep: int) -> None:
    """Writes a ZeRO-1/2 tag's optimizer files and main file for `new_world` ranks, `new_ep` of
    them expert-parallel, into `out_dir` (which holds links to everything else)."""
    files = [load_zero_optimizer_file(tag_dir, rank) for rank in range(saved["world_size"])]
    if files[0].get("ds_config", {}).get("zero_optimization", {}).get("round_robin_gradients"):
        raise ReshardError(f"{tag_dir}: written with DeepSpeed's round_robin_gradients, which orders each ZeRO "
                           f"parameter group by the number of ranks; resume at the layout that wrote it")
    main = load_tensors(tag_dir / MAIN_FILE)
    new_files, new_shapes = reshard_zero_partitions(files, main["param_shapes"], new_world, new_ep,
                                                    saved["ep_size"])
    for rank, content in enumerate(new_files):
        torch.save(content, zero_optimizer_file(out_dir, rank))
    main["dp_world_size"] = new_world  # DeepSpeed reads this many optimizer files
    main["param_shapes"] = [{name: torch.Size(shape) for name, shape in shapes.items()} for shapes in new_shapes]
    torch.save(main, out_dir / MAIN_FILE)


def reshard_checkpoint(tag_dir: Path, out_dir: Path, new_world: int, new_ep: int, num_experts: int,
                       num_moe_layers: int) -> None:
    """Writes `out_dir`: `tag_dir` with the optimizer files (and, for ZeRO-1/2, the main file) of a
    layout of `new_world` ranks, `new_ep` of them expert-parallel, and its mtmoe_state.json; the
    other files are hard links to the source's. A file written here is never one of those links:
    writing through a link would change the source tag, which would then fail its manifest."""
    saved = saved_layout(tag_dir)
    zero = saved["zero_stage"] > 0
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    rewritten_prefix = "zero_pp_rank_" if zero else "expp_rank_"
    rewritten = {MANIFEST, STATE_JSON, *([MAIN_FILE] if zero else [])}
    for path in tag_dir.iterdir():
        if path.is_file() and not path.name.startswith(rewritten_prefix) and path.name not in rewritten:
            _link_or_copy(path, out_dir / path.name)
    if zero:
        _reshard_zero(tag_dir, out_dir, saved, new_world, new_ep)
    else:
        files = []
        for rank in range(saved["ep_size"]):
            path = optim_file(tag_dir, rank)
            if not path.is_file():
                raise ReshardError(f"{path}: missing (needed to reshard ep_size {saved['ep_size']} -> {new_ep})")
            files.append(torch.load(path, map_location="cpu", weights_only=True))
        regrouped = reshard_optimizer_states(files, num_experts, num_moe_layers, new_ep, saved["expert_storage"])
        for rank, content in enumerate(regrouped):
            torch.save(content, optim_file(out_dir, rank))
    state = json.loads((tag_dir / STATE_JSON).read_text())
    state["resharded_from"] = {"ep_size": saved["ep_size"], "world_size": saved["world_size"]}
    (out_dir / STATE_JSON).write_text(json.dumps(state, indent=1))
    log.info("resharded %s: ep_size %d -> %d, world %d -> %d%s", tag_dir.name, saved["ep_size"], new_ep,
             saved["world_size"], new_world, f" (ZeRO-{saved['zero_stage']} partitions)" if zero else "")
