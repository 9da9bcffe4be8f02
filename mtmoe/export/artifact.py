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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtmoe.config import QUANT_BITS, ConfigError, ModelConfig, MoEConfig, check_prune_rule
from mtmoe.data.vocab import Vocab
from mtmoe.model.experts import per_expert_state
from mtmoe.model.seq2seq import Seq2Seq

log = logging.getLogger(__name__)

FORMAT = "mtmoe-export-v1"
ROUTING_FILE = "routing.json"
ROUTING_FORMAT = "mtmoe-routing-v1"
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


def _write(model: Seq2Seq, spm_path: Path, config: dict, out_dir: Path, routing: Optional[dict] = None) -> Path:
    """Writes config.json + model.safetensors + spm.model (+ routing.json); the directory appears
    complete or not at all."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = tmp / "model.safetensors"
    # Experts are rows of stacked tensors in memory: each gets its own storage in the file.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(weights))
    os.chmod(weights, 0o666 & ~_umask())  # safetensors writes 0600; the other files get the usual mode
    shutil.copyfile(spm_path, tmp / "spm.model")
    if routing is not None:
        (tmp / ROUTING_FILE).write_text(json.dumps(routing, indent=1))
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


DEFAULT_CALIBRATION = {"calibration": "data/multi30k/val", "lines": 300, "loss_lines": 100}
"""The calibration set of export-time routing statistics and pruning (`prune.calibration`,
`prune.lines`, and `prune.loss_lines` for the loss rule)."""
DEFAULT_RULE = "loss"
"""`prune.rule` when none is given (see PruneConfig.rule)."""


def export_run(checkpoint: str | Path, out_dir: str | Path, prune: Optional[dict] = None,
               quant: Optional[str] = None, routing: Optional[dict] = DEFAULT_CALIBRATION,
               overwrite: bool = False) -> Path:
    """Export of a run's latest checkpoint (or of an existing export), optionally expert-pruned
    (`prune`: {"keep": k, "rule": "loss"|"coverage"|"global"} or {"direction": "en-de", "mass": 0.9},
    plus "calibration" prefix and "lines") and quantized (`quant`: "int8" | "int4"). An existing
    export at `out_dir` is replaced only with `overwrite` (checked before any work).

    `routing` ({"calibration": prefix, "lines": per direction}; None = skip): routing statistics
    of the exported model on that set, stored as routing.json (`read_routing_stats`), which
    per-direction subsets (`subset.mass`) and language-aware serving read."""
    checkpoint = Path(checkpoint)
    check_output_dir(Path(out_dir), overwrite, checkpoint)
    if prune and not prune.get("direction"):
        check_prune_rule(prune.get("rule") or DEFAULT_RULE)  # a bad rule fails before any compute
    bits = QUANT_BITS.get(quant) if quant and quant != "none" else None
    if quant and quant != "none" and bits is None:
        raise ConfigError(f"quant={quant!r}: expected none, {' or '.join(QUANT_BITS)}")
    if (checkpoint / "config.json").is_file():
        model, _, config = load_export(checkpoint)
        spm_path = checkpoint / "spm.model"
        config = copy.deepcopy(config)
        config.pop("routing", None)
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
    stats = None
    if routing is not None and config["moe"]["enabled"]:
        stats = routing_statistics(model, Vocab(spm_path), config["langs"], routing["calibration"],
                                   int(routing.get("lines") or 0))
        if stats is not None:
            config["routing"] = {"file": ROUTING_FILE, "calibration": stats["calibration"],
                                 "lines_per_direction": stats["lines_per_direction"]}
    return _write(model, spm_path, config, Path(out_dir), stats)


def calibration_routing(model: Seq2Seq, vocab: Vocab, calibration: str | Path, pairs, lines: int) -> tuple[dict, int]:
    """(routing telemetry of `model` on the calibration set for the direction `pairs`, lines used
    per direction), the first `lines` lines (0 = all)."""
    from mtmoe.data.corpus import load_test_set
    from mtmoe.eval.telemetry import collect_routing

    texts = load_test_set(calibration, telemetry_langs(pairs))
    if lines:
        texts = {lang: t[:lines] for lang, t in texts.items()}
    return collect_routing(model, vocab, texts, pairs, progress="calibration"), len(next(iter(texts.values())))


def telemetry_langs(pairs) -> list[str]:
    """The languages of the direction `pairs`, sorted."""
    return sorted({lang for pair in pairs for lang in pair})


def routing_statistics(model: Seq2Seq, vocab: Vocab, langs: list[str], calibration: str | Path,
                       lines: int) -> Optional[dict]:
    """routing.json's content: the telemetry (mtmoe.eval.telemetry) of every direction between the
    model's languages that the calibration set has; None (with a warning) when it has < 2 of them."""
    from mtmoe.data.corpus import available_languages
    from mtmoe.data.sampling import parse_directions

    have = available_languages(calibration, langs)
    if len(have) < 2:
        log.warning(
            "no routing statistics stored: the calibration set %s has %s of the model's languages %s "
            "(set prune.calibration to a set with them)", calibration, have or "none", langs)
        return None
    telemetry, used = calibration_routing(model, vocab, calibration, parse_directions("all", have), lines)
    return {"format": ROUTING_FORMAT, "calibration": str(calibration), "lines_per_direction": used, **telemetry}


def _prune(model: Seq2Seq, spm_path: Path, config: dict, prune: dict) -> tuple[Seq2Seq, dict]:
    from mtmoe.data.corpus import load_test_set
    from mtmoe.data.sampling import parse_directions
    from mtmoe.export.prune import SHARE_RULES, coverage, direction_keep, keep_count, prune_state_dict

    if config.get("quantization"):
        raise ExportError("prune before quantizing: this export is already quantized")
    if config["moe"].get("kept_experts"):
        raise ExportError("this export is already pruned; prune from the full model")
    if not config["moe"]["enabled"]:
        raise ConfigError("prune: the model has no MoE layers")
    calibration = prune.get("calibration") or DEFAULT_CALIBRATION["calibration"]
    direction = prune.get("direction")
    directions = parse_directions(direction or "all", config["langs"])
    if direction:
        warn_zero_shot(config, directions, "prune.direction")
    else:  # the kept experts serve what the model was trained for (every direction when unrecorded)
        untrained = set(zero_shot(config, directions))
        directions = [(s, t) for s, t in directions if f"{s}-{t}" not in untrained]
    telemetry, used = calibration_routing(model, Vocab(spm_path), calibration, directions, int(prune.get("lines") or 0))
    top_k = config["moe"]["top_k"]
    if direction:
        kept = direction_keep(telemetry, direction, float(prune.get("mass") or 0.9), min_experts=top_k)
        rule = {"rule": "direction", "direction": direction, "mass": float(prune.get("mass") or 0.9)}
    elif check_prune_rule(prune.get("rule") or DEFAULT_RULE) == "loss":
        from mtmoe.export.calibrate import budget_keep, loss_keep

        lines = int(prune.get("loss_lines") or DEFAULT_CALIBRATION["loss_lines"])
        texts = {lang: t[:lines] for lang, t in load_test_set(calibration, telemetry_langs(directions)).items()}
        counts = {layer: max(keep_count(float(prune["keep"]), len(telemetry["overall"][layer]["share"])), top_k)
                  for layer in telemetry["layers"]}
        if prune.get("per_layer"):
            kept, measured = loss_keep(model, Vocab(spm_path), texts, directions, counts, progress=log.info)
        else:
            kept, measured = budget_keep(model, Vocab(spm_path), texts, directions, sum(counts.values()),
                                         min_experts=top_k, progress=log.info)
        rule = {"rule": "loss", "keep": prune["keep"], "per_layer": bool(prune.get("per_layer")),
                "loss_lines": lines, "calibration_loss": measured}
    else:
        name = prune.get("rule") or DEFAULT_RULE
        kept = SHARE_RULES[name](telemetry, float(prune["keep"]), min_experts=top_k)
        rule = {"rule": name, "keep": prune["keep"]}
    config = copy.deepcopy(config)
    config["moe"]["kept_experts"] = kept
    config["pruning"] = {**rule, "kept": kept, "coverage": coverage(telemetry, kept), "calibration": str(calibration),
                         "calibration_lines": used, "calibration_directions": [f"{s}-{t}" for s, t in directions],
                         "telemetry": telemetry["overall"]}
    model_cfg, moe_cfg = _configs(config)
    pruned = Seq2Seq(config["vocab_size"], model_cfg, moe_cfg)
    pruned.load_state_dict(prune_state_dict(model.state_dict(), kept), strict=True)
    return pruned.eval(), config


def _read_json(path: Path, fmt: str, missing: str) -> dict:
    """A JSON file of an export whose "format" must be `fmt`; `missing` says why it may be absent."""
    if not path.is_file():
        raise ExportError(f"{path}: missing ({missing})")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: invalid JSON ({e})") from e
    if content.get("format") != fmt:
        raise ExportError(f"{path}: format {content.get('format')!r}, expected {fmt!r}")
    return content


def read_export_config(export_dir: str | Path) -> dict:
    """An export's validated config.json (no weights are read)."""
    return _read_json(Path(export_dir) / "config.json", FORMAT, "not an mtmoe export")


def read_routing_stats(export_dir: str | Path) -> dict:
    """The routing statistics stored with an export (routing.json, written by export_run): the
    telemetry of mtmoe.eval.telemetry on the calibration set, per direction and language."""
    d = Path(export_dir)
    return _read_json(d / ROUTING_FILE, ROUTING_FORMAT,
                      "this export has no routing statistics: exported before they were stored, or its "
                      "calibration set had none of its languages. Re-export it: "
                      f"mtmoe-export checkpoint={d} out=<new dir> [prune.calibration=<corpus prefix>]")


def subset_config(config: dict, experts: dict[str, list[int]]) -> dict:
    """The config of an export loaded with only `experts` ({MoE layer: indices of its experts in
    model.safetensors}): the model is that export pruned to them (kept ids are gate rows)."""
    config = copy.deepcopy(config)
    kept = {}
    for layer, ids in experts.items():
        rows = config["moe"].get("kept_experts", {}).get(layer) or list(range(config["moe"]["num_experts"]))
        if any(not 0 <= i < len(rows) for i in ids):
            raise ExportError(f"MoE layer {layer} has {len(rows)} experts, asked for {ids}")
        kept[layer] = [rows[i] for i in ids]
    config["moe"]["kept_experts"] = kept
    config.pop("routing", None)  # indices of the whole export, not of this model
    return config


def load_export(export_dir: str | Path, model_cls=Seq2Seq, experts: Optional[dict[str, list[int]]] = None
                ) -> tuple[Seq2Seq, Vocab, dict]:
    """(model in eval mode, vocabulary, config) of an export; torch + safetensors only.

    `experts` ({MoE layer: indices of its experts in model.safetensors}): read only those experts
    (safe_open reads each tensor on demand; the others are never read) and build the model pruned to
    them, as an export pruned to the same experts; the config then describes that model."""
    d = Path(export_dir)
    config_path = d / "config.json"
    config = read_export_config(d)
    if experts is not None:
        config = subset_config(config, experts)
    model_cfg, moe_cfg = _configs(config)
    model = model_cls(config["vocab_size"], model_cfg, moe_cfg)
    if config.get("quantization"):
        from mtmoe.export.quantize import quantize_experts

        quantize_experts(model, config["quantization"]["bits"])
    try:
        if experts is None:
            state = load_file(str(d / "model.safetensors"))
        else:
            from mtmoe.export.prune import pruned_name

            with safe_open(str(d / "model.safetensors"), framework="pt") as f:
                names = ((key, pruned_name(key, experts)) for key in f.keys())
                state = {name: f.get_tensor(key) for key, name in names if name is not None}
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
    path = Path(export_dir) / "model.safetensors"
    experts = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if ".experts." in key:
                t = f.get_tensor(key)
                experts += t.numel() * t.element_size()
    return {"file_bytes": path.stat().st_size, "expert_bytes": experts}
