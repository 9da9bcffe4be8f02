"""The experts of one MoE layer: stored stacked, run as grouped GEMMs over contiguous row segments.

`ExpertGroup` is what an MoE layer's `experts` attribute holds. The dispatch (mtmoe.model.moe)
orders the kept (token, expert) rows by expert and calls the group once:

    forward(x [R, D], counts [L]) -> y [R, D]

expert i takes rows offs[i-1] .. offs[i]-1 (offs = cumsum(counts)); rows from offs[-1] on are
padding the caller ignores: their outputs (and the gradient a grouped kernel passes to their
inputs) are unspecified, and they never reach the weights or biases. `counts` stays on the device:
no host sync unless the backend needs one (the looped fallback). Three groups implement it:
`GroupedExperts` (training and float inference), `mtmoe.model.quantized.QuantizedExperts` (int8/int4
exports) and `mtmoe.serve.runtime.OffloadedExperts` (experts served from a cache); the capacity-buffer
reference dispatch and the serving runtime call one expert at a time with `forward_expert(i, x)`.

Storage of GroupedExperts (nn.Linear's [out, in] per expert, the layout torch's grouped GEMM
takes transposed, as torchtitan stores it):

    w1 [L, F, D], b1 [L, F], w2 [L, D, F], b2 [L, D]

Its state dict shows each expert under the names a FeedForward expert has:
`<i>.fc1.weight` = w1[i], `<i>.fc1.bias` = b1[i], `<i>.fc2.weight`, `<i>.fc2.bias`. That is the
one key grammar of mtmoe's checkpoints and exports (`encoder.1.ffn.experts.3.fc1.weight`), so
DeepSpeed's per-expert checkpoint files, export, pruning, EfD/AoE and the serving store read and
write single experts as before, and exports written before experts were stacked load unchanged.
A parameter an outside engine has partitioned (DeepSpeed ZeRO-3 leaves an empty placeholder in
the module) is saved and loaded under its own stacked name instead.

Backends (`grouped_backend`): `torch._grouped_mm`, one kernel for all experts with no host sync,
on CUDA in bf16 and on this CPU; elsewhere (fp32 on a GPU, older torch) a loop over the experts'
row segments, which needs the counts on the host. Both give the same result; tests hold them and
the reference dispatch equal.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtmoe.model.transformer import FeedForward, seeded_uniform_

EXPERT_TENSORS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
"""The state-dict names of one float expert, in the order a FeedForward lists them."""
STACKED_NAMES = dict(zip(("w1", "b1", "w2", "b2"), EXPERT_TENSORS))
"""GroupedExperts' stacked parameter -> the per-expert name its rows take in a state dict."""


BACKENDS = ("grouped_mm", "loop")


def grouped_backend(x: torch.Tensor, *widths: int) -> str:
    """`grouped_mm` where torch's grouped GEMM runs for this device and dtype: CUDA in bf16 on
    SM >= 8.0, or a CPU (fp32/bf16; ~1.1-1.2x the loop's speed for an MoE layer here), else `loop`
    (one expert after another over the same contiguous rows; needs the counts on the host).
    The kernel also wants every row of every operand 16-byte aligned: `widths` (the matmuls'
    feature sizes) times the element size must be multiples of 16."""
    if not hasattr(torch, "_grouped_mm") or any(w * x.element_size() % 16 for w in widths):
        return "loop"
    if x.device.type == "cuda":
        ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
        return "grouped_mm" if ok else "loop"
    return "grouped_mm" if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) else "loop"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: autocast's where it is on for x's device (the grouped GEMM
    is not an autocast op, so the group casts for it), else x's own."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ExpertGroup(nn.Module):
    """Interface of the `experts` of an MoE layer (see the module docstring)."""

    num_local: int
    """Experts held here (the local ones under expert parallelism; the kept ones when pruned)."""

    def __len__(self) -> int:
        return self.num_local

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_expert(self, index: int, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Expert `index` alone: x [n, D] -> [n, D]."""
        raise NotImplementedError

    def blueprint(self) -> nn.Module:  # pragma: no cover
        """One expert as a module on the meta device whose state dict has the names and shapes of
        one expert's entries (`fc1.weight`, ...): what a serving cache slot holds."""
        raise NotImplementedError


def segment_ids(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """Expert of each of `rows` rows laid out by `counts` [L]; rows past the last segment get L.
    [rows] int64, on counts' device, without a host sync."""
    ends = torch.cumsum(counts, 0)
    return torch.searchsorted(ends, torch.arange(rows, device=counts.device), right=True)


def add_segment_bias(y: torch.Tensor, bias: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """y [R, out] + bias[segment of each row]; padding rows (segment L) get a zero bias and send
    no gradient to `bias`."""
    padded = torch.cat([bias, bias.new_zeros(1, bias.shape[1])])
    return y + padded[segment]


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: torch.Tensor,
                   segment: torch.Tensor) -> torch.Tensor:
    """x [R, in] rows grouped by expert (`counts` [L], `segment` = segment_ids) -> [R, out] =
    x @ weight[e].T + bias[e] in one grouped GEMM; weight [L, out, in], bias [L, out]. Rows past
    the segments are not computed (their values, and the gradient the kernel hands their inputs,
    are unspecified: on this CPU build the latter is not zero)."""
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    y = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return add_segment_bias(y, bias, segment)


class FeedForwardGroup(ExpertGroup):
    """Experts that are FeedForwards (fc2(act(fc1(x))), biases included) with stacked tensors.

    Subclasses say how to get the float weights (`weights()`: w1 [L, F, D], b1 [L, F], w2 [L, D, F],
    b2 [L, D]; `expert_weights(i)`: one expert's) and which stacked tensors the state dict shows per
    expert (`stacked()`: {per-expert name: tensor [L, ...]})."""

    def __init__(self, num_local: int, d_model: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        self.num_local, self.d_model, self.d_ff, self.activation = num_local, d_model, d_ff, activation
        self.dropout = nn.Dropout(dropout)
        self.act = F.relu if activation == "relu" else F.gelu

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def expert_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def stacked(self) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    backend: Optional[str] = None
    """`grouped_mm`, `loop`, or None: `grouped_backend`'s choice for the input."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        if (self.backend or grouped_backend(x, self.d_model, self.d_ff)) == "loop":
            return self._forward_loop(x, counts.tolist())
        w1, b1, w2, b2 = (t.to(x.dtype) for t in self.weights())
        segment = segment_ids(counts, x.shape[0])
        h = self.dropout(self.act(grouped_linear(x, w1, b1, counts, segment)))
        return grouped_linear(h, w2, b2, counts, segment)

    def _forward_loop(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One expert after another on its rows; every expert runs, on 0 rows if it has none, so
        each expert parameter gets a (zero) gradient, as ZeRO's gradient partitioning expects."""
        pieces, start = [], 0
        for e, n in enumerate(counts):
            pieces.append(self.forward_expert(e, x[start:start + n]))
            start += n
        if start < x.shape[0]:
            pieces.append(x.new_zeros(x.shape[0] - start, x.shape[1]))
        return torch.cat(pieces)

    def forward_expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = (t.to(x.dtype) for t in self.expert_weights(index))
        return F.linear(self.dropout(self.act(F.linear(x, w1, b1))), w2, b2)

    # -- the per-expert key grammar of the state dict -------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        stacked = self.stacked()
        if not is_materialised(stacked.values()):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for i in range(self.num_local):
            for name, tensor in stacked.items():
                destination[f"{prefix}{i}.{name}"] = tensor[i] if keep_vars else tensor[i].detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        load_per_expert(self, self.stacked(), state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_local} experts, d_model={self.d_model}, d_ff={self.d_ff}, {self.activation}"


class GroupedExperts(FeedForwardGroup):
    """`num_local` float FeedForward experts: w1 [L, F, D], b1 [L, F], w2 [L, D, F], b2 [L, D].

    `generators` (one per local expert): expert i draws fc1.weight then fc2.weight from its own
    generator, as a seeded FeedForward does, so every expert-parallel layout starts from the same
    global weights; the draws happen inside __init__, before an outside engine (ZeRO-3's zero.Init)
    can partition the parameters. Without generators: the same distribution from torch's RNG."""

    def __init__(self, num_local: int, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu",
                 generators: Optional[Sequence[torch.Generator]] = None):
        super().__init__(num_local, d_model, d_ff, dropout, activation)
        self.w1 = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        self.b1 = nn.Parameter(torch.zeros(num_local, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_local, d_model, d_ff))
        self.b2 = nn.Parameter(torch.zeros(num_local, d_model))
        with torch.no_grad():
            for i in range(num_local):
                g = None if generators is None else generators[i]
                seeded_uniform_(self.w1[i], d_model, g)
                seeded_uniform_(self.w2[i], d_ff, g)

    def weights(self):
        return self.w1, self.b1, self.w2, self.b2

    def expert_weights(self, index: int):
        return self.w1[index], self.b1[index], self.w2[index], self.b2[index]

    def stacked(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, attr) for attr, name in STACKED_NAMES.items()}

    def blueprint(self) -> nn.Module:
        return FeedForward(self.d_model, self.d_ff, self.dropout.p, self.activation).to("meta")


class ExpertList(ExpertGroup):
    """`num_local` FeedForward experts as separate modules (children "0", "1", ...): the storage
    for layouts that move parameters one at a time. Under ZeRO-3 with NVMe offload an expert is
    gathered from disk when it runs, so per-expert tensors bound the memory a gather needs (a
    stacked [E, F, D] weight would be gathered whole). Runs the experts one after another; same
    state-dict names and the same seeded initial weights as GroupedExperts."""

    def __init__(self, num_local: int, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu",
                 generators: Optional[Sequence[torch.Generator]] = None):
        super().__init__()
        self.num_local = num_local
        for i in range(num_local):
            self.add_module(str(i), FeedForward(d_model, d_ff, dropout, activation,
                                                None if generators is None else generators[i]))

    def __getitem__(self, index: int) -> FeedForward:
        return self._modules[str(index)]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        pieces, start = [], 0
        for e, n in enumerate(counts.tolist()):  # every expert runs (on 0 rows if it has none): each gets a gradient
            pieces.append(self[e](x[start:start + n]))
            start += n
        if start < x.shape[0]:
            pieces.append(x.new_zeros(x.shape[0] - start, x.shape[1]))
        return torch.cat(pieces)

    def forward_expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self[index](x)

    def blueprint(self) -> nn.Module:
        return copy.deepcopy(self[0]).to("meta")


class SelectedExperts(FeedForwardGroup):
    """The experts `kept` of another FeedForwardGroup, renumbered 0..m-1, computed as the experts of
    the layer pruned to them would be. A view: nothing is copied or registered (the source stays
    the owner of the parameters and of the state dict); the kept rows of the stacked weights are
    gathered per forward. What-if pruning at export calibration (mtmoe.export.calibrate)."""

    def __init__(self, source: FeedForwardGroup, kept: Sequence[int]):
        super().__init__(len(kept), source.d_model, source.d_ff, source.dropout.p, source.activation)
        self.kept = [int(e) for e in kept]
        self.__dict__["source"] = source  # not a child module: its parameters stay the source's

    def weights(self):
        index = torch.tensor(self.kept, device=self.source.weights()[0].device)
        return tuple(t[index] for t in self.source.weights())

    def expert_weights(self, index: int):
        return self.source.expert_weights(self.kept[index])

    def stacked(self) -> dict[str, torch.Tensor]:
        raise TypeError("SelectedExperts is a view for computing; save the source group instead")

    def blueprint(self) -> nn.Module:
        return self.source.blueprint()


EXPERT_STORAGES = {"stacked": GroupedExperts, "per_expert": ExpertList}
"""`moe.expert_storage` -> the ExpertGroup a layer's float experts are built as."""


def is_materialised(tensors) -> bool:
    """False when an outside engine replaced the stacked tensors by placeholders (ZeRO-3 keeps an
    empty tensor in the module and the real partition elsewhere)."""
    return all(t.dim() >= 2 for t in tensors)


def load_per_expert(module: nn.Module, stacked: dict[str, torch.Tensor], state_dict, prefix, local_metadata,
                    strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """`_load_from_state_dict` of a stacked expert group: copies `<prefix><i>.<name>` into row i
    of the stacked tensor `stacked[name]` [L, ...]. A state dict that holds the stacked names
    themselves (saved while partitioned) goes through nn.Module's own loading."""
    num_local = next(iter(stacked.values())).shape[0] if is_materialised(stacked.values()) else 0
    per_expert = [f"{prefix}{i}.{name}" for name in stacked for i in range(num_local)]
    if not num_local or not any(key in state_dict for key in per_expert):
        return nn.Module._load_from_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                               unexpected_keys, error_msgs)
    with torch.no_grad():
        for name, tensor in stacked.items():
            for i in range(num_local):
                key = f"{prefix}{i}.{name}"
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict[key]
                if tuple(value.shape) != tuple(tensor.shape[1:]):
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} "
                                      f"from checkpoint, the shape in current model is {tuple(tensor.shape[1:])}.")
                    continue
                tensor[i].copy_(value)
    if strict:
        expected = set(per_expert)
        unexpected_keys.extend(key for key in state_dict if key.startswith(prefix) and key not in expected)


def per_expert_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict that holds GroupedExperts' stacked parameters under their own names
    (`<prefix>experts.w1` [E, F, D], as ZeRO-3 checkpoints name them) in the per-expert grammar
    (`<prefix>experts.<e>.fc1.weight` [F, D]); other entries unchanged."""
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix.rpartition(".")[2] == "experts" and leaf in STACKED_NAMES and value.dim() >= 2:
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{STACKED_NAMES[leaf]}"] = value[e].clone()
        else:
            out[key] = value
    return out


def stacked_from_per_expert(state: dict[str, torch.Tensor], name: str, num_experts: int) -> torch.Tensor:
    """One stacked parameter, `<prefix>.w1` [E, F, D], from a state dict in the per-expert grammar
    (`<prefix>.<e>.fc1.weight` [F, D] for e < num_experts): the inverse of `per_expert_state`, for
    any prefix (DeepSpeed's `...deepspeed_experts.w1` too). KeyError naming the missing key."""
    prefix, _, leaf = name.rpartition(".")
    if leaf not in STACKED_NAMES:
        raise KeyError(f"{name}: not a stacked expert parameter ({', '.join(STACKED_NAMES)})")
    return torch.stack([state[f"{prefix}.{e}.{STACKED_NAMES[leaf]}"] for e in range(num_experts)])
