"""Weight-only int8/int4 quantization of expert weights (per output channel, symmetric, no
calibration), and the linear layer that runs on it.

For a weight W [out, in]: scale_o = max_i |W_oi| / qmax (qmax 127 for int8, 7 for int4),
Q = clamp(round(W / scale), -qmax-1, qmax). int4 values are packed two per byte (element 2j in the
low nibble, 2j+1 in the high nibble, as two's-complement nibbles). Stored in safetensors as
`<name>.weight_q` (int8 [out, in] or uint8 [out, ceil(in/2)]) and `<name>.weight_scale` (float32
[out]); biases stay float. The error per element is at most scale_o / 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QMAX = {8: 127, 4: 7}


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] float -> (q int8 [out, in] in [-qmax-1, qmax], scale float32 [out])."""
    qmax = QMAX[bits]
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / qmax).clamp_min(1e-12)
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax - 1, qmax).to(torch.int8)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] with values in [-8, 7] -> uint8 [out, ceil(in/2)]."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [out, ceil(in/2)] -> int8 [out, in_features] in [-8, 7]."""
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    both = torch.stack([low, high], dim=2).flatten(1)[:, :in_features]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


class QuantLinear(nn.Module):
    """y = x W^T + b with W kept as int8/int4 codes plus per-channel scales, dequantized per call."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        cols = in_features if bits == 8 else (in_features + 1) // 2
        dtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("weight_q", torch.zeros(out_features, cols, dtype=dtype))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, bits, linear.bias is not None)
        q, scale = quantize(linear.weight, bits)
        layer.weight_q.copy_(q if bits == 8 else pack_int4(q))
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def weight(self) -> torch.Tensor:
        q = self.weight_q if self.bits == 8 else unpack_int4(self.weight_q, self.in_features)
        return dequantize(q, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def quantize_experts(model: nn.Module, bits: int) -> int:
    """Replaces fc1/fc2 of every expert in `model` with QuantLinear (in place); returns the count."""
    from mtmoe.model.moe import MoEFFN

    count = 0
    for _, layer in model.named_modules():
        if isinstance(layer, MoEFFN):
            for expert in layer.experts:
                for name in ("fc1", "fc2"):
                    linear = getattr(expert, name)
                    if isinstance(linear, nn.Linear):
                        setattr(expert, name, QuantLinear.from_linear(linear, bits))
                        count += 1
    return count
