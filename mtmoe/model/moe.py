"""The MoE FFN layer: the mtmoe router (top-1/top-2, capacity, Random Token Selection, padding
excluded) and index-based dispatch to experts, optionally across an expert-parallel group.

Pure torch: this is the layer exported models run. Training puts the same gate and expert
modules inside DeepSpeed's `MoE` container (`mtmoe.train.deepspeed_moe`) so DeepSpeed's engine
sees expert parameters, builds expert-parallel groups and checkpoints experts per file.

Notation: N tokens (B*T flattened, padding included), E experts in total, L = E / ep_size local
experts, C capacity (slots per expert), D model width, k = top_k.

Cost: the router is one [N, D] x [D, E] matmul. Dispatch and combine are gathers/scatters of
k*N rows (O(k N D)), instead of the one-hot einsum over [N, E, C] of GShard-style layers
(O(N E C D)), which on a CPU costs as much as the experts themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mtmoe.model.transformer import FeedForward


@dataclass
class RoutingPlan:
    """Where each (token, choice) goes. Shapes: [N, k] except `capacity` (an int).

    expert: chosen expert id; slot: position inside that expert's buffer, valid where `kept`;
    weight: combine weight (0 where dropped or padding)."""
    expert: torch.Tensor
    slot: torch.Tensor
    kept: torch.Tensor
    weight: torch.Tensor
    capacity: int


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int) -> int:
    """Slots per expert: ceil(k * tokens / E * factor), at least `min_capacity`."""
    return max(min_capacity, math.ceil(top_k * num_tokens / num_experts * capacity_factor))


def assign_slots(expert: torch.Tensor, valid: torch.Tensor, num_experts: int,
                 priority: Optional[torch.Tensor]) -> torch.Tensor:
    """Slot index of every (token, choice) in its expert's queue. [N, k] -> [N, k] int64.

    First choices of all tokens queue before any second choice (GShard). Within a choice, tokens
    queue by position (`priority` None), or by ascending `priority` [N] (Random Token Selection
    passes uniform noise, so overflow drops a uniformly random subset). Invalid entries get no slot
    (their value is meaningless) and do not take one."""
    n, k = expert.shape
    slots = torch.zeros_like(expert)
    filled = torch.zeros(num_experts, dtype=torch.long, device=expert.device)
    order = None if priority is None else torch.argsort(priority)
    for choice in range(k):
        onehot = F.one_hot(expert[:, choice], num_experts) * valid[:, choice, None].long()  # [N, E]
        if order is not None:
            rank_in_order = torch.cumsum(onehot[order], dim=0)
            ranks = torch.empty_like(rank_in_order)
            ranks[order] = rank_in_order
        else:
            ranks = torch.cumsum(onehot, dim=0)
        slots[:, choice] = (ranks - 1 + filled).gather(1, expert[:, choice, None]).squeeze(1)
        filled += onehot.sum(0)
    return slots


class Router(nn.Module):
    """Top-k softmax gate with capacity, optional Random Token Selection, and padding excluded.

    Returns the routing plan, the load-balancing loss (Switch/GShard: E * sum_e f_e * P_e over
    real tokens, f_e the share of first choices, P_e the mean gate probability), the router z-loss
    (mean logsumexp(logits)^2, ST-MoE) and detached telemetry. The linear layer is named `wg` as in
    DeepSpeed's TopKGate, whose checkpoint code knows that name."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, capacity_factor: float = 1.25,
                 eval_capacity_factor: float = 0.0, min_capacity: int = 4, use_rts: bool = True,
                 kept_experts: Optional[Sequence[int]] = None):
        super().__init__()
        self.wg = nn.Linear(d_model, num_experts, bias=False)  # one row per expert of the trained layer
        # Expert pruning (export): only `kept_experts` can be chosen, and they are renumbered
        # 0..m-1 for dispatch. Gate probabilities still come from the softmax over all rows, so a
        # token whose choices are all kept gets exactly the weights of the unpruned model.
        self.kept_experts = None if kept_experts is None else [int(e) for e in kept_experts]
        self.num_experts = num_experts if kept_experts is None else len(self.kept_experts)
        if self.kept_experts is not None:
            selectable = torch.zeros(num_experts, dtype=torch.bool)
            selectable[self.kept_experts] = True
            compact = torch.full((num_experts,), -1, dtype=torch.long)
            compact[self.kept_experts] = torch.arange(len(self.kept_experts))
            self.register_buffer("selectable", selectable, persistent=False)
            self.register_buffer("compact", compact, persistent=False)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.use_rts = use_rts
        self.ep_group = None  # set by DeepSpeed (MOELayer._set_ep_group) when experts are sharded

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def _group_max(self, value: int) -> int:
        """Max over the expert-parallel group: all ranks must agree on buffer sizes."""
        if self.ep_group is None or dist.get_world_size(self.ep_group) == 1:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ep_group)
        return int(t.item())

    def forward(self, x: torch.Tensor, keep: torch.Tensor):
        """x [N, D] (any dtype), keep [N] bool -> (plan, aux_loss, z_loss, stats)."""
        logits = self.wg(x).float()  # routing in fp32, as in every MoE recipe
        probs = logits.softmax(dim=-1)
        if self.kept_experts is None:
            top_p, top_e = probs.topk(self.top_k, dim=-1)  # [N, k]
        else:
            top_p, top_e = probs.masked_fill(~self.selectable, -1.0).topk(self.top_k, dim=-1)
            top_e = self.compact[top_e]
            probs = probs[:, self.kept_experts]
        if self.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True).clamp_min(1e-9)
        valid = keep[:, None].expand_as(top_e)
        num_real = int(keep.sum())

        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        priority = torch.rand(x.shape[0], device=x.device) if (self.use_rts and self.training) else None
        slots = assign_slots(top_e, valid, self.num_experts, priority)
        if factor > 0:
            capacity = expert_capacity(self._group_max(num_real), self.num_experts, self.top_k, factor,
                                       self.min_capacity)
        else:  # no dropping: capacity is the fullest queue in the group
            capacity = self._group_max(int(slots[valid].max()) + 1 if num_real else 1)
        kept = valid & (slots < capacity)
        weight = top_p * kept

        keep_f = keep.float()
        denom = keep_f.sum().clamp_min(1.0)
        first = F.one_hot(top_e[:, 0], self.num_experts).float() * keep_f[:, None]
        load = first.sum(0) / denom  # f_e
        importance = (probs * keep_f[:, None]).sum(0) / denom  # P_e
        aux_loss = self.num_experts * (load * importance).sum()
        z_loss = (torch.logsumexp(logits, -1) ** 2 * keep_f).sum() / denom
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1)
            stats = {
                "load": load.detach(),  # [E] share of real tokens whose first choice is e
                "importance": importance.detach(),  # [E] mean gate probability over real tokens
                "routed": (F.one_hot(top_e, self.num_experts) * valid[..., None]).sum((0, 1)).float(),  # [E] choices
                "dropped": (valid & ~kept).float().sum() / (valid.float().sum().clamp_min(1.0)),
                "entropy": (entropy * keep_f).sum() / denom,
                "tokens": torch.tensor(float(num_real)),
            }
        return RoutingPlan(top_e, slots, kept, weight, capacity), aux_loss, z_loss, stats


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0; its gradient is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, group, x: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return None, out


def run_experts(experts: nn.ModuleList, buffer: torch.Tensor, filled: Optional[list[int]] = None) -> torch.Tensor:
    """buffer [G, L, C, D] (G source groups) -> same shape, expert l applied to [:, l].

    `filled` [L] (one group only): rows in use per expert. Slots fill from 0, so each expert runs
    on its first `filled[l]` rows and the empty tail of the capacity buffer (up to C - filled rows,
    e.g. 1/3 of the rows with top-2 at capacity factor 1.5) costs nothing; the tail's output stays
    0 and is never combined."""
    if filled is None:
        return torch.stack([expert(buffer[:, i]) for i, expert in enumerate(experts)], dim=1)
    out = torch.zeros_like(buffer)
    # An expert container may choose the order (an offloaded one runs its resident experts first,
    # before loads evict them); the result does not depend on it.
    order = experts.execution_order(filled) if hasattr(experts, "execution_order") else range(len(experts))
    for i in order:
        # An expert with no tokens still runs (on 0 rows): its parameters then get a zero gradient
        # rather than none, which ZeRO's gradient partitioning expects from every rank.
        out[0, i, :filled[i]] = experts[i](buffer[0, i, :filled[i]])
    return out


class RoutingRelay:
    """Pre-gated routing (Pre-gated MoE, `moe.pregate=true`) for the MoE layers of one stack.

    MoE layer j's routing is decided at layer j-1, from layer j-1's FFN input, by layer j's own
    router weights; the first MoE layer of a stack also routes itself, and the last computes no
    routing ahead. Knowing layer j's experts one layer early is what lets an offloaded runtime load
    exactly those experts while layer j-1 computes. The router weights stay with the layer they
    route (same parameter names as a normal model, so pruning, export, checkpoints and fine-tuning
    a normal model into pre-gated form need nothing special); only the hidden state they see moves.

    `routers` are the stack's Routers in forward order. `listeners` are called as
    fn(index, expert [N, k]) as soon as the plan of MoE layer `index` is known (serving prefetch).
    Not an nn.Module: it holds references, no parameters."""

    def __init__(self, routers: Sequence[Router]):
        self.routers = list(routers)
        self.listeners: list = []
        self._pending: dict[int, tuple] = {}

    def route_ahead(self, index: int, tokens: torch.Tensor, keep: torch.Tensor) -> None:
        """At MoE layer `index`: route layer index+1 from this layer's input tokens [N, D]."""
        if index + 1 < len(self.routers):
            routed = self.routers[index + 1](tokens, keep)
            self._pending[index + 1] = routed
            for listener in self.listeners:
                listener(index + 1, routed[0].expert)

    def take(self, index: int, router: Router, tokens: torch.Tensor, keep: torch.Tensor):
        """Layer `index`'s routing: computed ahead by the previous layer, or here for the first."""
        if index == 0:
            routed = router(tokens, keep)
            for listener in self.listeners:
                listener(0, routed[0].expert)
            return routed
        if index not in self._pending:
            raise RuntimeError(f"pre-gated MoE layer {index} ran before layer {index - 1} routed it")
        return self._pending.pop(index)


def moe_forward(router: Router, experts: nn.ModuleList, x: torch.Tensor, keep: Optional[torch.Tensor],
                relay: Optional[RoutingRelay] = None, relay_index: int = 0):
    """The MoE FFN. x [B, T, D], keep [B, T] bool (None = all real) -> (y [B, T, D], aux, stats).

    1. route: plan (expert, slot, kept, weight) per (token, choice) — with a `relay` (pre-gating)
       the plan was computed by the previous MoE layer, and this layer routes the next one;
    2. dispatch: scatter kept rows into buffer [E, C, D] (dropped rows go nowhere);
    3. with expert parallelism, all-to-all so each rank gets [ep, L, C, D] for its L experts;
    4. experts; reverse all-to-all; 5. combine: y = sum_k weight * buffer[expert, slot]."""
    b, t, d = x.shape
    tokens = x.reshape(b * t, d)
    keep_flat = torch.ones(b * t, dtype=torch.bool, device=x.device) if keep is None else keep.reshape(-1)
    if relay is None:
        plan, aux_loss, z_loss, stats = router(tokens, keep_flat)
    else:
        plan, aux_loss, z_loss, stats = relay.take(relay_index, router, tokens, keep_flat)
        relay.route_ahead(relay_index, tokens, keep_flat)  # before the experts run: prefetch overlaps them
    num_experts, capacity = router.num_experts, plan.capacity

    flat_slot = (plan.expert * capacity + plan.slot.clamp(0, capacity - 1)).reshape(-1)  # [N*k]
    kept = plan.kept.reshape(-1)
    token_index = torch.arange(b * t, device=x.device).repeat_interleave(router.top_k)
    buffer = tokens.new_zeros(num_experts * capacity, d)
    buffer[flat_slot[kept]] = tokens[token_index[kept]]

    group = router.ep_group
    ep_size = 1 if group is None else dist.get_world_size(group)
    local = len(experts)
    buffer = buffer.view(ep_size, local, capacity, d)
    if ep_size > 1:
        buffer = _AllToAll.apply(group, buffer)
    filled = None
    if ep_size == 1:  # with expert parallelism the counts live on other ranks: run full buffers
        filled = torch.bincount(plan.expert.reshape(-1)[kept], minlength=num_experts).clamp(max=capacity).tolist()
    out = run_experts(experts, buffer, filled)
    if ep_size > 1:
        out = _AllToAll.apply(group, out)
    out = out.reshape(num_experts * capacity, d)

    gathered = out[flat_slot] * plan.weight.reshape(-1, 1).to(out.dtype)  # [N*k, D], 0 where dropped
    y = gathered.view(b * t, router.top_k, d).sum(1)
    return y.view(b, t, d), (aux_loss, z_loss), stats


class MoEFFN(nn.Module):
    """MoE FFN sub-layer: `gate` (Router) and `experts` (the local FeedForward experts).

    With ep_size > 1 this rank holds experts [ep_rank*L, (ep_rank+1)*L) of the E experts. Experts
    are initialised from a generator seeded by (init_seed, expert id), so every layout (any
    ep_size) starts from the same global weights."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int = 1, dropout: float = 0.0,
                 activation: str = "relu", capacity_factor: float = 1.25, eval_capacity_factor: float = 0.0,
                 min_capacity: int = 4, use_rts: bool = True, ep_size: int = 1, ep_rank: int = 0,
                 init_seed: Optional[int] = None, kept_experts: Optional[Sequence[int]] = None):
        super().__init__()
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.gate = Router(d_model, num_experts, top_k, capacity_factor, eval_capacity_factor,
                           min_capacity, use_rts, kept_experts)
        local = self.gate.num_experts // ep_size
        with torch.random.fork_rng(devices=[]):  # the global RNG stream must not depend on ep_size
            self.experts = nn.ModuleList(
                FeedForward(d_model, d_ff, dropout, activation,
                            None if init_seed is None else
                            torch.Generator().manual_seed(init_seed * 1000 + ep_rank * local + i))
                for i in range(local))

        self.relay: Optional[RoutingRelay] = None  # set by Seq2Seq when moe.pregate is on
        self.relay_index = 0

    @property
    def global_expert_ids(self) -> range:
        local = len(self.experts)
        return range(self.ep_rank * local, (self.ep_rank + 1) * local)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None):
        return moe_forward(self.gate, self.experts, x, keep, self.relay, self.relay_index)
