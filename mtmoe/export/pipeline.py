"""The export pipeline: a run's DeepSpeed checkpoint (or an existing export) -> a standalone export,
optionally expert-pruned and quantized, with the routing statistics of the exported model.

The non-expert weights and every expert are read from the checkpoint (`mtmoe.formats.ds_checkpoint`),
DeepSpeed's container names mapped back to the plain model's, loaded strictly into a world-of-one
model and written in the export format (`mtmoe.formats.export_format`). Routing statistics come
from `mtmoe.export.routing`; pruning (`mtmoe.export.prune`, `mtmoe.export.calibrate`) receives them.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from mtmoe.config import (QUANT_BITS, PruneConfig, Quant, check_choice, check_keys, prune_config,
                          pruning_requested, validate_prune)
from mtmoe.data.corpus import available_languages, check_prefix, load_test_set
from mtmoe.data.sampling import parse_directions
from mtmoe.data.vocab import Vocab
from mtmoe.errors import ConfigError, ExportError
from mtmoe.export.calibrate import budget_keep, loss_keep
from mtmoe.export.prune import SHARE_RULES, coverage, direction_keep, keep_count, prune_state_dict
from mtmoe.export.routing import collect_routing
from mtmoe.export.average import average_state_dicts
from mtmoe.formats.ds_checkpoint import consolidated_state_dict, newest_tags, resolve_checkpoint, summarize_load_error
from mtmoe.formats.export_format import (FORMAT, ROUTING_FILE, ROUTING_FORMAT, build_model, check_output_dir,
                                         load_export, model_configs, read_export_config, warn_zero_shot,
                                         write_export, zero_shot)
from mtmoe.formats.integrity import verify
from mtmoe.model.quantized import quantize_experts
from mtmoe.model.seq2seq import Seq2Seq

log = logging.getLogger("mtmoe")


def _run_source(checkpoint: Path, average: int = 1) -> tuple[dict, list[Path]]:
    """(export config, checkpoint folders to read) of a training run dir or checkpoint tag dir, read
    and verified before any weights are; with `average` > 1, the run's newest `average` checkpoints
    up to that one."""
    run_dir, tag_dir = resolve_checkpoint(checkpoint)
    tag_dirs = [tag_dir.parent / tag for tag in newest_tags(run_dir, tag_dir.name, average)] if average > 1 else [tag_dir]
    for path in tag_dirs:
        problem = verify(path)
        if problem:
            raise ExportError(f"unusable checkpoint: {problem}")
    desc_path = run_dir / "model.json"
    if not desc_path.is_file():
        raise ExportError(f"{desc_path}: missing (is {run_dir} an mtmoe training run?)")
    desc = json.loads(desc_path.read_text())
    model_cfg, moe_cfg = model_configs(desc)
    config = {"format": FORMAT, "vocab_size": desc["vocab_size"], "langs": desc["langs"],
              "model": asdict(model_cfg), "moe": asdict(moe_cfg),
              "source": {"run_dir": str(run_dir), "checkpoint": tag_dir.name}}
    if average > 1:
        config["source"]["averaged"] = [p.name for p in tag_dirs]
    if desc.get("training"):
        config["training"] = desc["training"]
    return config, tag_dirs


def _load_run_model(config: dict, tag_dirs: list[Path]) -> Seq2Seq:
    """The plain model `config` (of `_run_source`) describes, its weights read from `tag_dirs` (their
    mean when there are several)."""
    model = build_model(config)
    state = (average_state_dicts((p.name, consolidated_state_dict(p)) for p in tag_dirs) if len(tag_dirs) > 1
             else consolidated_state_dict(tag_dirs[0]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        run_dir = Path(config["source"]["run_dir"])
        raise ExportError(f"{tag_dirs[-1]} does not match {run_dir / 'model.json'} ({summarize_load_error(str(e))}): "
                          f"the run's model.json describes another model than its checkpoint (was it overwritten "
                          f"by a start with other model settings?)") from None
    return model.eval()


@dataclass
class ExportSource:
    """What an export starts from (a training run or checkpoint, or an earlier export): its export
    config and vocabulary, read without any weights, so that what the config can refuse is refused
    first; `load()` then reads the weights -> (plain model, the config to export it with)."""
    config: dict
    spm_path: Path
    load: Callable[[], tuple[Seq2Seq, dict]]


def _export_source(checkpoint: Path, average: int) -> ExportSource:
    """The source of an export from `checkpoint`: an export folder (its config.json), else a training
    run dir or checkpoint tag dir (`_run_source`)."""
    if not (checkpoint / "config.json").is_file():
        config, tag_dirs = _run_source(checkpoint, average)
        return ExportSource(config, Path(config["source"]["run_dir"]) / "spm.model",
                            lambda: (_load_run_model(config, tag_dirs), config))
    if average > 1:
        raise ConfigError(f"average={average}: {checkpoint} is an export; average the checkpoints of a "
                          f"training run (checkpoint=RUN_DIR)")

    def load() -> tuple[Seq2Seq, dict]:
        model, _, config = load_export(checkpoint)
        config = copy.deepcopy(config)
        config.pop("routing", None)  # the statistics of the model before this export changes it
        return model, config

    return ExportSource(read_export_config(checkpoint), checkpoint / "spm.model", load)


DEFAULT_CALIBRATION = {"calibration": PruneConfig.calibration, "lines": PruneConfig.lines}
"""The calibration set of export-time routing statistics (`prune.calibration`, `prune.lines`)."""


def routing_config(routing: dict) -> dict:
    """export_run's `routing` with DEFAULT_CALIBRATION's values where it gives none; an unknown key
    is refused."""
    check_keys(routing, list(DEFAULT_CALIBRATION), "routing.")
    return {**DEFAULT_CALIBRATION, **{k: v for k, v in routing.items() if v is not None}}


def export_run(checkpoint: str | Path, out_dir: str | Path, prune: Optional[PruneConfig | dict] = None,
               quant: Optional[str] = None, routing: Optional[dict] = DEFAULT_CALIBRATION,
               overwrite: bool = False, average: int = 1, device: torch.device | str = "cpu") -> Path:
    """Export of a run's latest checkpoint (or of an existing export), optionally expert-pruned
    (`prune`: a PruneConfig, or a dict of its fields, e.g. {"keep": k, "rule": "loss"} or
    {"direction": "en-de", "mass": 0.9}, plus "calibration" prefix and "lines"; validated like
    `mtmoe-export prune.*`) and quantized (`quant`: "int8" | "int4"). An existing export at
    `out_dir` is replaced only with `overwrite` (checked before any work).

    `routing` ({"calibration": prefix, "lines": per direction}, DEFAULT_CALIBRATION's where
    missing; None = skip): routing statistics of the exported model on that set, stored as
    routing.json (`read_routing_stats`), which per-direction subsets (`subset.mass`) and
    language-aware serving read.

    `average` > 1: the exported weights are the mean of the run's newest `average` checkpoints
    (mtmoe.export.average); only from a training run, not from an export.

    `device`: where calibration runs (routing telemetry, the `loss` rule's passes); the export is
    written from host memory."""
    checkpoint = Path(checkpoint)
    check_output_dir(Path(out_dir), overwrite, checkpoint)
    # Everything that can be refused is refused here, before any weights are read.
    prune = prune_config(prune) if prune is not None else None
    if prune is not None:
        validate_prune(prune)
        if not pruning_requested(prune):
            prune = None
    routing = routing_config(routing) if routing is not None else None
    for calibration in {p["calibration"] if isinstance(p, dict) else p.calibration for p in (prune, routing) if p}:
        check_prefix(calibration, "prune.calibration")  # a typo: refused, not a warning after the export
    bits = QUANT_BITS.get(check_choice("quant", quant or "none", Quant))
    source = _export_source(checkpoint, average)
    _check_recipe(source.config, checkpoint, prune, quant, bits)  # from the config alone: no weights read yet
    model, config = source.load()
    spm_path = source.spm_path
    model = model.to(device)
    if prune:
        model, config = _prune(model, spm_path, config, prune)
    if bits is not None:
        quantize_experts(model, bits)
        config["quantization"] = {"bits": bits, "scheme": "weight-only, per output channel, symmetric",
                                  "targets": "expert fc1/fc2 weights"}
    stats = None
    if routing is not None and config["moe"]["enabled"]:
        stats = routing_statistics(model, Vocab(spm_path), config["langs"], routing["calibration"],
                                   int(routing["lines"]))
        if stats is not None:
            config["routing"] = {"file": ROUTING_FILE, "calibration": stats["calibration"],
                                 "lines_per_direction": stats["lines_per_direction"]}
    return write_export(model.cpu(), spm_path, config, Path(out_dir), stats, overwrite=overwrite)


def calibration_texts(calibration: str | Path, pairs) -> dict[str, list[str]]:
    """{language: lines} of the calibration set (a corpus prefix) for the direction `pairs`."""
    return load_test_set(calibration, telemetry_langs(pairs))


def first_lines(texts: dict[str, list[str]], lines: int) -> dict[str, list[str]]:
    """The first `lines` lines of each language (0 = all)."""
    return {lang: t[:lines] for lang, t in texts.items()} if lines else texts


def calibration_routing(model: Seq2Seq, vocab: Vocab, texts: dict[str, list[str]], pairs) -> tuple[dict, int]:
    """(routing telemetry of `model` on `texts` (calibration_texts) for the direction `pairs`, lines
    used per direction)."""
    return collect_routing(model, vocab, texts, pairs, progress="calibration"), len(next(iter(texts.values())))


def telemetry_langs(pairs) -> list[str]:
    """The languages of the direction `pairs`, sorted."""
    return sorted({lang for pair in pairs for lang in pair})


def routing_statistics(model: Seq2Seq, vocab: Vocab, langs: list[str], calibration: str | Path,
                       lines: int) -> Optional[dict]:
    """routing.json's content: the telemetry (mtmoe.export.routing) of every direction between the
    model's languages that the calibration set has; None (with a warning) when it has < 2 of them."""
    have = available_languages(calibration, langs)
    if len(have) < 2:
        log.warning(
            "no routing statistics stored: the calibration set %s has %s of the model's languages %s "
            "(set prune.calibration to a set with them)", calibration, have or "none", langs)
        return None
    pairs = parse_directions("all", have)
    telemetry, used = calibration_routing(model, vocab, first_lines(calibration_texts(calibration, pairs), lines), pairs)
    return {"format": ROUTING_FORMAT, "calibration": str(calibration), "lines_per_direction": used, **telemetry}


def _check_recipe(config: dict, source: Path, prune: Optional[PruneConfig], quant: Optional[str],
                  bits: Optional[int]) -> None:
    """Refuses a pruning or quantization (validated on their own) that the model `config` (of the
    export or run at `source`) cannot be given; called before the weights are read, so a mistake costs
    no checkpoint load."""
    if bits is not None and not config["moe"]["enabled"]:
        raise ConfigError(f"quant={quant}: {source} has no MoE layers (quantization is of expert weights)")
    if bits is not None and config.get("quantization"):
        raise ExportError(f"{source}: already quantized ({config['quantization']['bits']} bits)")
    if prune is None:
        return
    if config.get("quantization"):
        raise ExportError("prune before quantizing: this export is already quantized")
    if config["moe"].get("kept_experts"):
        raise ExportError("this export is already pruned; prune from the full model")
    if not config["moe"]["enabled"]:
        raise ConfigError("prune: the model has no MoE layers")
    top_k, num_experts = config["moe"]["top_k"], config["moe"]["num_experts"]
    if prune.keep is not None:
        count = keep_count(float(prune.keep), num_experts)  # more than the model has: refused here
        if count < top_k:
            log.warning("prune.keep=%s keeps %d of %d experts, fewer than moe.top_k=%d (each token's choices): "
                        "every MoE layer keeps at least %d", prune.keep, count, num_experts, top_k, top_k)
    if prune.direction:
        try:
            parse_directions(prune.direction, config["langs"])
        except ConfigError as e:
            raise ConfigError(f"prune.direction={prune.direction!r}: {e}") from None


def _prune(model: Seq2Seq, spm_path: Path, config: dict, prune: PruneConfig) -> tuple[Seq2Seq, dict]:
    """`model` pruned as `prune` (validated, and checked against `config` by `_check_recipe`) says,
    with the config that records how."""
    top_k = config["moe"]["top_k"]
    calibration = prune.calibration
    direction = prune.direction
    directions = parse_directions(direction or "all", config["langs"])
    if direction:
        warn_zero_shot(config, directions, "prune.direction")
    else:  # the kept experts serve what the model was trained for (every direction when unrecorded)
        untrained = set(zero_shot(config, directions))
        directions = [(s, t) for s, t in directions if f"{s}-{t}" not in untrained]
    texts = calibration_texts(calibration, directions)  # read once: telemetry and the loss rule use its first lines
    vocab = Vocab(spm_path)
    telemetry, used = calibration_routing(model, vocab, first_lines(texts, int(prune.lines)), directions)
    if direction:
        kept = direction_keep(telemetry, direction, float(prune.mass), min_experts=top_k)
        rule = {"rule": "direction", "direction": direction, "mass": float(prune.mass)}
    elif prune.rule == "loss":
        lines = int(prune.loss_lines)
        texts = first_lines(texts, lines)
        counts = {layer: max(keep_count(float(prune.keep), len(telemetry["overall"][layer]["share"])), top_k)
                  for layer in telemetry["layers"]}
        if prune.per_layer:
            kept, measured = loss_keep(model, vocab, texts, directions, counts, progress=log.info)
        else:
            kept, measured = budget_keep(model, vocab, texts, directions, sum(counts.values()),
                                         min_experts=top_k, progress=log.info)
        rule = {"rule": "loss", "keep": prune.keep, "per_layer": bool(prune.per_layer),
                "loss_lines": lines, "calibration_loss": measured}
    else:
        kept = SHARE_RULES[prune.rule](telemetry, float(prune.keep), min_experts=top_k)
        rule = {"rule": prune.rule, "keep": prune.keep}
    config = copy.deepcopy(config)
    config["moe"]["kept_experts"] = kept
    config["pruning"] = {**rule, "kept": kept, "coverage": coverage(telemetry, kept), "calibration": str(calibration),
                         "calibration_lines": used, "calibration_directions": [f"{s}-{t}" for s, t in directions],
                         "telemetry": telemetry["overall"]}
    pruned = build_model(config).to(model.embed.weight.device)
    pruned.load_state_dict(prune_state_dict(model.state_dict(), kept), strict=True)
    return pruned.eval(), config
