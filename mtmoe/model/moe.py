"""The MoE FFN layer: the mtmoe router (top-1/top-2, capacity, Random Token Selection, padding
excluded) and dispatch by permutation to the experts, optionally across an expert-parallel group.

Pure torch: this is the layer exported models run. Training puts the same gate and expert
modules inside DeepSpeed's `MoE` container (`mtmoe.train.deepspeed_moe`) so DeepSpeed's engine
sees expert parameters, builds expert-parallel groups and checkpoints experts per file.

Notation: N tokens (B*T flattened, padding included), k = top_k, A = N*k (token, choice)
assignments, E experts in total, L = E / ep_size local experts, D model width.

Dispatch (`grouped_dispatch`, the default), after MegaBlocks / torchtitan: the router sorts the
A assignments into GShard queue order (by expert; first choices before second choices; by
position, or by a random priority with Random Token Selection), which gives every assignment its
slot in its expert's queue; with a capacity C the first C of each queue are kept. Kept rows are
laid out contiguously by expert (`RoutingPlan.dest`), the experts run as one grouped GEMM over
those segments (mtmoe.model.experts), and the outputs are gathered back weighted by the gate.
Every size stays on the device: no capacity buffer, no host sync (with expert parallelism the
all-to-all needs its split sizes on the host: one sync per layer). `capacity_factor <= 0` is
dropless (MegaBlocks' dMoE): every real token reaches its k experts.

`reference_dispatch` is the index dispatch it replaced, kept as the slow reference the tests hold
the fast path to (`moe.dispatch=reference` selects it): a capacity buffer [E, C, D], a fixed-size
all-to-all, one expert at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mtmoe.model.experts import EXPERT_STORAGES, ExpertGroup

DISPATCHES = ("grouped", "reference")


@dataclass
class RoutingPlan:
    """Where each (token, choice) goes. [N, k] tensors, `dest` [A], `counts` [E].

    expert: chosen expert (numbered as the layer's expert modules); kept: reaches its expert
    (real token within capacity); weight: combine weight (0 where not kept); slot: position in the
    expert's queue (meaningful for real tokens); dest: row of each assignment (token-major,
    n*k + choice) in the expert-ordered buffer, kept rows first by expert and slot, the others
    after them; counts: kept rows per expert; capacity: slots per expert (0-dim int64 tensor), None
    when nothing is dropped."""
    expert: torch.Tensor
    kept: torch.Tensor
    weight: torch.Tensor
    slot: torch.Tensor
    dest: torch.Tensor
    counts: torch.Tensor
    capacity: Optional[torch.Tensor]


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int) -> int:
    """Slots per expert: ceil(k * tokens / E * factor), at least `min_capacity`; never more than the
    k * tokens assignments there are (a huge factor means no limit, not an overflow)."""
    return max(min_capacity, min(top_k * num_tokens, math.ceil(top_k * num_tokens / num_experts * capacity_factor)))


def capacity_tensor(num_tokens: torch.Tensor, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int) -> torch.Tensor:
    """`expert_capacity` computed on the device from a 0-dim token count (float64, the same
    rounding as the host formula)."""
    slots = torch.ceil(num_tokens.double() * top_k / num_experts * capacity_factor)
    return torch.minimum(slots, num_tokens.double() * top_k).long().clamp_min(min_capacity)


def count_per_expert(ids: torch.Tensor, num_experts: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How often each expert id in [0, num_experts) occurs in `ids` (optionally weighted) ->
    [num_experts] (int64, or the weights' dtype). A scatter-add, not bincount: bincount syncs on a GPU."""
    ids = ids.reshape(-1)
    if weights is None:
        weights = torch.ones_like(ids)
    out = torch.zeros(num_experts, dtype=weights.dtype, device=ids.device)
    return out.scatter_add_(0, ids, weights.reshape(-1))


def plan_dispatch(expert: torch.Tensor, valid: torch.Tensor, num_experts: int, capacity: Optional[torch.Tensor],
                  priority: Optional[torch.Tensor]):
    """Queue slots and the expert-ordered layout of the assignments. expert, valid [N, k];
    capacity 0-dim or None (no limit); priority [N] (RTS noise: ascending priority queues first)
    or None (by position) -> (slot [N, k], kept [N, k], dest [A], counts [E]).

    One sort of the A assignments by (expert, choice, rank in the priority order) is the GShard
    queue order; an assignment's slot is its distance from the start of its expert's run. Invalid
    assignments (padding) sort after every expert and take no slot."""
    n, k = expert.shape
    a, device = n * k, expert.device
    if priority is None:
        rank = torch.arange(n, device=device)
    else:
        rank = torch.empty(n, dtype=torch.long, device=device)
        rank[torch.argsort(priority)] = torch.arange(n, device=device)
    bucket = torch.where(valid, expert, num_experts)  # [N, k]; num_experts: not routed
    key = (bucket * k + torch.arange(k, device=device)) * n + rank[:, None]
    sorted_key, order = key.reshape(-1).sort()
    bucket_sorted = sorted_key // (k * n)
    queued = count_per_expert(bucket_sorted, num_experts + 1)  # [E + 1]: queue lengths, then the unrouted
    starts = torch.cumsum(queued, 0) - queued
    position = torch.arange(a, device=device)
    slot_sorted = position - starts[bucket_sorted]
    routed = bucket_sorted < num_experts
    if capacity is None:
        kept_sorted, counts = routed, queued[:num_experts]
    else:
        kept_sorted = routed & (slot_sorted < capacity)
        counts = torch.minimum(queued[:num_experts], capacity)
    kept_starts = torch.cumsum(counts, 0) - counts
    kept_starts = torch.cat([kept_starts, kept_starts.new_zeros(1)])  # the unrouted bucket: unused
    rest = counts.sum() + torch.cumsum((~kept_sorted).long(), 0) - 1
    dest_sorted = torch.where(kept_sorted, kept_starts[bucket_sorted] + slot_sorted, rest)
    dest = torch.empty_like(dest_sorted).scatter_(0, order, dest_sorted)
    slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted).view(n, k)
    kept = torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted).view(n, k)
    return slot, kept, dest, counts


def assign_slots(expert: torch.Tensor, valid: torch.Tensor, num_experts: int,
                 priority: Optional[torch.Tensor]) -> torch.Tensor:
    """Slot index of every (token, choice) in its expert's queue, by one-hot cumulative sums: the
    reference for `plan_dispatch`'s slots. [N, k] -> [N, k] int64.

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
    (mean logsumexp(logits)^2, ST-MoE) and detached telemetry (device tensors: reading them is the
    caller's host sync, at log time). The linear layer is named `wg` as in DeepSpeed's TopKGate.

    Top-2 combine weights are renormalised over the two choices before capacity drops (GShard's
    order): a token whose second choice is dropped keeps p1 / (p1 + p2) on its first, where
    DeepSpeed's top2gating renormalises after the drop (weight 1). Both paths here agree on it."""

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
            # on the layer's device: a list index would be copied there at every call
            self.register_buffer("kept_index", torch.tensor(self.kept_experts, dtype=torch.long), persistent=False)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.use_rts = use_rts
        self.ep_group = None
        """The expert-parallel torch.distributed group when experts are sharded over ranks; set from
        outside the model by whoever shards them (mtmoe.train.deepspeed_moe)."""

    def group_max(self, value: torch.Tensor) -> torch.Tensor:
        """Max of a 0-dim tensor over the expert-parallel group (all ranks must agree on the
        capacity); stays on the device."""
        if self.ep_group is None or dist.get_world_size(self.ep_group) == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.ep_group)
        return value

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> router logits [N, E_all] computed in fp32, also under bf16 autocast (routing in
        fp32, as in Switch / ST-MoE / DeepSpeed's TopKGate): a bf16 matmul keeps 8 bits of mantissa,
        which flips near-tied top-k choices between a bf16 and an fp32 pass over the same weights,
        and feeds the z-loss's logsumexp and the softmax rounded inputs. The layer is called (not
        its weight read), so ZeRO-3's hooks gather the weight; mtmoe keeps weights in fp32 (bf16 is
        autocast), and a layer cast to another dtype computes in that dtype."""
        with torch.autocast(x.device.type, enabled=False):
            return self.wg(x.to(self.wg.weight.dtype)).float()

    def select(self, x: torch.Tensor):
        """The routing decision alone. x [N, D] -> (logits [N, E_all] fp32, probs [N, E] fp32 over the
        selectable experts, top_p [N, k] combine weights, top_e [N, k] expert ids numbered as the
        layer's expert modules). Also what serving's speculative prefetch predicts with."""
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        if self.kept_experts is None:
            top_p, top_e = probs.topk(self.top_k, dim=-1)  # [N, k]
        else:
            top_p, top_e = probs.masked_fill(~self.selectable, -1.0).topk(self.top_k, dim=-1)
            top_e = self.compact[top_e]
            probs = probs.index_select(1, self.kept_index)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True).clamp_min(1e-9)
        return logits, probs, top_p, top_e

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        """The experts `select` picks, top_e [N, k] (numbered as the layer's expert modules), from
        the logits alone: softmax is monotonic, so their top-k is the probabilities' (up to exact
        float ties), and a prediction (serving's prefetch policies, at every MoE layer of every
        decoding step) needs neither the softmax nor the weights."""
        logits = self.logits(x)
        if self.kept_experts is None:
            return logits.topk(self.top_k, dim=-1)[1]
        return self.compact[logits.masked_fill(~self.selectable, float("-inf")).topk(self.top_k, dim=-1)[1]]

    def forward(self, x: torch.Tensor, keep: torch.Tensor):
        """x [N, D] (any dtype), keep [N] bool -> (plan, aux_loss, z_loss, stats)."""
        logits, probs, top_p, top_e = self.select(x)
        valid = keep[:, None].expand_as(top_e)
        keep_f = keep.float()
        num_real = keep.sum()

        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        priority = torch.rand(x.shape[0], device=x.device) if (self.use_rts and self.training) else None
        capacity = None
        if factor > 0:
            capacity = capacity_tensor(self.group_max(num_real), self.num_experts, self.top_k, factor,
                                       self.min_capacity)
        slot, kept, dest, counts = plan_dispatch(top_e, valid, self.num_experts, capacity, priority)
        weight = top_p * kept

        denom = keep_f.sum().clamp_min(1.0)
        load = count_per_expert(top_e[:, 0], self.num_experts, keep_f) / denom  # f_e
        importance = (probs * keep_f[:, None]).sum(0) / denom  # P_e
        aux_loss = self.num_experts * (load * importance).sum()
        z_loss = (torch.logsumexp(logits, -1) ** 2 * keep_f).sum() / denom
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1)
            stats = {
                "load": load.detach(),  # [E] share of real tokens whose first choice is e
                "importance": importance.detach(),  # [E] mean gate probability over real tokens
                "routed": count_per_expert(top_e, self.num_experts, valid.float()),  # [E] choices of real tokens
                "dropped": (valid & ~kept).float().sum() / (valid.float().sum().clamp_min(1.0)),
                "entropy": (entropy * keep_f).sum() / denom,
                "tokens": num_real.float(),
            }
        return RoutingPlan(top_e, kept, weight, slot, dest, counts, capacity), aux_loss, z_loss, stats


# -- the grouped dispatch ------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 with split sizes (equal when None); its gradient is the
    reverse all-to-all."""

    @staticmethod
    def forward(ctx, group, x: torch.Tensor, out_splits: Optional[list[int]] = None,
                in_splits: Optional[list[int]] = None) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        rows = x.shape[0] if out_splits is None else sum(out_splits)
        out = x.new_empty(rows, *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows = grad.shape[0] if ctx.in_splits is None else sum(ctx.in_splits)
        out = grad.new_empty(rows, *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return None, out, None, None


def run_expert_parallel(experts: ExpertGroup, rows: torch.Tensor, counts: torch.Tensor, group) -> torch.Tensor:
    """rows [A, D] ordered by global expert (kept rows first, `counts` [E] of them) -> expert
    outputs in the same order; each rank runs its L local experts on the rows all ranks send them.

    1. all-to-all of the counts [ep, L]: what each rank will receive for each of its experts;
    2. the split sizes go to the host (the one sync of expert parallelism) and the kept rows are
       exchanged (rank r receives, from every rank, the rows of experts r*L .. r*L+L-1);
    3. received rows (by source rank, then local expert) are regrouped by local expert for the
       grouped GEMM, and everything goes back the same way."""
    ep, local = dist.get_world_size(group), len(experts)
    per_rank = counts.view(ep, local)
    received_counts = torch.empty_like(per_rank)
    dist.all_to_all_single(received_counts, per_rank.contiguous(), group=group)
    sizes = torch.cat([per_rank.sum(1), received_counts.sum(1)]).tolist()
    send, receive = sizes[:ep], sizes[ep:]
    sent = sum(send)
    received = _AllToAll.apply(group, rows[:sent], receive, send)  # [sum(receive), D]
    segment = torch.repeat_interleave(torch.arange(ep * local, device=rows.device), received_counts.reshape(-1),
                                      output_size=sum(receive))  # source rank * L + local expert
    order = torch.argsort((segment % local) * ep + segment // local, stable=True)
    out = experts(received[order], received_counts.sum(0))
    out = out[torch.argsort(order)]  # back to (source rank, local expert) order
    returned = _AllToAll.apply(group, out, send, receive)
    return torch.cat([returned, returned.new_zeros(rows.shape[0] - sent, rows.shape[1])])


def grouped_dispatch(router: Router, experts: ExpertGroup, tokens: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """tokens [N, D] -> y [N, D] = sum over kept choices of weight * expert(token)."""
    n, d = tokens.shape
    a = plan.dest.shape[0]
    kept = plan.kept.reshape(-1)
    token_of = torch.arange(a, device=tokens.device) // router.top_k
    # The buffer row of each kept assignment takes its token; the rows after the kept ones read an
    # appended zero row (so no gradient of theirs reaches a real token).
    source = torch.full((a,), n, dtype=torch.long, device=tokens.device)
    source.scatter_(0, plan.dest, torch.where(kept, token_of, n))
    rows = torch.cat([tokens, tokens.new_zeros(1, d)])[source]  # [A, D] by expert
    group = router.ep_group
    if group is None or dist.get_world_size(group) == 1:
        out = experts(rows, plan.counts)
    else:
        out = run_expert_parallel(experts, rows, plan.counts, group)
    gathered = torch.where(kept[:, None], out[plan.dest], 0)  # rows past the kept ones are unspecified
    gathered = gathered * plan.weight.reshape(-1, 1).to(out.dtype)
    return gathered.view(n, router.top_k, d).sum(1)


# -- the reference dispatch ----------------------------------------------------------------------
def run_experts(experts: ExpertGroup, buffer: torch.Tensor, filled: Optional[list[int]] = None) -> torch.Tensor:
    """buffer [G, L, C, D] (G source groups) -> same shape, expert l applied to [:, l].

    `filled` [L] (one group only): rows in use per expert (slots fill from 0); each expert runs on
    its first `filled[l]` rows, the empty tail stays 0 and is never combined. Every expert runs,
    on 0 rows if it has none, so its parameters get a (zero) gradient."""
    if filled is None:
        return torch.stack([experts.forward_expert(i, buffer[:, i]) for i in range(len(experts))], dim=1)
    out = torch.zeros_like(buffer)
    for i in range(len(experts)):
        out[0, i, :filled[i]] = experts.forward_expert(i, buffer[0, i, :filled[i]])
    return out


def reference_dispatch(router: Router, experts: ExpertGroup, tokens: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """The index dispatch with a capacity buffer (the slow reference of `grouped_dispatch`):

    1. scatter kept rows into buffer [E, C, D] at (expert, slot) (dropped rows go nowhere);
    2. with expert parallelism, all-to-all so each rank gets [ep, L, C, D] for its L experts;
    3. experts one at a time; reverse all-to-all; 4. combine: y = sum_k weight * buffer[expert, slot]."""
    n, d = tokens.shape
    k, num_experts = router.top_k, router.num_experts
    if plan.capacity is not None:
        capacity = max(1, int(plan.capacity))  # 0 (min_capacity=0, no real token): one unused row
    else:  # no dropping: the fullest queue in the group
        capacity = max(1, int(router.group_max(plan.counts.max())))
    flat_slot = (plan.expert * capacity + plan.slot.clamp(0, capacity - 1)).reshape(-1)  # [N*k]
    kept = plan.kept.reshape(-1)
    token_index = torch.arange(n, device=tokens.device).repeat_interleave(k)
    buffer = tokens.new_zeros(num_experts * capacity, d)
    buffer[flat_slot[kept]] = tokens[token_index[kept]]

    group = router.ep_group
    ep_size = 1 if group is None else dist.get_world_size(group)
    buffer = buffer.view(ep_size, len(experts), capacity, d)
    if ep_size > 1:
        buffer = _AllToAll.apply(group, buffer)
    filled = plan.counts.tolist() if ep_size == 1 else None  # with expert parallelism the counts live elsewhere
    out = run_experts(experts, buffer, filled)
    if ep_size > 1:
        out = _AllToAll.apply(group, out)
    out = out.reshape(num_experts * capacity, d)
    gathered = out[flat_slot] * plan.weight.reshape(-1, 1).to(out.dtype)  # [N*k, D], 0 where dropped
    return gathered.view(n, k, d).sum(1)


DISPATCH = {"grouped": grouped_dispatch, "reference": reference_dispatch}


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


def moe_forward(router: Router, experts: ExpertGroup, x: torch.Tensor, keep: Optional[torch.Tensor],
                relay: Optional[RoutingRelay] = None, relay_index: int = 0, dispatch: str = "grouped"):
    """The MoE FFN. x [B, T, D], keep [B, T] bool (None = all real) -> (y [B, T, D], aux, stats).

    Routes (with a `relay`, pre-gating, the plan was computed by the previous MoE layer, and this
    layer routes the next one before its experts run, so a prefetch overlaps them), then
    dispatches with `dispatch` ("grouped" or the "reference")."""
    b, t, d = x.shape
    tokens = x.reshape(b * t, d)
    keep_flat = torch.ones(b * t, dtype=torch.bool, device=x.device) if keep is None else keep.reshape(-1)
    if relay is None:
        plan, aux_loss, z_loss, stats = router(tokens, keep_flat)
    else:
        plan, aux_loss, z_loss, stats = relay.take(relay_index, router, tokens, keep_flat)
        relay.route_ahead(relay_index, tokens, keep_flat)
    y = DISPATCH[dispatch](router, experts, tokens, plan)
    return y.view(b, t, d), (aux_loss, z_loss), stats


class MoEFFN(nn.Module):
    """MoE FFN sub-layer: `gate` (Router) and `experts` (an ExpertGroup of the local experts:
    stacked, or one module per expert with `expert_storage="per_expert"`).

    With ep_size > 1 this rank holds experts [ep_rank*L, (ep_rank+1)*L) of the E experts. Expert g
    is initialised from a generator seeded by (init_seed, g), so every layout (any ep_size) starts
    from the same global weights."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int = 1, dropout: float = 0.0,
                 activation: str = "relu", capacity_factor: float = 1.25, eval_capacity_factor: float = 0.0,
                 min_capacity: int = 4, use_rts: bool = True, ep_size: int = 1, ep_rank: int = 0,
                 init_seed: Optional[int] = None, kept_experts: Optional[Sequence[int]] = None,
                 dispatch: str = "grouped", expert_storage: str = "stacked"):
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch={dispatch!r}: expected one of {DISPATCHES}")
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.dispatch = dispatch
        self.gate = Router(d_model, num_experts, top_k, capacity_factor, eval_capacity_factor,
                           min_capacity, use_rts, kept_experts)
        local = self.gate.num_experts // ep_size
        generators = None if init_seed is None else [
            torch.Generator().manual_seed(init_seed * 1000 + ep_rank * local + i) for i in range(local)]
        with torch.random.fork_rng(devices=[]):  # the global RNG stream must not depend on ep_size
            self.experts: ExpertGroup = EXPERT_STORAGES[expert_storage](local, d_model, d_ff, dropout, activation,
                                                                        generators)

        self.relay: Optional[RoutingRelay] = None  # set by Seq2Seq when moe.pregate is on
        self.relay_index = 0

    def replace_router(self, router: Router) -> Router:
        """Puts `router` in the place of this layer's gate, also in the pre-gating relay (which runs a
        layer's router one layer early, from its own list) -> the router it replaced."""
        old, self.gate = self.gate, router
        if self.relay is not None:
            self.relay.routers[self.relay_index] = router
        return old

    @property
    def global_expert_ids(self) -> range:
        local = len(self.experts)
        return range(self.ep_rank * local, (self.ep_rank + 1) * local)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None):
        return moe_forward(self.gate, self.experts, x, keep, self.relay, self.relay_index, self.dispatch)
