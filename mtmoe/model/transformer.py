"""Pre-LN Transformer pieces in pure torch: attention with an incremental-decoding cache,
the dense FFN (also the expert of MoE layers), positions, encoder and decoder layers.

Shapes: B batch, S source length, T target length, D d_model, H heads.
Padding masks are boolean with True at real tokens ("keep"), matching scaled_dot_product_attention.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mtmoe.model.partitioned import writable


def seeded_uniform_(tensor: torch.Tensor, fan_in: int, generator: Optional[torch.Generator]) -> None:
    """tensor ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) in place, drawn from `generator` (None: torch's
    RNG). The draw is made on the generator's device and copied, so a tensor on a GPU (ZeRO-3's
    `zero.Init` creates parameters there) gets the values a CPU run gets from the same seed."""
    if tensor.is_meta:  # shapes only (parameter counts, a meta-built copy): nothing to draw
        return
    bound = 1.0 / math.sqrt(fan_in)
    if generator is None or generator.device == tensor.device:
        tensor.uniform_(-bound, bound, generator=generator)
        return
    draw = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
    tensor.copy_(draw.uniform_(-bound, bound, generator=generator))


class SeededLinear(nn.Linear):
    """nn.Linear initialised from a given generator: weight ~ U(-1/sqrt(in), 1/sqrt(in)), bias 0.

    The draw happens inside __init__ (nn.Linear calls reset_parameters there) because under
    DeepSpeed ZeRO-3's `zero.Init` a module's parameters are partitioned, possibly to NVMe, the
    moment its __init__ returns; writing them afterwards needs a gather per parameter, which for
    hundreds of NVMe-offloaded experts takes longer than training a few steps."""

    def __init__(self, in_features: int, out_features: int, generator: torch.Generator):
        self._generator = generator
        super().__init__(in_features, out_features)
        del self._generator

    def reset_parameters(self) -> None:
        with torch.no_grad():
            seeded_uniform_(self.weight, self.in_features, self._generator)
            self.bias.zero_()


class FeedForward(nn.Module):
    """fc2(act(fc1(x))): [..., D] -> [..., D]. Also the expert network of an MoE layer.

    `generator`: draw the initial weights from it (seeded experts: the same weights whatever the
    expert-parallel layout); otherwise torch's default init."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu",
                 generator: torch.Generator | None = None):
        super().__init__()
        if generator is None:
            self.fc1 = nn.Linear(d_model, d_ff)
            self.fc2 = nn.Linear(d_ff, d_model)
        else:
            self.fc1 = SeededLinear(d_model, d_ff, generator)
            self.fc2 = SeededLinear(d_ff, d_model, generator)
        self.dropout = nn.Dropout(dropout)
        self.act = F.relu if activation == "relu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class DenseFFN(nn.Module):
    """The dense FFN sub-layer with the MoE layer's calling convention: (x, keep) -> (y, aux, stats)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None):
        return self.ffn(x), None, None


class MultiHeadAttention(nn.Module):
    """Multi-head attention on `F.scaled_dot_product_attention`.

    `cache` (a dict) enables incremental decoding: self-attention appends this step's keys and
    values; cross-attention computes the memory's keys/values once and reuses them."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape  # [B, N, D] -> [B, H, N, D/H]
        return x.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor,
                key_keep: Optional[torch.Tensor] = None, causal: bool = False,
                cache: Optional[dict] = None, static_kv: bool = False) -> torch.Tensor:
        """query [B, Tq, D], key_value [B, Tk, D], key_keep [B, Tk] bool -> [B, Tq, D]."""
        q = self._heads(self.q_proj(query))
        if cache is not None and static_kv and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k = self._heads(self.k_proj(key_value))
            v = self._heads(self.v_proj(key_value))
            if cache is not None:
                if not static_kv and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        mask = None if key_keep is None else key_keep[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None and q.shape[2] > 1,
            dropout_p=self.dropout if self.training else 0.0)
        b, _, tq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, tq, -1))


def sinusoidal_table(num_positions: int, d_model: int) -> torch.Tensor:
    """[num_positions, D] fixed sin/cos position table (Vaswani et al. 2017)."""
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(num_positions, d_model)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div[: d_model // 2])
    return table


class Positions(nn.Module):
    """Position embeddings added to token embeddings: sinusoidal (a buffer) or learned."""

    def __init__(self, kind: str, max_positions: int, d_model: int):
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.table = nn.Embedding(max_positions, d_model)
            with writable(self.table.weight):
                nn.init.normal_(self.table.weight, std=d_model ** -0.5)
        else:
            self.register_buffer("table_buf", sinusoidal_table(max_positions, d_model), persistent=False)

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        """[length, D] embeddings of positions offset .. offset+length-1."""
        if self.kind == "learned":
            return self.table.weight[offset:offset + length]
        return self.table_buf[offset:offset + length]


class EncoderLayer(nn.Module):
    """x + SelfAttn(LN(x)); x + FFN(LN(x)), where FFN is dense or MoE."""

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, dropout: float, attention_dropout: float):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor):
        """x [B, S, D], keep [B, S] -> (x [B, S, D], aux loss or None, routing stats or None)."""
        h = self.self_attn_norm(x)
        x = x + self.dropout(self.self_attn(h, h, key_keep=keep))
        y, aux, stats = self.ffn(self.ffn_norm(x), keep)
        return x + self.dropout(y), aux, stats


class DecoderLayer(nn.Module):
    """x + SelfAttn(LN(x)) (causal); x + CrossAttn(LN(x), memory); x + FFN(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, dropout: float, attention_dropout: float):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, memory: torch.Tensor, memory_keep: torch.Tensor,
                cache: Optional[dict] = None):
        """x [B, T, D] (T=1 when decoding with `cache`), memory [B, S, D] -> (x, aux, stats)."""
        h = self.self_attn_norm(x)
        self_cache = None if cache is None else cache.setdefault("self", {})
        x = x + self.dropout(self.self_attn(h, h, causal=cache is None, cache=self_cache))
        h = self.cross_attn_norm(x)
        cross_cache = None if cache is None else cache.setdefault("cross", {})
        x = x + self.dropout(self.cross_attn(h, memory, key_keep=memory_keep, cache=cross_cache, static_kv=True))
        y, aux, stats = self.ffn(self.ffn_norm(x), keep)
        return x + self.dropout(y), aux, stats
