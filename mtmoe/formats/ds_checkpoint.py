"""The DeepSpeed checkpoint format of an mtmoe run, read without DeepSpeed's training engine.

Layout of `RUN_DIR/checkpoints/`:

    step00000400/            one complete checkpoint (DeepSpeed's files + mtmoe_state.json + manifest.json)
    step00000600/
    latest                   the tag to resume from, written last
    .partial-step00000800/   a save in progress (or one a crash interrupted; removed on the next start)

In a tag directory: the non-expert weights in `mp_rank_00_model_states.pt` (names inside
DeepSpeed's MoE container: `deepspeed_moe.gate.` / `deepspeed_moe.experts.deepspeed_experts.`),
every expert in `layer_<L>_expert_<E>_mp_rank_00_model_states.pt` (global expert ids), the
optimizer state per rank (`expp_rank_<r>_...` for ZeRO-0, `zero_pp_rank_<r>_...` for ZeRO-1..3).
Everything is read with `torch.load(weights_only=True)`, never full unpickling. Saving and loading
into a live engine is `mtmoe.train.checkpoint`'s; resharding is `mtmoe.formats.reshard`'s.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import torch

from mtmoe.errors import ExportError
from mtmoe.formats.integrity import STATE_JSON
from mtmoe.model.experts import per_expert_state

PARTIAL_PREFIX = ".partial-"
"""`<PARTIAL_PREFIX><tag>`: a save under way (or killed) that is not sealed yet; never read."""
RETIRED_PREFIX = ".retired-"
"""`<RETIRED_PREFIX><tag>`: a sealed checkpoint moved aside while a re-save of its step takes its
name; put back when that re-save was killed before the new one was in place."""
DS_GATE = "deepspeed_moe.gate."
DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."
MAIN_FILE = "mp_rank_00_model_states.pt"
"""A tag's main file (not under ZeRO-3): the dense weights, the lr schedule, `dp_world_size` and,
under ZeRO-1/2, the optimizer's `param_shapes`."""


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


def to_plain_name(name: str) -> str:
    """DeepSpeed MoE container name -> plain model name (expert ids unchanged)."""
    return name.replace(DS_GATE, "gate.").replace(DS_EXPERTS, "experts.")


def load_tensors(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from e


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run_dir, tag_dir) from a run dir (uses `checkpoints/latest`) or a tag dir."""
    path = path.absolute()
    if (path / "checkpoints" / "latest").is_file():
        tag = (path / "checkpoints" / "latest").read_text().strip()
        return path, path / "checkpoints" / tag
    if (path / MAIN_FILE).is_file() or zero3_model_file(path, 0).is_file():  # a tag dir (ZeRO-3: no main file)
        return path.parent.parent, path
    raise ExportError(f"{path}: no DeepSpeed checkpoint here (expected checkpoints/latest or a checkpoint tag's "
                      f"mp_rank_00_model_states.pt / zero_pp_rank_0_mp_rank_00_model_states.pt)")


def is_snapshot(tag_dir: Path) -> bool:
    """Whether the checkpoint is one of the run's `train.snapshots` (its mtmoe_state.json says so;
    checkpoints from before snapshots were marked are not)."""
    try:
        return bool(json.loads((tag_dir / STATE_JSON).read_text()).get("snapshot"))
    except (OSError, ValueError):
        return False


def newest_tags(run_dir: Path, last: str, count: int) -> list[str]:
    """The checkpoints `mtmoe-export average=N` averages, oldest first: when `last` is a snapshot,
    the `count` newest snapshots up to and including it (the run's `save_every` checkpoints between
    them are not averaged); else the `count` newest complete tags up to and including `last`."""
    tags = [t for t in complete_tags(run_dir) if t <= last]
    if last not in tags:
        raise ExportError(f"{checkpoint_dir(run_dir) / last}: not a complete checkpoint of {run_dir}")
    if is_snapshot(checkpoint_dir(run_dir) / last):
        snapshots = [t for t in tags if is_snapshot(checkpoint_dir(run_dir) / t)]
        if len(snapshots) < count:
            raise ExportError(f"average={count}: {run_dir} has {len(snapshots)} snapshot(s) up to {last} "
                              f"({', '.join(snapshots)}); train with train.snapshots={count} (or more)")
        return snapshots[-count:]
    if len(tags) < count:
        raise ExportError(f"average={count}: {checkpoint_dir(run_dir)} has {len(tags)} complete checkpoint(s) up to "
                          f"{last} ({', '.join(tags)}); train with train.snapshots={count} (or more) to keep them")
    return tags[-count:]


def zero3_model_file(tag_dir: Path, rank: int) -> Path:
    """Rank `rank`'s model file under ZeRO-3 (parameter placeholders, shapes, training state; there
    is no main file)."""
    return tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def zero_optimizer_file(tag_dir: Path, rank: int) -> Path:
    """Rank `rank`'s optimizer file under ZeRO-1..3."""
    return tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def load_zero_optimizer_file(tag_dir: Path, rank: int, mmap: bool = False) -> dict:
    """Rank `rank`'s ZeRO-1..3 optimizer file, whole (`optimizer_state_dict`: fp32 partitions, Adam
    state, param groups, paddings, ...; `ds_config`, `ds_version`), read with `weights_only=True`
    and only DeepSpeed's loss scalers, stage enum and fragment addresses allowed besides tensors;
    `mmap`: the tensors are mapped, not read (for a look at the file's other entries)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = zero_optimizer_file(tag_dir, rank)
    if not path.is_file():
        raise ExportError(f"{path}: missing (a ZeRO checkpoint needs the optimizer file of every rank)")
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ExportError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from e


def load_zero3_optimizer_state(tag_dir: Path, rank: int) -> dict:
    """Rank `rank`'s ZeRO-3 optimizer state (`optimizer_state_dict`: fp32 flat groups, Adam state,
    param groups)."""
    return load_zero_optimizer_file(tag_dir, rank)["optimizer_state_dict"]


def zero3_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a ZeRO-3 checkpoint (`train.zero_stage=3`, e.g. `parallel=zero3_nvme`).

    Each rank r saved, per optimizer sub-group, one flat fp32 tensor: for every parameter (in the
    order of `param_shapes`) its r-th slice of ceil(numel / world) elements (the last rank's slice
    zero-padded). A parameter is the concatenation of its slices over the ranks, cut to numel.
    Same layout as DeepSpeed's `zero_to_fp32`, read here without unpickling arbitrary objects."""
    model_files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                         key=lambda p: int(p.name.split("_")[3]))
    world = len(model_files)
    first = load_tensors(model_files[0])
    flats = []
    for rank in range(world):
        groups = load_zero3_optimizer_state(tag_dir, rank)["fp32_flat_groups"]
        flats.append(torch.cat([g.detach().float() for g in groups]))
    state, offset = {}, 0
    for shapes in first["param_shapes"]:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = -(-numel // world)
            pieces = [flat.narrow(0, offset, part) for flat in flats]
            state[name] = torch.cat(pieces).narrow(0, 0, numel).view(shape).clone()
            offset += part
    for name in first.get("buffer_names", []):
        state[name] = first["module"][name]
    return state


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict, plain names, all experts, from one DeepSpeed checkpoint tag
    (native-MoE layouts with ZeRO 0-2, or ZeRO-3)."""
    main = tag_dir / MAIN_FILE
    if not main.is_file() and zero3_model_file(tag_dir, 0).is_file():
        state = per_expert_state(zero3_state_dict(tag_dir))
        return {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    if not main.is_file():
        raise ExportError(f"{main}: missing (incomplete checkpoint?)")
    state = {to_plain_name(k): v for k, v in native_state_dict(tag_dir).items()}
    return {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}


def native_state_dict(tag_dir: Path, main: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """A native-MoE tag's weights under DeepSpeed's names: the main file's dense ones (`main`: that
    file already loaded) and every expert file's (per-expert grammar, global expert ids)."""
    state = dict((load_tensors(tag_dir / MAIN_FILE) if main is None else main)["module"])
    for expert_file in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(load_tensors(expert_file))
    return state


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
