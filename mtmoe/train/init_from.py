"""Starting an MoE run from trained models instead of random weights.

Experts from Dense (EfD), `init.from_dense=RUN|EXPORT`: every weight outside the MoE layers is
copied from a trained dense model of the same shape; each expert of an MoE layer starts as that
layer's dense FFN (plus `init.noise` x its std of Gaussian noise, seeded per expert, so experts can
diverge); gates start fresh. With top-2 routing (weights renormalised) and no token dropped, the
first forward pass equals the dense model's exactly; top-1 scales each token by its gate
probability (Switch), so it starts from a damped copy.

`init.from_moe=RUN|EXPORT`: every weight from an MoE model of the same layout, e.g. to fine-tune
a normal model into pre-gated form (`moe.pregate=true` routes with the same weights, from the
previous MoE layer's input).

Aggregation of Experts (AoE), `init.aggregate=[RUN_A,RUN_B]`: two MoE models of the same
architecture become one with E_a + E_b experts per MoE layer: experts and gate rows concatenated
(A's first), every shared weight averaged.

All functions work on plain (export-named) full state dicts; `load_into` maps global expert ids
to the local experts of an expert-parallel rank.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Sequence

import torch

from mtmoe.data.vocab import Vocab
from mtmoe.errors import ConfigError
from mtmoe.formats.ds_checkpoint import consolidated_state_dict, resolve_checkpoint
from mtmoe.formats.export_format import read_export_config
from mtmoe.model.keys import expert_key, parse_expert_key
from mtmoe.model.seq2seq import Seq2Seq
from mtmoe.paths import resolve

GATE_SUFFIX = "gate.wg.weight"


def load_source(path: str) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(full plain fp32 state dict, {"model": ..., "moe": ..., "vocab_size": ...}, its spm.model) of
    a training run dir, a checkpoint tag dir, or an unpruned, unquantized export."""
    source = resolve(path)
    if (source / "config.json").is_file():
        config = read_export_config(source)
        if config.get("quantization") or config["moe"].get("kept_experts"):
            raise ConfigError(f"{source}: a pruned or quantized export cannot initialise training; use the run dir")
        from safetensors.torch import load_file

        return load_file(str(source / "model.safetensors")), config, source / "spm.model"
    run_dir, tag_dir = resolve_checkpoint(source)
    desc_path = run_dir / "model.json"
    if not desc_path.is_file():
        raise ConfigError(f"{desc_path}: missing (is {run_dir} an mtmoe training run?)")
    return consolidated_state_dict(tag_dir), json.loads(desc_path.read_text()), run_dir / "spm.model"


def check_same_shape(source_desc: dict, model: Seq2Seq, vocab: Vocab, source: str, spm_path: Path) -> None:
    """The architecture fields that decide weight shapes must agree (dropout etc. may differ), and
    the vocabularies piece for piece: the embeddings and the output layer are copied by token id, so
    a vocabulary of the same size trained on other text would put every row on another token."""
    vocab_size = len(vocab)
    fields = ("d_model", "n_heads", "d_ff", "encoder_layers", "decoder_layers", "positions", "max_positions",
              "activation")
    theirs = {k: source_desc["model"][k] for k in fields}
    ours = {k: getattr(model.model_cfg, k) for k in fields}
    if theirs != ours or source_desc["vocab_size"] != vocab_size:
        diff = {k: (theirs[k], ours[k]) for k in fields if theirs[k] != ours[k]}
        if source_desc["vocab_size"] != vocab_size:
            diff["vocab_size"] = (source_desc["vocab_size"], vocab_size)
        raise ConfigError(f"{source}: its architecture differs from this run's (theirs, ours): {diff}")
    if not spm_path.is_file():
        raise ConfigError(f"{spm_path}: missing (the source's vocabulary, needed to check it is this run's)")
    theirs_pieces, ours_pieces = Vocab(spm_path).pieces(), vocab.pieces()
    if theirs_pieces != ours_pieces:
        differ = sum(a != b for a, b in zip(theirs_pieces, ours_pieces))
        first = next(i for i, (a, b) in enumerate(zip(theirs_pieces, ours_pieces)) if a != b)
        raise ConfigError(f"{source}: its vocabulary ({spm_path}) is not this run's: {differ} of {vocab_size} token ids "
                          f"are other pieces (e.g. id {first}: {theirs_pieces[first]!r} there, {ours_pieces[first]!r} "
                          f"here); train with the source's data settings (data.*: corpus, vocab_size, "
                          f"max_train_lines, ...) so that its vocabulary is rebuilt")


def experts_from_dense(dense: dict[str, torch.Tensor], moe_prefixes: Sequence[str], num_experts: int,
                       noise: float = 0.0, seed: int = 1) -> dict[str, torch.Tensor]:
    """Full plain MoE state (gates excluded) from a dense model's state dict.

    `moe_prefixes`: e.g. ["encoder.1.ffn.", "decoder.1.ffn."]; a dense layer there holds
    `<prefix>ffn.fc1.weight` etc., which every expert `<prefix>experts.<e>.fc1.weight` copies."""
    out = {k: v.clone() for k, v in dense.items() if not k.startswith(tuple(moe_prefixes))}
    for prefix in moe_prefixes:
        params = {k[len(prefix) + len("ffn."):]: v for k, v in dense.items() if k.startswith(prefix + "ffn.")}
        if not params:
            raise ConfigError(f"the dense model has no FFN at {prefix!r} (is it a dense model of this shape?)")
        for e in range(num_experts):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + e * 7919 + zlib.crc32(prefix.encode()))
            for name, value in params.items():
                copy = value.clone()
                if noise > 0 and value.dim() > 1:
                    copy += noise * value.std() * torch.randn(value.shape, generator=generator)
                out[f"{prefix}experts.{e}.{name}"] = copy
    return out


def aggregate_experts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                      experts_a: int, experts_b: int) -> dict[str, torch.Tensor]:
    """Full plain state with experts_a + experts_b experts per MoE layer (see module doc)."""
    if {k for k in a if not parse_expert_key(k)} != {k for k in b if not parse_expert_key(k)}:
        raise ConfigError("init.aggregate: the two models have different layers")
    out = {}
    for key, value in a.items():
        if parse_expert_key(key):
            out[key] = value.clone()
        elif key.endswith(GATE_SUFFIX):
            out[key] = torch.cat([value, b[key]], dim=0)  # [E_a + E_b, D]
        elif value.is_floating_point():
            out[key] = (value + b[key]) / 2
        else:
            out[key] = value.clone()
    for key, value in b.items():
        parts = parse_expert_key(key)
        if parts:
            out[expert_key(parts.prefix, experts_a + parts.expert, parts.param)] = value.clone()
    return out


def load_into(model: Seq2Seq, full: dict[str, torch.Tensor], allow_missing_gates: bool = False) -> None:
    """Loads a full plain state (global expert ids) into `model`, whose MoE layers may hold only
    the experts of one expert-parallel rank."""
    local_state = {}
    expert_ids = {name + ".": module.global_expert_ids for name, module in model.named_modules()
                  if hasattr(module, "global_expert_ids")}
    for key, value in full.items():
        parts = parse_expert_key(key)
        if parts:
            ids = expert_ids.get(parts.prefix)
            if ids is None or parts.expert not in ids:
                continue  # another rank's expert
            key = expert_key(parts.prefix, parts.expert - ids.start, parts.param)
        local_state[key] = value
    missing, unexpected = model.load_state_dict(local_state, strict=False)
    if allow_missing_gates:
        missing = [k for k in missing if not k.endswith(GATE_SUFFIX)]
    if missing or unexpected:
        raise ConfigError(f"initial weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")


def initialise(model: Seq2Seq, vocab: Vocab, init_cfg, seed: int) -> str | None:
    """Applies `init.from_dense`, `init.aggregate` or `init.from_moe` to a freshly built model;
    a one-line summary."""
    prefixes = [Seq2Seq.moe_layer_prefix(name) for name in model.moe_layer_names()]
    if init_cfg.from_moe:
        state, desc, spm_path = load_source(init_cfg.from_moe)
        check_same_shape(desc, model, vocab, init_cfg.from_moe, spm_path)
        theirs = {k: desc["moe"].get(k) for k in ("enabled", "num_experts", "every")}
        ours = {k: getattr(model.moe_cfg, k) for k in theirs}
        if theirs != ours:
            raise ConfigError(f"init.from_moe={init_cfg.from_moe}: its MoE layout differs (theirs {theirs}, ours {ours})")
        load_into(model, state)
        return f"all weights from the MoE model {init_cfg.from_moe}" + (" (now pre-gated)" if model.moe_cfg.pregate else "")
    if init_cfg.from_dense:
        state, desc, spm_path = load_source(init_cfg.from_dense)
        check_same_shape(desc, model, vocab, init_cfg.from_dense, spm_path)
        if desc["moe"].get("enabled", True):
            raise ConfigError(f"init.from_dense={init_cfg.from_dense}: that model is an MoE model, not a dense one")
        load_into(model, experts_from_dense(state, prefixes, model.moe_cfg.num_experts, init_cfg.noise, seed),
                  allow_missing_gates=True)
        return f"experts from dense: {init_cfg.from_dense} (noise {init_cfg.noise})"
    if init_cfg.aggregate:
        (state_a, desc_a, spm_a), (state_b, desc_b, spm_b) = (load_source(p) for p in init_cfg.aggregate)
        for path, desc, spm_path in zip(init_cfg.aggregate, (desc_a, desc_b), (spm_a, spm_b)):
            check_same_shape(desc, model, vocab, path, spm_path)
        e_a, e_b = desc_a["moe"]["num_experts"], desc_b["moe"]["num_experts"]
        if e_a + e_b != model.moe_cfg.num_experts:
            raise ConfigError(f"init.aggregate: {e_a} + {e_b} experts, but moe.num_experts={model.moe_cfg.num_experts}")
        load_into(model, aggregate_experts(state_a, state_b, e_a, e_b))
        return f"aggregation of experts: {init_cfg.aggregate[0]} ({e_a}) + {init_cfg.aggregate[1]} ({e_b})"
    return None

