"""The export format: `config.json` + `model.safetensors` + `spm.model` (+ `routing.json`).

An export loads with torch, safetensors and sentencepiece alone: no DeepSpeed, no pickle. This
module writes and reads one and builds the model its config.json describes (quantized and pruned
as it says); making one from a run (`mtmoe.export.pipeline`) is the export pipeline's business.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtmoe.config import MoEConfig, ModelConfig
from mtmoe.data.vocab import Vocab
from mtmoe.errors import ExportError
from mtmoe.formats.integrity import fsync_dir, fsync_file
from mtmoe.model.keys import pruned_name
from mtmoe.model.quantized import quantize_experts
from mtmoe.model.seq2seq import Seq2Seq

log = logging.getLogger("mtmoe")

FORMAT = "mtmoe-export-v1"
ROUTING_FILE = "routing.json"
ROUTING_FORMAT = "mtmoe-routing-v1"


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


def model_configs(desc: dict) -> tuple[ModelConfig, MoEConfig]:
    """The model to build from a run's model.json or an export's config.json: all experts in one
    process, stored stacked (how a run laid its experts out is training's business)."""
    model_cfg = ModelConfig(**desc["model"])
    moe_cfg = MoEConfig(**{**desc["moe"], "ep_size": 1, "expert_storage": "stacked"})
    return model_cfg, moe_cfg


STAGING_MARKER = ".mtmoe-export-partial"
"""A file in an export's staging folder while it is written (`write_export`)."""


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


def staging_paths(out_dir: Path) -> tuple[Path, Path]:
    """(where an export is written before it takes `out_dir`'s place, where an export it replaces
    waits until then): hidden names of mtmoe's own, `.<out>.mtmoe-partial` and `.<out>.mtmoe-old`, so
    a user's `<out>.old` backup or `<out>.partial` folder is never taken for them."""
    out = Path(out_dir)
    return out.with_name(f".{out.name}.mtmoe-partial"), out.with_name(f".{out.name}.mtmoe-old")


EXPORT_FILES = frozenset({"config.json", "model.safetensors", "spm.model", ROUTING_FILE})


def _remove_leftover(path: Path) -> None:
    """Deletes what a killed export left at `path` (a staging folder, or an export set aside): a
    folder holding the staging marker, or nothing but an export's files (a kill while the old export
    was being deleted may have taken its config.json first). ExportError when something else is there."""
    if not path.exists():
        return
    names = {p.name for p in path.iterdir()} if path.is_dir() else {None}
    if not (STAGING_MARKER in names or names <= EXPORT_FILES):
        raise ExportError(f"{path} exists and was not left by an mtmoe export: move it away (it is never deleted)")
    shutil.rmtree(path)


@contextlib.contextmanager
def _exports_into(folder: Path):
    """Holds an exclusive lock on `folder` (flock on the folder itself: nothing is left behind)
    while an export is staged there and moved into place. Two exports to one `out` used one staging
    folder: the second deleted the first's as a leftover while it was being written, and the
    first could move the second's half-written files to `out`. Now the second waits."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_export(model: Seq2Seq, spm_path: Path, config: dict, out_dir: Path, routing: Optional[dict] = None,
                 overwrite: bool = True) -> Path:
    """Writes config.json + model.safetensors + spm.model (+ routing.json); the directory appears
    complete or not at all: the files are written and made durable in a staging folder
    (`staging_paths`), which then takes the place of `out`. An export already at `out` (overwrite) is
    renamed aside first and removed only once the new one is in place, so a crash at any point
    leaves one complete export, at `out` or aside. A staging folder holds `STAGING_MARKER` until it
    is complete; only such folders (or ones of nothing but an export's files) are deleted as
    leftovers. Exports into one folder take turns (`_exports_into`); `overwrite=False` refuses an
    export that another one wrote at `out` while this one was computed."""
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exports_into(out.parent):
        if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ExportError(f"out={out_dir} was written while this export ran (another export to it?): "
                              f"give overwrite=true to replace it, or another out=")
        return _stage_and_move(model, spm_path, config, out, routing)


def _stage_and_move(model: Seq2Seq, spm_path: Path, config: dict, out: Path, routing: Optional[dict]) -> Path:
    tmp, old = staging_paths(out)
    _remove_leftover(tmp)
    tmp.mkdir()
    (tmp / STAGING_MARKER).write_text("an mtmoe export being written\n")
    weights = tmp / "model.safetensors"
    # Experts are rows of stacked tensors in memory: each gets its own storage in the file.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(weights))
    # safetensors writes 0600; the weights get the mode the marker file got (the umask's), read from
    # it rather than by toggling os.umask, which would race with other threads creating files.
    os.chmod(weights, stat.S_IMODE((tmp / STAGING_MARKER).stat().st_mode))
    shutil.copyfile(spm_path, tmp / "spm.model")
    if routing is not None:
        (tmp / ROUTING_FILE).write_text(json.dumps(routing, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / STAGING_MARKER).unlink()
    for path in tmp.iterdir():
        fsync_file(path)
    fsync_dir(tmp)
    if out.exists():
        _remove_leftover(old)
        out.rename(old)
    tmp.rename(out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out


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
    statistics of mtmoe.export.routing on the calibration set, per direction and language."""
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


def load_export(export_dir: str | Path, model_cls=Seq2Seq, experts: Optional[dict[str, list[int]]] = None,
                device: torch.device | str = "cpu") -> tuple[Seq2Seq, Vocab, dict]:
    """(model in eval mode on `device`, vocabulary, config) of an export; torch + safetensors only.

    `experts` ({MoE layer: indices of its experts in model.safetensors}): read only those experts
    (safe_open reads each tensor on demand; the others are never read) and build the model pruned to
    them, as an export pruned to the same experts; the config then describes that model."""
    d = Path(export_dir)
    config = read_export_config(d)
    if experts is not None:
        config = subset_config(config, experts)
    model = build_model(config, model_cls)
    state = read_weights(d, None if experts is None else lambda key: pruned_name(key, experts))
    load_weights(model, state, d)
    return model.to(device).eval(), Vocab(d / "spm.model"), config


def read_weights(export_dir: Path, rename: Optional[Callable[[str], Optional[str]]] = None) -> dict:
    """The tensors of an export's model.safetensors: all, or with `rename(key)` -> the name to load a
    tensor under, or None to leave it unread (safe_open reads each tensor on demand). ExportError
    naming the file when it cannot be read."""
    path = Path(export_dir) / "model.safetensors"
    try:
        if rename is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            names = ((key, rename(key)) for key in f.keys())
            return {name: f.get_tensor(key) for key, name in names if name is not None}
    except Exception as e:
        raise ExportError(f"{path}: unreadable ({e})") from e


def build_model(config: dict, model_cls=Seq2Seq) -> Seq2Seq:
    """The model an export's config.json describes, weights not loaded: pruned to its kept experts,
    with quantized expert modules when it is quantized."""
    model_cfg, moe_cfg = model_configs(config)
    model = model_cls(config["vocab_size"], model_cfg, moe_cfg)
    if config.get("quantization"):
        quantize_experts(model, config["quantization"]["bits"])
    return model


def load_weights(model: Seq2Seq, state: dict, export_dir: Path) -> None:
    """Loads `state` (read from the export's model.safetensors) strictly; ExportError naming the
    files when it does not fit the model config.json describes."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{export_dir / 'model.safetensors'}: does not match {export_dir / 'config.json'} "
                          f"({str(e)[:300]})") from e


SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1}


def file_expert_bytes(export_dir: str | Path) -> int:
    """Bytes of every expert tensor in an export's model.safetensors, from its header (no tensor is read)."""
    total = 0
    with safe_open(str(Path(export_dir) / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if ".experts." in key:
                part = f.get_slice(key)
                total += math.prod(part.get_shape()) * SAFETENSORS_DTYPE_BYTES[part.get_dtype()]
    return total


def export_bytes(export_dir: str | Path) -> dict:
    """File size of model.safetensors and the bytes of its expert tensors."""
    return {"file_bytes": (Path(export_dir) / "model.safetensors").stat().st_size,
            "expert_bytes": file_expert_bytes(export_dir)}
