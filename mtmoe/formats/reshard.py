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
weights and Adam moments of rank r's partition): changing the world size or the ep_size (stacked
experts) joins each group's partitions back into per-parameter tensors, regroups the experts' rows
by the new ep ranks and cuts new partitions for the new ranks (`mtmoe.formats.optimizer_state`);
the main file's `dp_world_size` and parameter shapes follow.

**ZeRO-0 <-> ZeRO-1/2** (e.g. a run started on one GPU without ZeRO continued on eight with ZeRO-2,
or with the optimizer offloaded to the CPU): the same per-parameter form in between. A ZeRO-0 file
numbers its parameters without names and holds no weights: the names are the resuming optimizer's
(`OptimizerLayout`, from the live engine: the same groups in the same order), the fp32 weights
come from the model files (mtmoe's weights are fp32 in every precision: bf16 is autocast), and the
result is checked against the resuming optimizer's groups, name for name and shape for shape.
Each group keeps its saved settings (lr, betas, eps, ...) under the keys the resuming optimizer
keeps (torch's Adam and DeepSpeed's CPU Adam differ).

Rank 0 converts, holding the whole optimizer state (fp32 weights and two moments: 12 bytes per
parameter) about four times over in host memory for the while (the old files, the joined
parameters, the flat copy, the new partitions).

**ZeRO-3** (no expert parallelism; every rank's `zero_pp_rank_{r}_..._optim_states.pt` holds its
slice of every parameter, per sub-group, and its `..._model_states.pt` the sub-groups' names and
shapes): a change of world size, or of the Adam (optimizer offloaded or no longer; parameter offload
changes no file), joins the slices and cuts them for the resuming optimizer's sub-groups. ZeRO-3
does not convert to or from the other stages (their parameter names and groups are DeepSpeed's
native MoE's, ZeRO-3's mtmoe's own MoE layers').
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from mtmoe.formats.ds_checkpoint import (MAIN_FILE, load_tensors, load_zero_optimizer_file, native_state_dict,
                                         zero3_model_file, zero_optimizer_file)
from mtmoe.formats.integrity import MANIFEST, STATE_JSON
from mtmoe.formats.optimizer_state import (ZERO3_PARTITION_KEYS, OptimizerLayout, ReshardError, adopt_settings,
                                           follow_groups, group_kinds, join_zero, join_zero0, join_zero3, write_zero,
                                           write_zero0, write_zero3, zero_file_entries)

log = logging.getLogger("mtmoe")


def optim_file(tag_dir: Path, ep_rank: int) -> Path:
    return tag_dir / f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def saved_layout(tag_dir: Path) -> dict:
    """world_size, ep_size, zero_stage, accumulate, expert_storage and offload_optimizer the checkpoint
    was written with (what `mtmoe.train.layout.TrainingLayout.checkpoint_layout` records)."""
    state = json.loads((tag_dir / STATE_JSON).read_text())
    zero = state.get("zero_stage")
    if zero is None:  # checkpoints written before the stage was recorded
        zero = (3 if zero3_model_file(tag_dir, 0).is_file() and not (tag_dir / MAIN_FILE).is_file()
                else 1 if any(tag_dir.glob("zero_pp_rank_*")) else 0)
    offload = state.get("offload_optimizer")
    if offload is None and zero:  # checkpoints written before it was recorded: their ZeRO config says
        config = load_zero_optimizer_file(tag_dir, 0, mmap=True).get("ds_config", {})
        offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return {"world_size": state.get("world_size", 1), "ep_size": state.get("ep_size", 1), "zero_stage": zero,
            "accumulate": state.get("accumulate", 1), "offload_optimizer": offload,
            "expert_storage": state.get("expert_storage", "per_expert")}  # before stacked experts: per expert


def check_resumable(saved: dict, current: dict, tag_dir: Path) -> bool:
    """True when the optimizer files must be rewritten (ZeRO-0: the ep_size changed; ZeRO-1/2: the
    world size, the ep_size or the optimizer's offload; ZeRO-0 <-> ZeRO-1/2; ZeRO-3: the world size,
    or the optimizer offloaded or no longer); ReshardError when the change cannot be made (ZeRO-3 <->
    another stage, among others); False when the checkpoint loads as it is. ZeRO-1 and ZeRO-2 write the same files (DeepSpeed's
    one optimizer class, with and without partitioned gradients): either resumes the other's."""
    if current.get("expert_storage") not in (None, saved["expert_storage"]):
        raise ReshardError(f"{tag_dir}: its experts' optimizer state is laid out {saved['expert_storage']} "
                           f"(one entry per expert tensor unless 'stacked'; checkpoints from before stacked experts "
                           f"are per_expert), this run's is {current['expert_storage']}: resume with "
                           f"moe.expert_storage={saved['expert_storage']}, or export the run (weights are "
                           f"layout-free) and continue in a new run dir with init.from_moe=<export>")
    if saved["zero_stage"] != current["zero_stage"] and 3 in (saved["zero_stage"], current["zero_stage"]):
        raise ReshardError(f"{tag_dir}: written with train.zero_stage={saved['zero_stage']}, resumed with "
                           f"{current['zero_stage']}: ZeRO-3 partitions every parameter its own way and converts only "
                           f"to ZeRO-3 at another world size or offload; resume with "
                           f"train.zero_stage={saved['zero_stage']} (stages 0, 1 and 2 convert into each other)"
                           + (", or export the run and continue in a new run dir with init.from_moe=<export> (Adam "
                              "restarts)" if saved["zero_stage"] == 3 else ""))
    changed = saved["ep_size"] != current["ep_size"] or saved["world_size"] != current["world_size"]
    converts = (saved["zero_stage"] == 0) != (current["zero_stage"] == 0)  # ZeRO-0 <-> ZeRO-1/2
    if changed and saved["world_size"] * saved["accumulate"] != current["world_size"] * current["accumulate"]:
        log.warning("%s: the global batch changes from %d to %d micro-batches per step (world x train.accumulate): "
                    "training continues, but not with the batches of the original layout", tag_dir,
                    saved["world_size"] * saved["accumulate"], current["world_size"] * current["accumulate"])
    if saved["zero_stage"] == 3:  # no expert parallelism there: the world size and the Adam
        return changed or _other_adam(saved, current, offloaded=lambda device: device not in (None, "none"))
    # DeepSpeed's CPU Adam and torch's Adam keep different group settings, which loading replaces whole
    other_adam = saved["zero_stage"] in (1, 2) and current["zero_stage"] in (1, 2) and _other_adam(saved, current)
    rewrites_zero = converts or other_adam or (changed and saved["zero_stage"] > 0)
    for key, setting, why in (("zero_round_robin", "round_robin_gradients", "orders each ZeRO parameter group by "
                               "the number of ranks"),
                              ("zero_parameter_alignment", "parameter_alignment", "pads each parameter")):
        if rewrites_zero and current["zero_stage"] > 0 and current.get(key):
            raise ReshardError(f"{tag_dir}: DeepSpeed's {setting} (zero_optimization) {why}, which resharding "
                               f"does not; resume at the layout that wrote the checkpoint, or without {setting}")
    if rewrites_zero and saved["expert_storage"] == "per_expert":
        raise ReshardError(f"{tag_dir}: a ZeRO-{saved['zero_stage']} checkpoint of experts stored per expert resumes "
                           f"only at its layout (world {saved['world_size']}, ep_size {saved['ep_size']}, ZeRO stage "
                           f"{'0' if saved['zero_stage'] == 0 else '1 or 2'}, optimizer offload "
                           f"{saved.get('offload_optimizer') or 'none'}); converting ZeRO partitions needs "
                           f"moe.expert_storage=stacked")
    return saved["ep_size"] != current["ep_size"] or rewrites_zero


def _other_adam(saved: dict, current: dict, offloaded=lambda device: device) -> bool:
    """Whether the resuming optimizer is another Adam than the saved one (torch's Adam without
    offload, DeepSpeed's CPU Adam with: their group settings differ, and loading replaces a group's
    settings whole). `offloaded`: the offload device -> what decides the Adam (ZeRO-3 offloads to the
    CPU or NVMe with the same CPU Adam). Unknown for checkpoints that do not say."""
    if saved.get("offload_optimizer") is None:
        return False
    return offloaded(saved["offload_optimizer"]) != offloaded(current.get("offload_optimizer",
                                                                          saved["offload_optimizer"]))


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


def _zero_files(tag_dir: Path, saved: dict) -> tuple[list[dict], dict]:
    """A ZeRO-1/2 tag's optimizer files (every rank's, whole) and its main file."""
    files = [load_zero_optimizer_file(tag_dir, rank) for rank in range(saved["world_size"])]
    if files[0].get("ds_config", {}).get("zero_optimization", {}).get("round_robin_gradients"):
        raise ReshardError(f"{tag_dir}: written with DeepSpeed's round_robin_gradients, which orders each ZeRO "
                           f"parameter group by the number of ranks; resume at the layout that wrote it")
    return files, load_tensors(tag_dir / MAIN_FILE)


def _zero0_files(tag_dir: Path, saved: dict, main: Optional[dict] = None) -> list[dict]:
    """A ZeRO-0 tag's optimizer files, one per ep rank ({"optimizer": torch state dict}); a model
    without MoE layers has its optimizer state in the main file (`main`, when given)."""
    paths = [optim_file(tag_dir, rank) for rank in range(saved["ep_size"])]
    if not paths[0].is_file() and main is not None and main.get("optimizer") is not None and saved["ep_size"] == 1:
        return [{"optimizer": main["optimizer"]}]
    for path in paths:
        if not path.is_file():
            raise ReshardError(f"{path}: missing (needed to reshard the ZeRO-0 optimizer state)")
    return [torch.load(path, map_location="cpu", weights_only=True) for path in paths]


def _check_groups(shapes: list[dict], target: Optional[OptimizerLayout]) -> None:
    """The converted optimizer groups are the resuming optimizer's, name for name and shape for shape."""
    if target is None:
        return
    want = [{name: tuple(shape) for name, shape in group.items()} for group in target.shapes]
    got = [{name: tuple(shape) for name, shape in group.items()} for group in shapes]
    if got != want:
        diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise ReshardError(f"the converted optimizer has {len(got)} parameter groups, this run's {len(want)}; "
                           f"group {diff} differs (a checkpoint of another model?)")


def _write_main(main: dict, out_dir: Path, new_world: int, new_zero: int, shapes: list[dict],
                zero0_optimizer: Optional[dict], kinds: tuple[list[bool], list[bool]]) -> None:
    """The main file as DeepSpeed writes it at the new layout: `dp_world_size` (it reads that many
    ZeRO files), under ZeRO-1/2 the optimizer's parameter shapes, without ZeRO the optimizer state
    of ep rank 0 (what it loads for a model without MoE layers), and the lr scheduler's per-group
    lists for the new groups (`kinds`: old and new groups, True for experts; a big model has as many
    expert groups as its ep_size needs, and torch's schedulers zip them with the optimizer's groups)."""
    scheduler = main.get("lr_scheduler")
    if isinstance(scheduler, dict) and kinds[0] != kinds[1]:
        main["lr_scheduler"] = {k: follow_groups(v, *kinds) if isinstance(v, list) and len(v) == len(kinds[0]) else v
                                for k, v in scheduler.items()}
    main["dp_world_size"] = new_world
    main["param_shapes"] = ([OrderedDict((name, torch.Size(shape)) for name, shape in group.items()) for group in shapes]
                            if new_zero else None)
    main["optimizer"] = zero0_optimizer
    main["shared_params"] = {} if new_zero else None
    for key in ("frozen_param_shapes", "frozen_param_fragments"):
        main[key] = OrderedDict() if new_zero == 2 else None
    torch.save(main, out_dir / MAIN_FILE)


def _convert(tag_dir: Path, out_dir: Path, saved: dict, new_world: int, new_ep: int, new_zero: int,
             num_experts: int, target: Optional[OptimizerLayout]) -> None:
    """Writes the optimizer files and the main file of the new layout into `out_dir`: between
    ZeRO-1/2 layouts, and between ZeRO-0 and ZeRO-1/2 (`target` needed: a ZeRO-0 file has no names)."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if saved["zero_stage"]:
        files, main = _zero_files(tag_dir, saved)
        joined = join_zero(files, main["param_shapes"], saved["ep_size"])
        old_kinds = group_kinds(files[0]["optimizer_state_dict"]["base_optimizer_state"]["param_groups"])
        extras, top = zero_file_entries(files[0])
    else:
        if target is None:
            raise ValueError("converting a ZeRO-0 checkpoint needs the resuming optimizer's layout")
        main = load_tensors(tag_dir / MAIN_FILE)
        files = _zero0_files(tag_dir, saved, main)
        joined = join_zero0(files, target, native_state_dict(tag_dir, main), num_experts)
        old_kinds = group_kinds(files[0]["optimizer"]["param_groups"])
        # loss scaler, overflow and clip_grad: DeepSpeed keeps the engine's own where a file has none
        extras = {"ds_version": main["ds_version"]}
        top = {"ds_config": target.ds_config, "ds_version": main["ds_version"]}
    if target is not None:
        joined = adopt_settings(joined, target)  # e.g. torch's Adam <-> DeepSpeed's CPU Adam
    if new_zero:
        extras["zero_stage"] = ZeroStageEnum(new_zero)
        new_files, shapes = write_zero(joined, new_world, new_ep, extras, top)
        for rank, content in enumerate(new_files):
            torch.save(content, zero_optimizer_file(out_dir, rank))
        new_kinds = group_kinds(new_files[0]["optimizer_state_dict"]["base_optimizer_state"]["param_groups"])
        zero0_optimizer = None
    else:
        new_files, shapes = write_zero0(joined, new_ep)
        if any(group.experts for group in joined):  # else DeepSpeed reads the main file's only
            for rank, content in enumerate(new_files):
                torch.save(content, optim_file(out_dir, rank))
        new_kinds = group_kinds(new_files[0]["optimizer"]["param_groups"])
        zero0_optimizer = new_files[0]["optimizer"]
    _check_groups(shapes, target)
    _write_main(main, out_dir, new_world, new_zero, shapes, zero0_optimizer, (old_kinds, new_kinds))


def _convert_zero3(tag_dir: Path, out_dir: Path, saved: dict, new_world: int, target: OptimizerLayout) -> None:
    """Writes every rank's ZeRO-3 optimizer and model files of a world of `new_world` into `out_dir`
    (the model files hold no weights under ZeRO-3, only placeholders, the lr schedule and the training
    state: rank 0's, with the new world and sub-groups)."""
    files = [load_zero_optimizer_file(tag_dir, rank) for rank in range(saved["world_size"])]
    model = load_tensors(zero3_model_file(tag_dir, 0))
    joined = adopt_settings(join_zero3([f["optimizer_state_dict"] for f in files], model["param_shapes"]), target)
    extras = {k: v for k, v in files[0]["optimizer_state_dict"].items() if k not in ZERO3_PARTITION_KEYS}
    top = {**{k: v for k, v in files[0].items() if k != "optimizer_state_dict"}, "ds_config": target.ds_config}
    new_files, shapes = write_zero3(joined, new_world, target, extras, top)
    model.update(dp_world_size=new_world, param_shapes=shapes, ds_config=target.ds_config)
    for rank, content in enumerate(new_files):
        torch.save(content, zero_optimizer_file(out_dir, rank))
        torch.save(model, zero3_model_file(out_dir, rank))
        # DeepSpeed's NVMe-offloaded optimizer copies this folder into its swap folder on loading; the
        # swapped state is then rewritten from the files (mtmoe.train.zero3_swap)
        (out_dir / "offloaded_tensors" / f"rank{rank:02d}").mkdir(parents=True, exist_ok=True)


def reshard_checkpoint(tag_dir: Path, out_dir: Path, new_world: int, new_ep: int, num_experts: int,
                       num_moe_layers: int, new_zero: Optional[int] = None,
                       target: Optional[OptimizerLayout] = None, new_offload: Optional[str] = None) -> None:
    """Writes `out_dir`: `tag_dir` with the optimizer files (and, with ZeRO-1/2 on either side, the
    main file) of a layout of `new_world` ranks, `new_ep` of them expert-parallel, at ZeRO stage
    `new_zero` (default: the checkpoint's), and its mtmoe_state.json; the other files are hard links
    to the source's. `target`: the resuming optimizer (`OptimizerLayout`), needed to convert from
    ZeRO-0 or ZeRO-3, and then checked against; `new_offload`: its `train.offload_optimizer` (for the log). A
    file written here is never one of those links: writing through a link would change the source
    tag, which would then fail its manifest."""
    saved = saved_layout(tag_dir)
    new_zero = saved["zero_stage"] if new_zero is None else new_zero
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    rewritten = {MANIFEST, STATE_JSON, *([MAIN_FILE] if saved["zero_stage"] or new_zero else [])}
    for path in tag_dir.iterdir():  # the optimizer files of either kind are rewritten
        if path.is_file() and not path.name.startswith(("zero_pp_rank_", "expp_rank_")) and path.name not in rewritten:
            _link_or_copy(path, out_dir / path.name)
    if saved["zero_stage"] == 3:
        if target is None:
            raise ValueError("converting a ZeRO-3 checkpoint needs the resuming optimizer's layout")
        _convert_zero3(tag_dir, out_dir, saved, new_world, target)
    elif saved["zero_stage"] or new_zero:
        _convert(tag_dir, out_dir, saved, new_world, new_ep, new_zero, num_experts, target)
    else:
        regrouped = reshard_optimizer_states(_zero0_files(tag_dir, saved), num_experts, num_moe_layers, new_ep,
                                             saved["expert_storage"])
        for rank, content in enumerate(regrouped):
            torch.save(content, optim_file(out_dir, rank))
    state = json.loads((tag_dir / STATE_JSON).read_text())
    state["resharded_from"] = {"ep_size": saved["ep_size"], "world_size": saved["world_size"],
                               "zero_stage": saved["zero_stage"]}
    (out_dir / STATE_JSON).write_text(json.dumps(state, indent=1))
    stages = f"ZeRO-{saved['zero_stage']}" + (f" -> ZeRO-{new_zero}" if new_zero != saved["zero_stage"] else "")
    offload = (f", optimizer offload {saved['offload_optimizer']} -> {new_offload}"
               if new_offload not in (None, saved.get("offload_optimizer")) else "")
    log.info("resharded %s: ep_size %d -> %d, world %d -> %d (%s%s)", tag_dir.name, saved["ep_size"], new_ep,
             saved["world_size"], new_world, stages, offload)
