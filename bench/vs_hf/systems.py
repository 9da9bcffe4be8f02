"""The compared models, built from random weights at identical dimensions.

mtmoe's config comes from the project's Hydra presets (`conf/train.yaml` with `moe=top2`,
`moe=top1` or `moe=dense`, dropout 0); the NLLB-MoE config is derived from it field by field, so
both models have the same vocabulary, widths, depths, heads, experts, MoE layers, top-2 routing
with padding excluded, and capacity. Two HF-side adapters:

- `set_hf_capacity`: NLLB-MoE's router takes a fixed `expert_capacity` (an int in the config, and in
  eval mode it overwrites that attribute with the eval capacity for good); before every training
  forward the bench sets it per MoE layer to mtmoe's value,
  ceil(k * real tokens / E * capacity_factor), at least `min_capacity`.
- `fix_hf_dispatch`: transformers 5.x `NllbMoeExperts.forward` one-hot encodes the router's
  top-1 *mask* (already one-hot) as if it held expert ids, so expert 0 runs every (token, not-top-1
  expert) pair, expert 1 runs every (token, top-1 expert) pair and experts 2.. never run:
  E x N expert rows per layer instead of 2N, and a different function. The fixed variant restores
  the dispatch of transformers 4.x (each expert runs the tokens with a non-zero combine weight
  for it), so the comparison can be read against a correct top-2 NLLB-MoE too.
"""

from __future__ import annotations

import math
import re
import types
from collections import Counter
from typing import Sequence

import torch
from torch import nn

from mtmoe.config import TrainAppConfig
from mtmoe.data.vocab import BOS_ID, EOS_ID, PAD_ID
from mtmoe.model.moe import expert_capacity

# Applied to every mtmoe config of the bench: no dropout anywhere (HF's is set to 0 too), no logging.
COMMON_OVERRIDES = ["model.dropout=0.0", "model.attention_dropout=0.0", "wandb.mode=disabled",
                    "train.max_steps=1000000", "train.progress=false"]

SIZES = {
    # The main job's model: d256, 3+3 layers, 4 heads, FFN 1024, 4 experts in every 2nd layer.
    "default": [],
    # Seconds-scale: the `model=tiny` preset (d32, 2+2 layers, 2 heads, FFN 64).
    "tiny": ["model=tiny"],
    # GPU size (issue 14's second row): d1024, 6+6 layers, 16 heads, FFN 4096, 8 experts in every
    # 2nd layer, 16k-token batches; the models' vocabulary is 32k (MODEL_VOCAB).
    "big": ["model.d_model=1024", "model.n_heads=16", "model.d_ff=4096", "model.encoder_layers=6",
            "model.decoder_layers=6", "moe.num_experts=8", "train.max_tokens=16384"],
}
MODEL_VOCAB = {"big": 32000}
"""Embedding / output-projection rows of the models at a size, when larger than the data's
SentencePiece vocabulary (Multi30k cannot fill 32k pieces): batches keep the data's token ids, the
models pay for the full vocabulary (the output projection and softmax are a large part of a step)."""


def model_vocab(size: str, data_vocab_size: int) -> int:
    """The models' vocabulary at `size`: the data's, or the size's larger MODEL_VOCAB."""
    return max(data_vocab_size, MODEL_VOCAB.get(size, 0))


def compose_config(moe_preset: str, overrides: Sequence[str] = ()) -> TrainAppConfig:
    """The mtmoe config for `moe=<moe_preset>` (top2, top1 or dense) with the bench's overrides."""
    from mtmoe.cli.common import compose_train_config

    return compose_train_config([f"moe={moe_preset}", *COMMON_OVERRIDES, *overrides])


def hf_config(cfg: TrainAppConfig, vocab_size: int):
    """The NllbMoeConfig with mtmoe's dimensions, MoE layers and routing settings.

    mtmoe puts MoE in layers i with i % every == every - 1; NLLB-MoE in layers with
    (i + 1) % sparse_step == 0: the same layers for sparse_step = every."""
    from transformers import NllbMoeConfig

    m, moe = cfg.model, cfg.moe
    if moe.top_k != 2:
        raise ValueError("NLLB-MoE's router is top-2: compare it with moe.top_k=2")
    return NllbMoeConfig(
        vocab_size=vocab_size, d_model=m.d_model, max_position_embeddings=m.max_positions,
        encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers,
        encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads,
        encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff, activation_function=m.activation,
        num_experts=moe.num_experts, encoder_sparse_step=moe.every, decoder_sparse_step=moe.every,
        router_aux_loss_coef=moe.aux_loss_weight, router_z_loss_coef=moe.z_loss_weight,
        second_expert_policy="all", router_ignore_padding_tokens=False,  # False = padding is not routed
        moe_eval_capacity_token_fraction=1.0,  # eval: capacity = all tokens, as mtmoe's eval_capacity_factor 0
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, moe_token_dropout=0.0,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, scale_embedding=True, tie_word_embeddings=True,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=BOS_ID)


def build_hf(cfg: TrainAppConfig, vocab_size: int, seed: int = 1, fixed_dispatch: bool = False) -> nn.Module:
    """NllbMoeForConditionalGeneration from random weights (optionally with the fixed dispatch)."""
    from transformers import NllbMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = NllbMoeForConditionalGeneration(hf_config(cfg, vocab_size))
    if fixed_dispatch:
        fix_hf_dispatch(model)
    return model


def hf_sparse_layers(model: nn.Module) -> dict[str, list[nn.Module]]:
    """{'encoder': [NllbMoeSparseMLP, ...], 'decoder': [...]}."""
    return {stack: [layer.ffn for layer in getattr(model.model, stack).layers if layer.is_sparse]
            for stack in ("encoder", "decoder")}


def set_hf_capacity(model: nn.Module, src_real: int, tgt_real: int, cfg: TrainAppConfig) -> None:
    """Sets every NLLB-MoE router's training capacity to mtmoe's rule for this batch."""
    moe = cfg.moe
    for stack, real in (("encoder", src_real), ("decoder", tgt_real)):
        capacity = expert_capacity(real, moe.num_experts, moe.top_k, moe.capacity_factor, moe.min_capacity)
        for sparse in hf_sparse_layers(model)[stack]:
            sparse.router.expert_capacity = capacity


def _dispatch_by_weight(self, hidden_states: torch.Tensor, router_mask: torch.Tensor,
                        router_probs: torch.Tensor) -> torch.Tensor:
    """NllbMoeExperts.forward as in transformers 4.x: expert e runs the tokens whose combine
    weight for e is non-zero (top-1 and top-2 choices within capacity, padding excluded)."""
    out = torch.zeros_like(hidden_states)
    routed = router_probs > 0  # [N, E]
    for e in range(self.num_experts):
        tokens = routed[:, e].nonzero().squeeze(1)
        if tokens.numel():
            y = self[f"expert_{e}"](hidden_states[tokens]) * router_probs[tokens, e, None]
            out.index_add_(0, tokens, y.to(out.dtype))
    return out


def fix_hf_dispatch(model: nn.Module) -> None:
    """Replaces the expert dispatch of every NLLB-MoE sparse layer by `_dispatch_by_weight`."""
    for layers in hf_sparse_layers(model).values():
        for sparse in layers:
            sparse.experts.forward = types.MethodType(_dispatch_by_weight, sparse.experts)


# Parameter kinds by name, for both naming schemes (mtmoe plain/DeepSpeed-wrapped and HF).
_KINDS = [
    ("experts", r"(\.experts\.|deepspeed_experts)"),
    ("router", r"(\.gate\.wg\.|\.router\.classifier\.)"),
    ("embedding (tied)", r"^(embed\.|model\.shared\.)"),
    ("attention", r"(self_attn|cross_attn|cross_attention)\."),
    ("layer norm", r"(norm)"),
    ("dense FFN", r"\.ffn\."),
]


def _kind(name: str) -> str:
    for kind, pattern in _KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters by kind plus `total` and `active per token` (tied weights counted once)."""
    counts: Counter = Counter()
    for name, p in model.named_parameters():  # named_parameters skips tied duplicates
        counts[_kind(name)] += p.numel()
    counts["total"] = sum(counts.values())
    return dict(counts)


def active_parameters(counts: dict[str, int], cfg: TrainAppConfig) -> int:
    """Parameters a token uses: all but the experts it is not routed to (k of E per MoE layer)."""
    experts = counts.get("experts", 0)
    return counts["total"] - experts + math.ceil(experts * cfg.moe.top_k / max(1, cfg.moe.num_experts))
