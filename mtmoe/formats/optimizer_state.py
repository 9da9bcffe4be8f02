"""A run's optimizer state in DeepSpeed's file layouts (ZeRO-0, ZeRO-1/2, ZeRO-3), read into one layout-free
form and written back for any layout (`mtmoe.formats.reshard` decides when, and handles the files).

The layout-free form is a list of `JoinedGroup`s: each dense optimizer parameter group as it is,
and one group holding every expert parameter (per MoE layer the stacked w1, b1, w2, b2 with the
rows of all E experts, in global expert order); per parameter name its fp32 weights ("fp32") and
Adam's moments, in the parameter's whole shape, plus the group's settings and Adam's per-group
scalars (the step).

**ZeRO-1/2** (`zero_pp_rank_{r}_mp_rank_00_optim_states.pt`: per parameter group, the flat fp32
weights and Adam moments of rank r's partition): a dense group is one flat tensor (its parameters in
module order, zero-padded to a multiple of 2 x its ranks) cut into equal partitions over all ranks;
the experts' groups of ep rank e are partitioned the same way over DeepSpeed's expert-data-parallel
group of e (ranks e, e + ep, e + 2 ep, ...). Parameter names and shapes: the main file's
`param_shapes`.

**ZeRO-0** (`expp_rank_{e}_mp_rank_00_optim_states.pt`, one per ep rank; a model without MoE layers
keeps it in the main file): torch's optimizer state dict of ep rank e: the parameter groups (dense
first, then the experts' groups of e's E/ep local experts) and, per parameter numbered in group
order, its step and moments. It holds no names and no weights: the names are the resuming
optimizer's (`OptimizerLayout`: the same groups in the same order; only the experts' rows per rank
differ), the weights come from the model files.

**ZeRO-3** (`zero_pp_rank_{r}_mp_rank_00_optim_states.pt`, no expert parallelism: every parameter,
each expert included, is partitioned over all ranks): per sub-group (a run of a parameter group's
parameters), rank r's flat fp32 weights and Adam moments hold, for each parameter in order, its
r-th slice of ceil(numel / world) elements (the last slices zero-padded). Names and shapes: the
model files' `param_shapes`, one dict per sub-group.

ZeRO-0/1/2 cut a rank's expert parameters into optimizer groups of at most
MAX_EXPERT_GROUP_NUMEL elements (DeepSpeed's MoE helper), so how many expert groups there are
depends on the ep_size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch

from mtmoe.model.experts import stacked_from_per_expert


class ReshardError(RuntimeError):
    """A layout change that cannot be converted; the message says which and why."""


MAX_EXPERT_GROUP_NUMEL = 178956971
"""DeepSpeed's `split_params_into_different_moe_groups_for_optimizer` default: a rank's expert
parameters are cut into optimizer groups of at most this many elements, so how many expert groups
a layout has depends on its ep_size (experts per rank)."""


@dataclass
class JoinedGroup:
    """One optimizer parameter group of the whole model, whatever the layout that saved it."""
    settings: dict
    """The group's optimizer settings as saved (lr, betas, eps, weight_decay, name, moe, ...)."""
    scalars: dict
    """Adam's per-group entries that are not per element (the step)."""
    params: dict[str, dict[str, torch.Tensor]]
    """name -> {"fp32" | moment name: tensor of the parameter's shape}; experts: rows of all E experts."""
    experts: bool = False


@dataclass
class OptimizerLayout:
    """The resuming run's optimizer, as converting between ZeRO-0 and ZeRO-1/2 needs it (from the
    live engine: `mtmoe.train.checkpoint.optimizer_layout`)."""
    shapes: list[dict[str, tuple[int, ...]]]
    """Per parameter group, in the optimizer's order: name -> shape on this rank."""
    experts: list[bool]
    """Per group: whether it holds expert parameters."""
    settings: list[dict] = field(default_factory=list)
    """Per group: the settings the optimizer keeps (their keys are what its step reads)."""
    ds_config: dict = field(default_factory=dict)
    sub_groups: list[tuple[int, dict[str, tuple[int, ...]]]] = field(default_factory=list)
    """ZeRO-3 only: per sub-group, in the optimizer's order, its parameter group and its parameters'
    names and whole shapes (ZeRO-3 cuts each group into sub-groups of about `sub_group_size`
    partition elements, stepped one at a time; `shapes` is empty there: the groups' parameters are
    held by the sub-groups)."""


def _scalars(entry: dict) -> dict:
    """The entries of an Adam state that are not per element (step), each its own copy: torch
    loads a state dict's tensors as they are on the CPU, and fused Adam increments every step tensor
    in place, so one tensor shared by two parameters would count twice."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items() if not (torch.is_tensor(v) and v.dim())}


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


def _first_tensor(param: dict[str, torch.Tensor]) -> torch.Tensor:
    """Any of a parameter's tensors (all have its shape)."""
    return next(iter(param.values()))


def _expert_groups(params: dict[str, dict], max_numel: int = MAX_EXPERT_GROUP_NUMEL) -> list[dict[str, dict]]:
    """One rank's expert parameters (in order) -> its optimizer groups, cut by DeepSpeed's rule."""
    groups: list[dict[str, dict]] = []
    current: dict[str, dict] = {}
    size = 0
    for name, p in params.items():
        numel = _first_tensor(p).numel()
        if size + numel <= max_numel:
            current[name], size = p, size + numel
        else:
            groups.append(current)
            current, size = {name: p}, numel
    if current:
        groups.append(current)
    return groups


def _per_rank_groups(joined: list[JoinedGroup], new_ep: int,
                     max_expert_group_numel: int) -> list[tuple[dict, dict, list[dict[str, dict]]]]:
    """The optimizer groups of a layout with `new_ep` expert-parallel ranks -> per group (settings,
    Adam scalars, its parameters: one dict for a dense group, one per ep rank for an expert group)."""
    out = []
    for group in joined:
        if not group.experts:
            out.append((group.settings, group.scalars, [group.params]))
            continue
        num_experts = _first_tensor(next(iter(group.params.values()))).shape[0]
        if num_experts % new_ep:
            raise ReshardError(f"{num_experts} experts cannot be split over ep_size {new_ep}")
        local = num_experts // new_ep
        ranks_params = [{name: {key: v[e * local:(e + 1) * local] for key, v in p.items()}
                         for name, p in group.params.items()} for e in range(new_ep)]
        cut = [_expert_groups(params, max_expert_group_numel) for params in ranks_params]  # [ep rank][group]
        settings = {**group.settings, "name": f"ep_size_{new_ep}"}
        for i in range(len(cut[0])):
            out.append((settings, group.scalars, [cut[e][i] for e in range(new_ep)]))
    return out


def group_kinds(param_groups: list[dict]) -> list[bool]:
    """Per optimizer parameter group (saved settings): whether it holds expert parameters."""
    return [bool(g.get("moe")) for g in param_groups]


def _dense_then_experts(param_groups: list[dict]) -> list[bool]:
    """`group_kinds`, ReshardError unless the dense groups come first (as DeepSpeed's MoE helper,
    which builds mtmoe's optimizer groups, orders them)."""
    moe = group_kinds(param_groups)
    if any(moe) and moe != sorted(moe):
        raise ReshardError("expert parameter groups before dense ones: not an optimizer mtmoe builds")
    return moe


def follow_groups(values: list, old: list[bool], new: list[bool]) -> list:
    """A per-group list (an lr scheduler's `base_lrs`, `_last_lr`, ...) of an optimizer whose groups
    were `old` (True: an expert group) for one whose groups are `new`: the dense groups keep theirs
    in order, every expert group takes the first old expert group's (the expert groups differ only in
    which experts they hold, and their number with the ep_size)."""
    dense = [v for v, e in zip(values, old, strict=True) if not e]
    expert = next((v for v, e in zip(values, old) if e), None)
    if sum(not e for e in new) != len(dense) or (any(new) and expert is None):
        raise ReshardError(f"optimizer groups {old} (True: experts) cannot become {new}")
    dense_iter = iter(dense)
    return [expert if e else next(dense_iter) for e in new]


# -- ZeRO-1/2 ---------------------------------------------------------------------------------------
def join_zero(files: list[dict], param_shapes: list[dict], old_ep: int) -> list[JoinedGroup]:
    """ZeRO-1/2 optimizer files of every rank of a layout (`files[r]`: rank r's file, whole) with
    `old_ep` expert-parallel ranks -> the layout-free groups. `param_shapes`: per group, name ->
    shape on one rank (the main file's; stacked experts: [local experts, ...])."""
    old_world = len(files)
    optim = [f["optimizer_state_dict"] for f in files]
    first = optim[0]
    if not isinstance(first["base_optimizer_state"], dict) or "param_groups" not in first["base_optimizer_state"]:
        raise ReshardError("the ZeRO optimizer state was saved elastic (zero_optimization.elastic_checkpoint); "
                           "resume at the layout that wrote it")
    groups = first["base_optimizer_state"]["param_groups"]
    if len(groups) != len(param_shapes):
        raise ReshardError(f"{len(groups)} optimizer parameter groups, {len(param_shapes)} in the parameter shapes")
    moe = _dense_then_experts(groups)
    state = first["base_optimizer_state"]["state"]
    joined = [JoinedGroup({k: v for k, v in groups[g].items() if k != "params"}, _scalars(state[g]),
                          _join_partitions(optim, g, list(range(old_world)), param_shapes[g]))
              for g in range(len(groups)) if not moe[g]]
    expert_ids = [g for g in range(len(groups)) if moe[g]]
    if expert_ids:
        per_ep = [{} for _ in range(old_ep)]  # each old ep rank's expert parameters, in group order
        for g in expert_ids:
            for e, ranks in enumerate(partition_ranks(old_world, old_ep, True)):
                per_ep[e].update(_join_partitions(optim, g, ranks, param_shapes[g]))
        full = {name: {key: torch.cat([copy[name][key] for copy in per_ep]) for key in per_ep[0][name]}
                for name in per_ep[0]}  # rows in global expert order
        first_group = expert_ids[0]
        joined.append(JoinedGroup({k: v for k, v in groups[first_group].items() if k != "params"},
                                  _scalars(state[first_group]), full, experts=True))
    return joined


def write_zero(joined: list[JoinedGroup], new_world: int, new_ep: int, extras: dict, top: dict,
               max_expert_group_numel: int = MAX_EXPERT_GROUP_NUMEL) -> tuple[list[dict], list[dict]]:
    """The layout-free groups -> (the ZeRO-1/2 optimizer files of the `new_world` ranks of a layout
    with `new_ep` expert-parallel ranks, the new per-group parameter shapes on one rank). `extras`:
    the entries of a file's `optimizer_state_dict` besides the partitions (ds_version, loss scaler,
    clip_grad, ...); `top`: the file's entries besides `optimizer_state_dict` (ds_config, ds_version)."""
    new_groups = _per_rank_groups(joined, new_ep, max_expert_group_numel)
    new_shapes = [{name: tuple(p["fp32"].shape) for name, p in copies[0].items()} for _, _, copies in new_groups]
    per_rank: list[list[tuple[dict, int, dict]]] = [[] for _ in range(new_world)]
    for settings, _, copies in new_groups:
        for copy, ranks in zip(copies, partition_ranks(new_world, new_ep, bool(settings.get("moe")))):
            for rank, partition in zip(ranks, _cut_partitions(copy, len(ranks))):
                per_rank[rank].append(partition)
    new_files = []
    for parts in per_rank:
        state = {g: {**_scalars(scalars), **{k: v for k, v in part.items() if k != "fp32"}}
                 for g, ((part, _, _), (_, scalars, _)) in enumerate(zip(parts, new_groups))}
        param_groups = [{**s, "params": [g]} for g, (s, _, _) in enumerate(new_groups)]
        new_files.append({**top, "optimizer_state_dict": {
            **extras,
            "base_optimizer_state": {"state": state, "param_groups": param_groups},
            "single_partition_of_fp32_groups": [part["fp32"][:part["fp32"].numel() - pad] for part, pad, _ in parts],
            "group_paddings": [pad for _, pad, _ in parts],
            "param_alignment_paddings": [[0] * len(shapes) for shapes in new_shapes],
            "partition_count": [new_world // new_ep if s.get("moe") else new_world for s, _, _ in new_groups],
            "param_slice_mappings": [mapping for _, _, mapping in parts],
        }})
    return new_files, new_shapes


PARTITION_KEYS = ("base_optimizer_state", "single_partition_of_fp32_groups", "group_paddings",
                  "param_alignment_paddings", "partition_count", "param_slice_mappings")
"""The entries of a ZeRO-1/2 file's `optimizer_state_dict` that depend on the layout."""


def zero_file_entries(file: dict) -> tuple[dict, dict]:
    """A ZeRO-1/2 optimizer file's entries that do not depend on the layout, as `write_zero` takes
    them: (those of its `optimizer_state_dict`: ds_version, loss scaler, clip_grad, ...; the file's
    others: ds_config, ds_version)."""
    extras = {k: v for k, v in file["optimizer_state_dict"].items() if k not in PARTITION_KEYS}
    return extras, {k: v for k, v in file.items() if k != "optimizer_state_dict"}


def reshard_zero_partitions(files: list[dict], param_shapes: list[dict], new_world: int, new_ep: int, old_ep: int,
                            max_expert_group_numel: int = MAX_EXPERT_GROUP_NUMEL) -> tuple[list[dict], list[dict]]:
    """ZeRO-1/2 optimizer files of every rank of a layout -> (the files of the `new_world` ranks of
    a layout with `new_ep` expert-parallel ranks, the new per-group parameter shapes): `join_zero`
    then `write_zero`, DeepSpeed's other entries of the files kept."""
    extras, top = zero_file_entries(files[0])
    return write_zero(join_zero(files, param_shapes, old_ep), new_world, new_ep, extras, top, max_expert_group_numel)


# -- ZeRO-3 -----------------------------------------------------------------------------------------
ZERO3_PARTITION_KEYS = ("optimizer_state_dict", "fp32_flat_groups", "partition_count")
"""The entries of a ZeRO-3 file's `optimizer_state_dict` that depend on the layout."""


def _zero3_slice(numel: int, world: int) -> int:
    """A parameter's slice on each ZeRO-3 rank: ceil(numel / world) elements."""
    return -(-numel // world)


def join_zero3(files: list[dict], param_shapes: list[dict]) -> list[JoinedGroup]:
    """ZeRO-3 optimizer state of every rank of a layout (`files[r]`: rank r's file's
    `optimizer_state_dict`) -> the layout-free groups (`experts` False: the experts are ordinary
    parameters there). `param_shapes`: per sub-group, name -> whole shape (the model files')."""
    world = len(files)
    inner = files[0]["optimizer_state_dict"]
    if len(param_shapes) != len(files[0]["fp32_flat_groups"]):
        raise ReshardError(f"{len(files[0]['fp32_flat_groups'])} ZeRO-3 sub-groups saved, {len(param_shapes)} in the "
                           f"parameter shapes")
    joined = []
    for g, group in enumerate(inner["param_groups"]):
        params: dict[str, dict] = {}
        for sub in group["params"]:
            flats = {"fp32": [f["fp32_flat_groups"][sub] for f in files]}
            for key, value in inner["state"].get(sub, {}).items():
                if torch.is_tensor(value) and value.dim():
                    flats[key] = [f["optimizer_state_dict"]["state"][sub][key] for f in files]
            slices = [_zero3_slice(math.prod(shape), world) for shape in param_shapes[sub].values()]
            sizes = {t.numel() for ranks in flats.values() for t in ranks}
            if sizes != {sum(slices)}:
                raise ReshardError(f"ZeRO-3 sub-group {sub}: {sorted(sizes)} elements per rank, its parameters' "
                                   f"slices over {world} ranks make {sum(slices)} (a checkpoint of another model?)")
            pieces = {key: [t.split(slices) for t in ranks] for key, ranks in flats.items()}
            for i, (name, shape) in enumerate(param_shapes[sub].items()):
                numel = math.prod(shape)
                params[name] = {key: torch.cat([rank_pieces[i] for rank_pieces in by_rank])[:numel].view(shape).clone()
                                for key, by_rank in pieces.items()}
        first = group["params"][0] if group["params"] else None
        joined.append(JoinedGroup({k: v for k, v in group.items() if k != "params"},
                                  _scalars(inner["state"].get(first, {})), params))
    return joined


def write_zero3(joined: list[JoinedGroup], new_world: int, target: OptimizerLayout, extras: dict,
                top: dict) -> tuple[list[dict], list[dict]]:
    """The layout-free groups -> (the ZeRO-3 optimizer files of the `new_world` ranks, whole, the
    model files' `param_shapes`: per sub-group name -> shape). The sub-groups are the resuming
    optimizer's (`target.sub_groups`: how ZeRO-3 cuts a group depends on the world size and
    `sub_group_size`); `extras`: the entries of a file's `optimizer_state_dict` that do not depend on
    the layout (loss scaler, ...); `top`: the file's others (ds_config, ds_version)."""
    if not target.sub_groups:
        raise ValueError("writing ZeRO-3 files needs the resuming optimizer's sub-groups")
    if len(joined) != len(target.settings) or any(g >= len(joined) for g, _ in target.sub_groups):
        raise ReshardError(f"{len(joined)} optimizer parameter groups in the checkpoint, {len(target.settings)} in "
                           f"this run's")
    wanted = {name for _, shapes in target.sub_groups for name in shapes}
    saved = {name for group in joined for name in group.params}
    if wanted != saved:
        diff = sorted(wanted ^ saved)
        raise ReshardError(f"{len(diff)} parameters not in both the checkpoint and this run, e.g. {diff[0]} (a "
                           f"checkpoint of another model?)")
    files = []
    for rank in range(new_world):
        flats, state = [], {}
        for sub, (g, shapes) in enumerate(target.sub_groups):
            group = joined[g]
            pieces: dict[str, list[torch.Tensor]] = {}
            for name, shape in shapes.items():
                p = group.params[name]
                if tuple(p["fp32"].shape) != tuple(shape):
                    raise ReshardError(f"{name}: shape {tuple(p['fp32'].shape)} in the checkpoint, {tuple(shape)} in "
                                       f"this run (a checkpoint of another model?)")
                size = _zero3_slice(p["fp32"].numel(), new_world)
                for key, value in p.items():
                    piece = value.reshape(-1)[rank * size:(rank + 1) * size]
                    pieces.setdefault(key, []).extend([piece, piece.new_zeros(size - piece.numel())])
            flat = {key: torch.cat(parts) for key, parts in pieces.items()}
            flats.append(flat.pop("fp32"))
            state[sub] = {**_scalars(group.scalars), **flat}
        param_groups = [{**group.settings, "params": [sub for sub, (g, _) in enumerate(target.sub_groups) if g == gi]}
                        for gi, group in enumerate(joined)]
        files.append({**top, "optimizer_state_dict": {
            **extras, "partition_count": new_world, "fp32_flat_groups": flats,
            "optimizer_state_dict": {"state": state, "param_groups": param_groups}}})
    shapes = [OrderedDict((name, torch.Size(shape)) for name, shape in sub_shapes.items())
              for _, sub_shapes in target.sub_groups]
    return files, shapes


# -- ZeRO-0 -----------------------------------------------------------------------------------------
def join_zero0(files: list[dict], target: OptimizerLayout, weights: dict[str, torch.Tensor],
               num_experts: int) -> list[JoinedGroup]:
    """ZeRO-0 optimizer files (`files[e]`: ep rank e's, whole: {"optimizer": torch state dict}) ->
    the layout-free groups. The parameters are numbered in group order without names: they are
    named after `target`, the resuming optimizer (its dense parameters in order, then its expert
    parameters in order, the same names whatever the ep_size); their fp32 weights come from
    `weights` (the checkpoint's model files, experts in the per-expert grammar)."""
    ref = files[0]["optimizer"]
    groups = ref["param_groups"]
    moe = _dense_then_experts(groups)
    dense_names = [n for shapes, e in zip(target.shapes, target.experts) if not e for n in shapes]
    expert_names = [n for shapes, e in zip(target.shapes, target.experts) if e for n in shapes]
    dense_ids = [pid for g, group in enumerate(groups) if not moe[g] for pid in group["params"]]
    if len(dense_ids) != len(dense_names):
        raise ReshardError(f"{len(dense_ids)} dense parameters in the checkpoint's optimizer, {len(dense_names)} in "
                           f"this run's (a checkpoint of another model?)")

    def entry(states: dict, pid: int, name: str) -> dict:
        if pid not in states:
            raise ReshardError(f"{name}: no optimizer state in the checkpoint (never updated?)")
        return states[pid]

    def step_of(entries: list[dict], what: str) -> dict:
        scalars = [_scalars(e) for e in entries]
        steps = {float(s.get("step", 0)) for s in scalars}
        if len(steps) > 1:
            raise ReshardError(f"{what}: parameters at different Adam steps {sorted(steps)}; resume without ZeRO")
        return scalars[0]

    joined = []
    names = iter(dense_names)
    for g, group in enumerate(groups):
        if moe[g]:
            continue
        params, entries = {}, []
        for pid in group["params"]:
            name = next(names)
            entries.append(entry(ref["state"], pid, name))
            params[name] = _with_weights(name, entries[-1], _weight(weights, name, None))
        joined.append(JoinedGroup({k: v for k, v in group.items() if k != "params"},
                                  step_of(entries, f"parameter group {group.get('name', g)}"), params))
    expert_groups = [g for g in range(len(groups)) if moe[g]]
    if expert_groups:
        per_rank = []  # [ep rank][i]: the Adam state of the i-th expert parameter
        for rank, f in enumerate(files):
            opt = f["optimizer"]
            ids = [pid for g in expert_groups for pid in opt["param_groups"][g]["params"]]
            if len(ids) != len(expert_names):
                raise ReshardError(f"ep rank {rank}: {len(ids)} expert parameters in the checkpoint's optimizer, "
                                   f"{len(expert_names)} in this run's")
            per_rank.append([entry(opt["state"], pid, name) for pid, name in zip(ids, expert_names)])
        params = {}
        for i, name in enumerate(expert_names):
            moments = {k: torch.cat([states[i][k] for states in per_rank]) for k, v in per_rank[0][i].items()
                       if torch.is_tensor(v) and v.dim()}
            params[name] = _with_weights(name, moments, _weight(weights, name, num_experts))
        joined.append(JoinedGroup({k: v for k, v in groups[expert_groups[0]].items() if k != "params"},
                                  step_of([s for states in per_rank for s in states], "the expert parameters"),
                                  params, experts=True))
    return joined


def _weight(weights: dict[str, torch.Tensor], name: str, num_experts: Optional[int]) -> torch.Tensor:
    try:
        value = weights[name] if num_experts is None else stacked_from_per_expert(weights, name, num_experts)
    except KeyError as e:
        raise ReshardError(f"{name}: not in the checkpoint's model files ({e})") from None
    return value.float()


def _with_weights(name: str, adam: dict, fp32: torch.Tensor) -> dict:
    moments = {k: v for k, v in adam.items() if torch.is_tensor(v) and v.dim()}
    for key, value in moments.items():
        if value.shape != fp32.shape:
            raise ReshardError(f"{name}: Adam's {key} has shape {tuple(value.shape)}, the weights "
                               f"{tuple(fp32.shape)} (a checkpoint of another model?)")
    return {"fp32": fp32, **moments}


def write_zero0(joined: list[JoinedGroup], new_ep: int,
                max_expert_group_numel: int = MAX_EXPERT_GROUP_NUMEL) -> tuple[list[dict], list[dict]]:
    """The layout-free groups -> (the ZeRO-0 optimizer files of the `new_ep` ep ranks, {"optimizer":
    torch state dict} each, the per-group parameter shapes on one rank)."""
    new_groups = _per_rank_groups(joined, new_ep, max_expert_group_numel)
    files = []
    for rank in range(new_ep):
        groups, state, next_id = [], {}, 0
        for settings, scalars, copies in new_groups:
            params = copies[rank] if settings.get("moe") else copies[0]
            ids = list(range(next_id, next_id + len(params)))
            for pid, p in zip(ids, params.values()):
                state[pid] = {**_scalars(scalars), **{k: v.clone() for k, v in p.items() if k != "fp32"}}
            groups.append({**settings, "params": ids})
            next_id += len(ids)
        files.append({"optimizer": {"state": state, "param_groups": groups}})
    shapes = [{name: tuple(_first_tensor(p).shape) for name, p in copies[0].items()}
              for _, _, copies in new_groups]
    return files, shapes


def adopt_settings(joined: list[JoinedGroup], target: OptimizerLayout) -> list[JoinedGroup]:
    """The groups with the settings the resuming optimizer keeps (torch's Adam and DeepSpeed's
    CPU Adam keep different ones, and loading a state dict replaces a group's settings whole): each of
    its keys takes the saved value where there is one (lr, betas, eps, weight decay, ...), else its
    own; the group's name is its own."""
    def own(experts: bool) -> dict:
        found = [s for s, e in zip(target.settings, target.experts) if e == experts]
        return found[0] if found else {}

    out = []
    for group in joined:
        live = own(group.experts)
        if not live:
            out.append(group)
            continue
        settings = {k: (group.settings[k] if k in group.settings and k != "name" else v) for k, v in live.items()
                    if k != "params"}
        out.append(JoinedGroup(settings, group.scalars, group.params, group.experts))
    return out
