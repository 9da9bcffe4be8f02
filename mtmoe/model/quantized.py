"""Weight-only int8/int4 quantization of expert weights (per output channel, symmetric, no
calibration), and the linear layer that runs on it.

For a weight W [out, in]: scale_o = max_i |W_oi| / qmax (qmax 127 for int8, 7 for int4),
Q = clamp(round(W / scale), -qmax-1, qmax). int4 values are packed two per byte (element 2j in the
low nibble, 2j+1 in the high nibble, as two's-complement nibbles). Stored in safetensors as
`<name>.weight_q` (int8 [out, in] or uint8 [out, ceil(in/2)]) and `<name>.weight_scale` (float32
[out]); biases stay float. The error per element is at most scale_o / 2.

An MoE layer's quantized experts are one `QuantizedExperts` group (stacked codes, the grouped
dispatch's interface); `QuantLinear` is one quantized linear layer, the form a single expert takes
in a serving cache slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtmoe.model.experts import FeedForwardGroup, GroupedExperts
from mtmoe.model.moe import MoEFFN
from mtmoe.model.transformer import FeedForward

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


class QuantizedExperts(FeedForwardGroup):
    """A layer's FeedForward experts with int8/int4 weights: stacked codes and per-channel scales,
    dequantized per call (one expert with `forward_expert`, all of them for the grouped GEMM).

    Tensors: w1_q [L, F, D] int8 (int4: uint8 [L, F, ceil(D/2)]), w1_scale [L, F], b1 [L, F], and the
    same for fc2. The state dict shows each expert as a FeedForward whose fc1/fc2 are QuantLinears
    (`<i>.fc1.bias`, `<i>.fc1.weight_q`, `<i>.fc1.weight_scale`, ...), the names exports have always
    used; `blueprint()` is that module (a serving cache slot)."""

    def __init__(self, num_local: int, d_model: int, d_ff: int, bits: int, dropout: float = 0.0,
                 activation: str = "relu"):
        super().__init__(num_local, d_model, d_ff, dropout, activation)
        self.bits = bits
        for name, (out_features, in_features) in (("1", (d_ff, d_model)), ("2", (d_model, d_ff))):
            template = QuantLinear(in_features, out_features, bits)
            self.register_buffer(f"w{name}_q", template.weight_q.expand(num_local, -1, -1).clone())
            self.register_buffer(f"w{name}_scale", template.weight_scale.expand(num_local, -1).clone())
            self.register_parameter(f"b{name}", nn.Parameter(template.bias.detach().expand(num_local, -1).clone()))

    @classmethod
    def from_float(cls, experts: GroupedExperts, bits: int) -> "QuantizedExperts":
        """`experts` quantized, on their device."""
        layer = cls(experts.num_local, experts.d_model, experts.d_ff, bits, experts.dropout.p,
                    experts.activation).to(experts.w1.device)
        with torch.no_grad():
            for name, weight, bias in (("1", experts.w1, experts.b1), ("2", experts.w2, experts.b2)):
                for i in range(experts.num_local):
                    q, scale = quantize(weight[i], bits)
                    getattr(layer, f"w{name}_q")[i].copy_(q if bits == 8 else pack_int4(q))
                    getattr(layer, f"w{name}_scale")[i].copy_(scale)
                getattr(layer, f"b{name}").copy_(bias)
        return layer

    def _weight(self, codes: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
        """codes [..., out, cols], scale [..., out] -> float weight [..., out, in_features]."""
        if self.bits == 4:
            codes = unpack_int4(codes.reshape(-1, codes.shape[-1]), in_features).view(*codes.shape[:-1], in_features)
        return codes.float() * scale[..., None]

    def weights(self):
        return (self._weight(self.w1_q, self.w1_scale, self.d_model), self.b1,
                self._weight(self.w2_q, self.w2_scale, self.d_ff), self.b2)

    def expert_weights(self, index: int):
        return (self._weight(self.w1_q[index], self.w1_scale[index], self.d_model), self.b1[index],
                self._weight(self.w2_q[index], self.w2_scale[index], self.d_ff), self.b2[index])

    def stacked(self) -> dict[str, torch.Tensor]:
        """Per expert in FeedForward-of-QuantLinears state-dict order (parameters, then buffers)."""
        return {"fc1.bias": self.b1, "fc1.weight_q": self.w1_q, "fc1.weight_scale": self.w1_scale,
                "fc2.bias": self.b2, "fc2.weight_q": self.w2_q, "fc2.weight_scale": self.w2_scale}

    def blueprint(self) -> nn.Module:
        expert = FeedForward(self.d_model, self.d_ff, self.dropout.p, self.activation)
        expert.fc1 = QuantLinear(self.d_model, self.d_ff, self.bits)
        expert.fc2 = QuantLinear(self.d_ff, self.d_model, self.bits)
        return expert.to("meta")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int{self.bits}"


def quantize_experts(model: nn.Module, bits: int) -> int:
    """Replaces the float experts of every MoE layer in `model` by QuantizedExperts (in place);
    returns the number of expert linear layers quantized."""
    count = 0
    for _, layer in model.named_modules():
        if isinstance(layer, MoEFFN) and isinstance(layer.experts, GroupedExperts):
            layer.experts = QuantizedExperts.from_float(layer.experts, bits)
            count += 2 * layer.experts.num_local
    return count
