"""One expert's tensors packed into one flat byte buffer.

An expert is a handful of tensors: a FeedForward has fc1.weight [F, D], fc1.bias [F],
fc2.weight [D, F], fc2.bias [D] (fp32); a quantized export's expert has int8 codes [out, in] (or
int4 packed as uint8 [out, ceil(in/2)]) and fp32 scales [out] in place of the weights. Packed
into one blob uint8 [nbytes], moving an expert between tiers is one contiguous copy (one read of
the store file, one host-to-device DMA), and a cache slot can be an expert module whose tensors
are views into the slot's buffer: putting another expert there is `buffer.copy_(blob)`, with no
allocation and no module rebuilt. Works for any expert module type, as long as every tensor it
computes with is in its state dict (parameters and persistent buffers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

ALIGN = 64
"""Byte alignment of each tensor inside a blob: views of any dtype are legal and vector-aligned."""


@dataclass(frozen=True)
class TensorSpec:
    name: str  # state-dict name inside the expert, e.g. "fc1.weight"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset in the blob, a multiple of ALIGN

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


class ExpertLayout:
    """Where each tensor of an expert lies in its blob. All experts of one MoE layer share it."""

    def __init__(self, specs: list[TensorSpec]):
        self.specs = specs
        end = max((s.offset + s.nbytes for s in specs), default=0)
        self.nbytes = -(-end // ALIGN) * ALIGN

    @classmethod
    def of(cls, expert: nn.Module) -> "ExpertLayout":
        """The layout of `expert`'s state dict, tensors in state-dict order."""
        state = expert.state_dict(keep_vars=True)
        computed = {name for name, _ in expert.named_parameters()} | {name for name, _ in expert.named_buffers()}
        missing = sorted(computed - set(state))
        if missing:
            raise ValueError(f"{type(expert).__name__}: tensors {missing} are not in its state dict "
                             "(non-persistent buffers), so the expert store cannot hold them")
        specs, offset = [], 0
        for name, tensor in state.items():
            spec = TensorSpec(name, tensor.dtype, tuple(tensor.shape), offset)
            specs.append(spec)
            offset = -(-(offset + spec.nbytes) // ALIGN) * ALIGN
        return cls(specs)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """flat uint8 [nbytes] -> {name: view of it with the tensor's dtype and shape}."""
        return {s.name: flat.narrow(0, s.offset, s.nbytes).view(s.dtype).view(s.shape) for s in self.specs}

    def pack(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: tensor} (one expert) -> blob uint8 [nbytes]; padding bytes are 0."""
        flat = torch.zeros(self.nbytes, dtype=torch.uint8)
        for s, view in zip(self.specs, self.views(flat).values()):
            t = tensors[s.name]
            if t.dtype != s.dtype or tuple(t.shape) != s.shape:
                raise ValueError(f"{s.name}: got {t.dtype} {tuple(t.shape)}, expected {s.dtype} {s.shape}")
            view.copy_(t)
        return flat

    def bind(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Makes every tensor of `module` (same type and shapes as the layout's expert) a view
        into `flat` [nbytes], in place: the module then computes with whatever blob is in `flat`."""
        for name, view in self.views(flat).items():
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(view, requires_grad=False)
            elif attr in owner._buffers:
                owner._buffers[attr] = view
            else:
                raise ValueError(f"{type(module).__name__} has no tensor {name!r}")

    def to_json(self) -> str:
        return json.dumps([[s.name, str(s.dtype).removeprefix("torch."), list(s.shape), s.offset]
                           for s in self.specs])

    @classmethod
    def from_json(cls, text: str) -> "ExpertLayout":
        return cls([TensorSpec(name, getattr(torch, dtype), tuple(shape), offset)
                    for name, dtype, shape, offset in json.loads(text)])

    def __eq__(self, other) -> bool:
        return isinstance(other, ExpertLayout) and self.specs == other.specs
