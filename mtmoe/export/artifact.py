"""Standalone export artifacts: `config.json` + `model.safetensors` + `spm.model`.

An export loads with torch, safetensors and sentencepiece alone: no DeepSpeed, no pickle. It is
made from a training run's DeepSpeed checkpoint by reading the non-expert weights from
`mp_rank_00_model_states.pt` and every expert from DeepSpeed's per-expert files
`layer_<L>_expert_<E>_mp_rank_00_model_states.pt` (global expert ids), mapping DeepSpeed's
container names back to the plain model's, and loading them strictly into a world-of-one model.
Our own checkpoints are read with `torch.load(weights_only=True)`, never full unpickling.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from mtmoe.config import QUANT_BITS, ConfigError, ModelConfig, MoEConfig
from mtmoe.data.vocab import Vocab
from mtmoe.model.experts import per_expert_state
from mtmoe.model.seq2seq import Seq2Seq

FORMAT = "mtmoe-export-v1"
DS_GATE = "deepspeed_moe.gate."
DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."


log = logging.getLogger("mtmoe")


class ExportError(RuntimeError):
    """A missing or unusable checkpoint/export; the message names the path."""


def trained_directions(config: dict) -> Optional[list[str]]:
    """The translation directions the model was trained on (`training.directions` of config.json,
    from the run's model.json), e.g. ["en-de", "de-en"]; None for exports made before it was recorded."""
    training = config.get("training")
    return list(training["directions"]) if training and "directions" in training else None


def zero_shot(config: dict, pairs) -> list[str]:
    """The directions of `pairs` ((src, tgt) tuples) the model was not trained on ([] when unknown)."""
    trained = trained_directions(config)
    return [] if trained is None else [f"{s}-{t}" for s, t in pairs if f"{s}-{t}" not in trained]


def warn_zero_shot(config: dict, pairs, field: str) -> list[str]:
    """Warns (one line, naming `field`) about directions of `pairs` the model was not trained on; returns them."""
    untrained = zero_shot(config, pairs)
    if untrained:
        log.warning("%s: %s not among the directions the model was trained on (%s): zero-shot, expect poor output",
                    field, ", ".join(untrained), ", ".join(trained_directions(config)))
    return untrained


def to_plain_name(name: str) -> str:
    """DeepSpeed MoE container name -> plain model name (expert ids unchanged)."""
    return name.replace(DS_GATE, "gate.").replace(DS_EXPERTS, "experts.")


def _load_tensors(path: Path) -> dict:
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
    if (path / "mp_rank_00_model_states.pt").is_file():
        return path.parent.parent, path
    raise ExportError(f"{path}: no DeepSpeed checkpoint here (expected checkpoints/latest or mp_rank_00_model_states.pt)")


def load_zero3_optimizer_state(tag_dir: Path, rank: int) -> dict:
    """Rank `rank`'s ZeRO-3 optimizer file (`optimizer_state_dict`: fp32 flat groups, Adam state,
    param groups), read with `weights_only=True` and only DeepSpeed's loss-scaler and stage enum
    allowed besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    if not path.is_file():
        raise ExportError(f"{path}: missing (a ZeRO-3 checkpoint needs the optimizer file of every rank)")
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum]):
            return torch.load(path, map_location="cpu", weights_only=True)["optimizer_state_dict"]
    except Exception as e:
        raise ExportError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from e


def _zero3_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a ZeRO-3 checkpoint (`train.zero_stage=3`, e.g. `parallel=zero3_nvme`).

    Each rank r saved, per optimizer sub-group, one flat fp32 tensor: for every parameter (in the
    order of `param_shapes`) its r-th slice of ceil(numel / world) elements (the last rank's slice
    zero-padded). A parameter is the concatenation of its slices over the ranks, cut to numel.
    Same layout as DeepSpeed's `zero_to_fp32`, read here without unpickling arbitrary objects."""
    model_files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                         key=lambda p: int(p.name.split("_")[3]))
    world = len(model_files)
    first = _load_tensors(model_files[0])
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
    main = tag_dir / "mp_rank_00_model_states.pt"
    if not main.is_file() and (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():
        state = per_expert_state(_zero3_state_dict(tag_dir))
        return {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    if not main.is_file():
        raise ExportError(f"{main}: missing (incomplete checkpoint?)")
    state = {to_plain_name(k): v for k, v in _load_tensors(main)["module"].items()}
    for expert_file in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        for k, v in _load_tensors(expert_file).items():
            state[to_plain_name(k)] = v
    return {k: v.float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}


def _configs(desc: dict) -> tuple[ModelConfig, MoEConfig]:
    """The model to build from a run's model.json or an export's config.json: all experts in one
    process, stored stacked (how a run laid its experts out is training's business)."""
    model_cfg = ModelConfig(**desc["model"])
    moe_cfg = MoEConfig(**{**desc["moe"], "ep_size": 1, "expert_storage": "stacked"})
    return model_cfg, moe_cfg


def check_output_dir(out_dir: Path, overwrite: bool, source: Optional[Path] = None) -> None:
    """ExportError unless `out_dir` may receive an export: it does not exist, is an empty
    directory, or is an export and `overwrite` is set. Anything else is never replaced."""
    out = Path(out_dir).absolute()
    if source is not None and out == Path(source).absolute():
        raise ExportError(f"out={out_dir} is the export being read: write to another directory")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / "config.json").is_file():
        raise ExportError(f"out={out_dir} exists and is not an mtmoe export: choose another directory "
                          f"(it is never replaced)")
    if not overwrite:
        raise ExportError(f"out={out_dir} already holds an export: give overwrite=true to replace it, or "
                          f"another out=")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write(model: Seq2Seq, spm_path: Path, config: dict, out_dir: Path) -> Path:
    """Writes config.json + model.safetensors + spm.model; the directory appears complete or not at all."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = tmp / "model.safetensors"
    # Experts are rows of stacked tensors in memory: each gets its own storage in the file.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(weights))
    os.chmod(weights, 0o666 & ~_umask())  # safetensors writes 0600; the other files get the usual mode
    shutil.copyfile(spm_path, tmp / "spm.model")
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _load_checkpoint_model(checkpoint: Path) -> tuple[Seq2Seq, Path, dict]:
    """(full plain model, spm path, export config) from a run dir or checkpoint tag dir."""
    from mtmoe.train.checkpoint import verify

    run_dir, tag_dir = resolve_checkpoint(checkpoint)
    problem = verify(tag_dir)
    if problem:
        raise ExportError(f"unusable checkpoint: {problem}")
    desc_path = run_dir / "model.json"
    if not desc_path.is_file():
        raise ExportError(f"{desc_path}: missing (is {run_dir} an mtmoe training run?)")
    desc = json.loads(desc_path.read_text())
    model_cfg, moe_cfg = _configs(desc)
    model = Seq2Seq(desc["vocab_size"], model_cfg, moe_cfg)
    state = consolidated_state_dict(tag_dir)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        from mtmoe.train.checkpoint import summarize_load_error

        raise ExportError(f"{tag_dir} does not match {desc_path} ({summarize_load_error(str(e))}): the run's "
                          f"model.json describes another model than its checkpoint (was it overwritten by a "
                          f"start with other model settings?)") from None
    config = {"format": FORMAT, "vocab_size": desc["vocab_size"], "langs": desc["langs"],
              "model": asdict(model_cfg), "moe": asdict(moe_cfg),
              "source": {"run_dir": str(run_dir), "checkpoint": tag_dir.name}}
    if desc.get("training"):
        config["training"] = desc["training"]
    return model.eval(), run_dir / "spm.model", config


def export_run(checkpoint: str | Path, out_dir: str | Path, prune: Optional[dict] = None,
               quant: Optional[str] = None, overwrite: bool = False) -> Path:
    """Export of a run's latest checkpoint (or of an existing export), optionally expert-pruned
    (`prune`: {"keep": k} or {"direction": "en-de", "mass": 0.9}, plus "calibration" prefix and
    "lines") and quantized (`quant`: "int8" | "int4"). An existing export at `out_dir` is replaced
    only with `overwrite` (checked before any work)."""
    checkpoint = Path(checkpoint)
    check_output_dir(Path(out_dir), overwrite, checkpoint)
    bits = QUANT_BITS.get(quant) if quant and quant != "none" else None
    if quant and quant != "none" and bits is None:
        raise ConfigError(f"quant={quant!r}: expected none, {' or '.join(QUANT_BITS)}")
    if (checkpoint / "config.json").is_file():
        model, _, config = load_export(checkpoint)
        spm_path = checkpoint / "spm.model"
        config = copy.deepcopy(config)
    else:
        model, spm_path, config = _load_checkpoint_model(checkpoint)
    if prune:
        model, config = _prune(model, spm_path, config, prune)
    if bits is not None:
        if config.get("quantization"):
            raise ExportError(f"{checkpoint}: already quantized ({config['quantization']['bits']} bits)")
        from mtmoe.export.quantize import quantize_experts

        quantize_experts(model, bits)
        config["quantization"] = {"bits": bits, "scheme": "weight-only, per output channel, symmetric",
                                  "targets": "expert fc1/fc2 weights"}
    return _write(model, spm_path, config, Path(out_dir))


def _prune(model: Seq2Seq, spm_path: Path, config: dict, prune: dict) -> tuple[Seq2Seq, dict]:
    from mtmoe.data.corpus import load_test_set
    from mtmoe.data.sampling import parse_directions
    from mtmoe.eval.telemetry import collect_routing
    from mtmoe.export.prune import direction_keep, global_keep, prune_state_dict

    if config.get("quantization"):
        raise ExportError("prune before quantizing: this export is already quantized")
    if config["moe"].get("kept_experts"):
        raise ExportError("this export is already pruned; prune from the full model")
    if not config["moe"]["enabled"]:
        raise ConfigError("prune: the model has no MoE layers")
    calibration = prune.get("calibration") or "data/multi30k/val"
    langs = config["langs"]
    direction = prune.get("direction")
    directions = parse_directions(direction, langs) if direction else parse_directions("all", langs)
    if direction:
        warn_zero_shot(config, directions, "prune.direction")
    needed = sorted({lang for pair in directions for lang in pair})
    texts = load_test_set(calibration, needed)
    lines = int(prune.get("lines") or 0)
    if lines:
        texts = {lang: t[:lines] for lang, t in texts.items()}
    telemetry = collect_routing(model, Vocab(spm_path), texts, directions, progress="calibration")
    top_k = config["moe"]["top_k"]
    if direction:
        kept = direction_keep(telemetry, direction, float(prune.get("mass") or 0.9), min_experts=top_k)
        rule = {"rule": "direction", "direction": direction, "mass": float(prune.get("mass") or 0.9)}
    else:
        kept = global_keep(telemetry, float(prune["keep"]), min_experts=top_k)
        rule = {"rule": "global", "keep": prune["keep"]}
    config = copy.deepcopy(config)
    config["moe"]["kept_experts"] = kept
    config["pruning"] = {**rule, "kept": kept, "calibration": str(calibration),
                         "calibration_lines": len(texts[needed[0]]), "telemetry": telemetry["overall"]}
    model_cfg, moe_cfg = _configs(config)
    pruned = Seq2Seq(config["vocab_size"], model_cfg, moe_cfg)
    pruned.load_state_dict(prune_state_dict(model.state_dict(), kept), strict=True)
    return pruned.eval(), config


def read_export_config(export_dir: str | Path) -> dict:
    """An export's validated config.json (no weights are read)."""
    config_path = Path(export_dir) / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: missing (not an mtmoe export)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{config_path}: invalid JSON ({e})") from e
    if config.get("format") != FORMAT:
        raise ExportError(f"{config_path}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_export(export_dir: str | Path, model_cls=Seq2Seq) -> tuple[Seq2Seq, Vocab, dict]:
    """(model in eval mode, vocabulary, config) of an export; torch + safetensors only."""
    d = Path(export_dir)
    config_path = d / "config.json"
    config = read_export_config(d)
    model_cfg, moe_cfg = _configs(config)
    model = model_cls(config["vocab_size"], model_cfg, moe_cfg)
    if config.get("quantization"):
        from mtmoe.export.quantize import quantize_experts

        quantize_experts(model, config["quantization"]["bits"])
    try:
        state = load_file(str(d / "model.safetensors"))
    except Exception as e:
        raise ExportError(f"{d / 'model.safetensors'}: unreadable ({e})") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{d / 'model.safetensors'}: does not match {config_path} ({str(e)[:300]})") from e
    model.eval()
    return model, Vocab(d / "spm.model"), config


def export_bytes(export_dir: str | Path) -> dict:
    """File size of model.safetensors and the bytes of its expert tensors."""
    from safetensors import safe_open

    path = Path(export_dir) / "model.safetensors"
    experts = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if ".experts." in key:
                t = f.get_tensor(key)
                experts += t.numel() * t.element_size()
    return {"file_bytes": path.stat().st_size, "expert_bytes": experts}
