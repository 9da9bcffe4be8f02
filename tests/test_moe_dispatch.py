"""The grouped (permutation) dispatch against the capacity-buffer reference dispatch it replaced,
the stacked experts' state-dict grammar, and the GPU properties (no host sync, bf16 on CUDA).

Every comparison runs both dispatches on the same layer (same weights) and the same RNG state, so
Random Token Selection draws the same priorities; they must agree in outputs, gradients, losses
and telemetry. fp32, dropout 0."""

from __future__ import annotations

import copy
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mtmoe.model.experts import (BACKENDS, GroupedExperts, grouped_backend, grouped_linear, per_expert_state,
                                 segment_ids)
from mtmoe.model.moe import MoEFFN, assign_slots, plan_dispatch
from mtmoe.model.quantized import QuantLinear, QuantizedExperts
from mtmoe.model.transformer import FeedForward

D, FF, E = 16, 32, 4


def layer_pair(top_k: int, capacity_factor: float, use_rts: bool, kept=None, ep_size: int = 1, ep_rank: int = 0):
    """(grouped layer, reference layer) with identical weights."""
    torch.manual_seed(0)  # the router's init draws from torch's RNG
    grouped = MoEFFN(D, FF, E, top_k=top_k, capacity_factor=capacity_factor, min_capacity=1, use_rts=use_rts,
                     init_seed=3, kept_experts=kept, ep_size=ep_size, ep_rank=ep_rank)
    reference = copy.deepcopy(grouped)
    reference.dispatch = "reference"
    with torch.no_grad():  # a sharper router than the init: queues overflow unevenly
        grouped.gate.wg.weight.mul_(4.0)
        reference.gate.wg.weight.copy_(grouped.gate.wg.weight)
    return grouped, reference


def run(layer: MoEFFN, x: torch.Tensor, keep, grad: torch.Tensor, seed: int = 5):
    """Forward + backward of (y * grad).sum() + aux: (y, aux, stats, x.grad, {param: grad})."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y, (aux, z), stats = layer(x, keep)
    ((y * grad).sum() + aux + z).backward()
    return y.detach(), aux.detach(), stats, x.grad, {n: p.grad for n, p in layer.named_parameters()}


def assert_same(a, b, atol=1e-6):
    """Outputs to `atol`; parameter gradients to 1e-5 (a bias gradient sums its expert's rows in
    another order: index-add here, a column sum in the reference's F.linear, ~2e-6 apart)."""
    y1, aux1, s1, gx1, g1 = a
    y2, aux2, s2, gx2, g2 = b
    torch.testing.assert_close(y1, y2, atol=atol, rtol=0)
    torch.testing.assert_close(aux1, aux2)
    torch.testing.assert_close(gx1, gx2, atol=atol, rtol=0)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-5, msg=name)
    for key in s1:
        torch.testing.assert_close(s1[key].float(), s2[key].float(), msg=key)


CASES = {  # name: (capacity_factor, use_rts, padded, kept experts per layer)
    "capacity_rts": (0.6, True, False, None),
    "position_rule": (0.6, False, False, None),
    "dropless": (0.0, True, False, None),
    "padding": (0.6, True, True, None),
    "pruned": (0.8, True, True, [0, 2, 3]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_dispatch_equals_reference(case, top_k, backend):
    if backend == "grouped_mm" and grouped_backend(torch.zeros(1)) != "grouped_mm":
        pytest.skip("no grouped GEMM for fp32 on this CPU build")
    capacity_factor, use_rts, padded, kept = CASES[case]
    grouped, reference = layer_pair(top_k, capacity_factor, use_rts, kept)
    grouped.experts.backend = backend
    torch.manual_seed(0)
    x = torch.randn(3, 11, D)
    keep = (torch.rand(3, 11) > 0.3) if padded else None
    grad = torch.randn(3, 11, D)
    for train in (True, False):
        grouped.train(train)
        reference.train(train)
        a, b = run(grouped, x, keep, grad), run(reference, x, keep, grad)
        assert_same(a, b)
        dropped = float(a[2]["dropped"])
        assert (dropped > 0) == (train and capacity_factor > 0), dropped  # the cases really drop (or not)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("use_rts", [True, False])
def test_queue_slots_equal_the_one_hot_reference(top_k, use_rts):
    torch.manual_seed(1)
    n = 40
    expert = torch.stack([torch.randperm(E)[:top_k] for _ in range(n)])
    valid = (torch.rand(n) > 0.25)[:, None].expand(n, top_k)
    priority = torch.rand(n) if use_rts else None
    capacity = torch.tensor(6)
    slot, kept, dest, counts = plan_dispatch(expert, valid, E, capacity, priority)
    reference = assign_slots(expert, valid, E, priority)
    assert torch.equal(slot[valid], reference[valid])
    assert torch.equal(kept, valid & (reference < 6))
    # dest: a permutation of the assignments; kept rows first, by expert, in queue order
    assert torch.equal(dest.sort().values, torch.arange(n * top_k))
    m = int(counts.sum())
    assert m == int(kept.sum()) and torch.equal(counts, torch.bincount(expert[kept], minlength=E))
    rows = torch.empty(n * top_k, dtype=torch.long)
    rows[dest] = torch.arange(n * top_k)
    order = [(int(expert.view(-1)[a]), int(slot.view(-1)[a])) for a in rows[:m]]
    assert order == sorted(order)
    assert not kept.view(-1)[rows[m:]].any()


def test_grouped_gemm_kernel_equals_per_expert_matmuls():
    """torch._grouped_mm with the segment bias equals one F.linear per expert where this build has
    it; rows past the segments get no bias and send no gradient to the bias."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(13, D)
    g = torch.randn(13, FF)
    g[10:] = 0  # padding rows: the caller never uses them
    results = {}
    for backend in ("loop", "grouped_mm"):
        w = torch.randn(E, FF, D, generator=torch.Generator().manual_seed(1)).requires_grad_()
        b = torch.randn(E, FF, generator=torch.Generator().manual_seed(2)).requires_grad_()
        xi = x.clone().requires_grad_()
        try:
            if backend == "grouped_mm":
                y = grouped_linear(xi, w, b, counts, segment_ids(counts, 13))
            else:
                y = torch.cat([torch.nn.functional.linear(part, w[e], b[e])
                               for e, part in enumerate(xi[:10].split(counts.tolist()))] + [xi.new_zeros(3, FF)])
        except RuntimeError as e:  # a CPU build without the kernel for this dtype
            pytest.skip(f"torch._grouped_mm unavailable here: {e}")
        (y * g).sum().backward()
        results[backend] = (y[:10].detach(), w.grad, b.grad, xi.grad[:10])
    for got, want in zip(results["grouped_mm"], results["loop"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_gemm_flops_are_counted_as_the_per_expert_matmuls():
    """scripts/step_profile.py teaches FlopCounterMode torch._grouped_mm (counted as 0 by torch):
    forward + backward of the grouped experts count what one matmul per expert counts, padding
    rows past the segments left out."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    from torch.utils.flop_counter import FlopCounterMode

    from helpers import ROOT
    sys.path.insert(0, str(ROOT / "scripts"))
    from step_profile import count_grouped_mm

    count_grouped_mm()
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(13, D, requires_grad=True)
    w, b = torch.randn(E, FF, D, requires_grad=True), torch.randn(E, FF, requires_grad=True)
    flops = {}
    for backend in ("loop", "grouped_mm"):
        with FlopCounterMode(display=False) as counter:
            try:
                if backend == "grouped_mm":
                    y = grouped_linear(x, w, b, counts, segment_ids(counts, 13))[:10]
                else:
                    y = torch.cat([torch.nn.functional.linear(part, w[e], b[e])
                                   for e, part in enumerate(x[:10].split(counts.tolist()))])
            except RuntimeError as e:  # a CPU build without the kernel for this dtype
                pytest.skip(f"torch._grouped_mm unavailable here: {e}")
            y.sum().backward()
        flops[backend] = counter.get_total_flops()
    assert flops["grouped_mm"] == flops["loop"] == 3 * 2 * 10 * D * FF  # forward, input and weight gradients



    """State dict: one entry set per expert (`<i>.fc1.weight`, ...), the names FeedForward experts
    had, so exports and checkpoints written before stacking load; stacked names (a partitioned
    engine's placeholders) load too."""
    torch.manual_seed(0)
    old = nn.ModuleList(FeedForward(D, FF) for _ in range(E))  # how experts were stored before
    group = GroupedExperts(E, D, FF)
    assert list(group.state_dict()) == list(old.state_dict())
    group.load_state_dict(old.state_dict())
    x = torch.randn(9, D)
    for i in range(E):
        torch.testing.assert_close(group.forward_expert(i, x), old[i](x))
    stacked = {f"experts.{k}": v for k, v in
               {"w1": group.w1, "b1": group.b1, "w2": group.w2, "b2": group.b2}.items()}
    converted = per_expert_state(stacked)
    assert converted.keys() == {f"experts.{k}" for k in old.state_dict()}
    fresh = GroupedExperts(E, D, FF)
    missing, unexpected = fresh.load_state_dict({k[len("experts."):]: v for k, v in stacked.items()})
    assert not missing and not unexpected and torch.equal(fresh.w2, group.w2)
    with pytest.raises(RuntimeError, match="size mismatch for 0.fc1.weight"):
        GroupedExperts(E, D, FF + 1).load_state_dict(old.state_dict())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*3\.fc2\.bias"):
        GroupedExperts(E, D, FF).load_state_dict({k: v for k, v in old.state_dict().items() if k != "3.fc2.bias"})


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_group_equals_per_expert_quant_linears(bits):
    """QuantizedExperts computes what a FeedForward with QuantLinear fc1/fc2 computes per expert
    (the layout of int8/int4 exports), with the same state-dict names."""
    torch.manual_seed(0)
    group = GroupedExperts(E, D, FF + 1)  # odd widths exercise int4 packing
    quantized = QuantizedExperts.from_float(group, bits)
    experts = []
    for i in range(E):
        expert = FeedForward(D, FF + 1)
        expert.load_state_dict({k[2:]: v for k, v in group.state_dict().items() if k.startswith(f"{i}.")})
        expert.fc1, expert.fc2 = QuantLinear.from_linear(expert.fc1, bits), QuantLinear.from_linear(expert.fc2, bits)
        experts.append(expert)
    assert list(quantized.state_dict()) == list(nn.ModuleList(experts).state_dict())
    counts = torch.tensor([2, 4, 0, 3])
    x = torch.randn(9, D)
    y = quantized(x, counts)
    start = 0
    for i, n in enumerate(counts.tolist()):
        torch.testing.assert_close(y[start:start + n], experts[i](x[start:start + n]))
        start += n
    reloaded = QuantizedExperts(E, D, FF + 1, bits)
    reloaded.load_state_dict(nn.ModuleList(experts).state_dict())
    torch.testing.assert_close(reloaded(x, counts), y)


# -- expert parallelism over 2 CPU ranks ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES_EP = ((1, 0.6, False), (2, 0.0, True), (2, 0.8, True))  # top_k, capacity factor, padded


def _ep_layer(top_k: int, capacity_factor: float, **kw) -> MoEFFN:
    torch.manual_seed(0)  # the router's init draws from torch's RNG (experts from their own seeds)
    return MoEFFN(D, FF, E, top_k=top_k, capacity_factor=capacity_factor, min_capacity=1, use_rts=True,
                  init_seed=3, **kw)


def _ep_inputs(rank: int, padded: bool):
    torch.manual_seed(100 + rank)  # each rank its own tokens, and its own count
    n = 13 + 4 * rank
    x, grad = torch.randn(1, n, D), torch.randn(1, n, D)
    return x, ((torch.rand(1, n) > 0.3) if padded else None), grad


def _expert_parallel_worker(rank: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = []
        for top_k, capacity_factor, padded in CASES_EP:
            x, keep, grad = _ep_inputs(rank, padded)
            got = {}
            for dispatch in ("grouped", "reference"):
                layer = _ep_layer(top_k, capacity_factor, ep_size=2, ep_rank=rank, dispatch=dispatch)
                layer.gate.ep_group = dist.group.WORLD
                y, _, _, gx, grads = run(layer.train(), x, keep, grad, seed=7 + rank)
                got[dispatch] = (y, gx, grads)
            out.append(got)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_expert_parallel_grouped_equals_reference_and_world_of_one(tmp_path):
    """ep_size 2 over 2 gloo ranks (uneven token counts, padding, capacity and dropless): each rank's
    output and input gradient equal the reference dispatch's and those of the whole layer run in one
    process on that rank's tokens (with the group's capacity); each rank's expert gradients are its
    two experts' rows of the world-of-one gradients summed over both ranks' tokens."""
    mp.spawn(_expert_parallel_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for case, (top_k, capacity_factor, padded) in enumerate(CASES_EP):
        inputs = [_ep_inputs(rank, padded) for rank in (0, 1)]
        group_real = max(x.shape[1] if keep is None else int(keep.sum()) for x, keep, _ in inputs)
        summed = None
        for rank, (x, keep, grad) in enumerate(inputs):
            got = ranks[rank][case]
            whole = _ep_layer(top_k, capacity_factor).train()
            whole.gate.group_max = lambda value: torch.tensor(group_real)  # capacity as the group decides it
            y, _, _, gx, grads = run(whole, x, keep, grad, seed=7 + rank)
            for dispatch in ("grouped", "reference"):
                torch.testing.assert_close(got[dispatch][0], y, atol=1e-6, rtol=0)
                torch.testing.assert_close(got[dispatch][1], gx, atol=1e-6, rtol=0)
            summed = grads if summed is None else {k: summed[k] + v for k, v in grads.items()}
        for rank in (0, 1):
            for dispatch in ("grouped", "reference"):
                grads = ranks[rank][case][dispatch][2]
                for name in ("w1", "b1", "w2", "b2"):
                    torch.testing.assert_close(grads[f"experts.{name}"],
                                               summed[f"experts.{name}"][2 * rank:2 * rank + 2], atol=1e-5, rtol=0)


# -- on a GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_step_has_no_host_sync_and_bf16_grouped_equals_reference():
    """On CUDA: a forward + backward of the MoE layer under bf16 autocast runs with
    torch.cuda.set_sync_debug_mode("error") (no host-device sync), and the grouped GEMM path equals
    the reference dispatch within bf16 tolerance (outputs atol 2e-2, relative grad error < 2e-2)."""
    device = torch.device("cuda")
    grouped, reference = layer_pair(2, 1.25, True)
    grouped, reference = grouped.to(device).train(), reference.to(device).train()
    x = torch.randn(4, 64, D, device=device)
    keep = torch.rand(4, 64, device=device) > 0.2
    grad = torch.randn(4, 64, D, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        run(grouped, x, keep, grad)  # warm-up (lazy init, autotuning)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            a = run(grouped, x, keep, grad)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        b = run(reference, x, keep, grad)
    torch.testing.assert_close(a[0].float(), b[0].float(), atol=2e-2, rtol=2e-2)
    for name in a[4]:
        err = (a[4][name] - b[4][name]).norm() / b[4][name].norm().clamp_min(1e-6)
        assert err < 2e-2, (name, float(err))


def test_per_expert_storage_is_the_same_layer():
    """moe.expert_storage=per_expert (one module per expert, for ZeRO-3 offload): the same initial
    weights, state dict and outputs as the stacked experts."""
    stacked, _ = layer_pair(2, 0.6, True)
    torch.manual_seed(0)
    separate = MoEFFN(D, FF, E, top_k=2, capacity_factor=0.6, min_capacity=1, init_seed=3, expert_storage="per_expert")
    separate.load_state_dict(stacked.state_dict())  # only the router's sharpening differs
    fresh = MoEFFN(D, FF, E, init_seed=3, expert_storage="per_expert").experts.state_dict()
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in stacked.experts.state_dict().items()}
    assert all(torch.equal(fresh[k], v) for k, v in MoEFFN(D, FF, E, init_seed=3).experts.state_dict().items())
    x, grad = torch.randn(2, 9, D), torch.randn(2, 9, D)
    a, b = run(stacked.train(), x, None, grad), run(separate.train(), x, None, grad)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[3], b[3], atol=1e-6, rtol=0)
    for i in range(E):
        torch.testing.assert_close(a[4]["experts.w1"][i], b[4][f"experts.{i}.fc1.weight"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("storage", ["stacked", "per_expert"])
def test_reshard_regroups_expert_adam_state(storage):
    """ZeRO-0 optimizer files of ep ranks -> files for another ep_size: each expert's moments land
    on the rank and position that hold that expert (both expert storages)."""
    from mtmoe.formats.reshard import reshard_optimizer_states

    layers, shapes = 2, [(FF, D), (FF,), (D, FF), (D,)]

    def files(ep: int) -> list[dict]:
        local, out = E // ep, []
        for rank in range(ep):
            state, ids = {}, []
            for layer in range(layers):
                if storage == "stacked":
                    tensors = [torch.stack([torch.full(sh, 10.0 * layer + rank * local + j) for j in range(local)])
                               for sh in shapes]
                else:
                    tensors = [torch.full(sh, 10.0 * layer + rank * local + j) for j in range(local) for sh in shapes]
                for t in tensors:
                    state[len(ids) + 1] = {"step": torch.tensor(3.0), "exp_avg": t, "exp_avg_sq": t * 2}
                    ids.append(len(ids) + 1)
            state[0] = {"step": torch.tensor(3.0), "exp_avg": torch.ones(5), "exp_avg_sq": torch.ones(5)}
            groups = [{"params": [0], "lr": 0.1}, {"params": ids, "lr": 0.1, "moe": True, "name": f"ep_size_{ep}"}]
            out.append({"optimizer": {"state": state, "param_groups": groups}, "other": rank})
        return out

    for new_ep in (1, 4):
        result = reshard_optimizer_states(files(2), E, layers, new_ep, storage)
        assert len(result) == new_ep
        local = E // new_ep
        for rank, f in enumerate(result):
            group = f["optimizer"]["param_groups"][1]
            assert group["name"] == f"ep_size_{new_ep}" and f["other"] == 0
            values = [f["optimizer"]["state"][pid]["exp_avg"] for pid in group["params"]]
            expected = [10.0 * layer + rank * local + j for layer in range(layers) for j in range(local)]
            if storage == "stacked":
                got = [float(v[j].flatten()[0]) for v in values[::4] for j in range(local)]
                assert all(v.shape[0] == local for v in values)
            else:
                got = [float(v.flatten()[0]) for v in values[::4]]
            assert got == expected
            assert torch.equal(f["optimizer"]["state"][0]["exp_avg"], torch.ones(5))


def test_which_layout_changes_reshard():
    """`check_resumable`: what is rewritten on the way in, and what is refused with the reason."""
    from mtmoe.formats.reshard import ReshardError, check_resumable

    def layout(world, ep, zero, storage="stacked"):
        return {"world_size": world, "ep_size": ep, "zero_stage": zero, "accumulate": 1, "expert_storage": storage}

    here = Path("step00000003")
    assert check_resumable(layout(2, 2, 0), layout(1, 1, 0), here)        # ZeRO-0: expert moments regrouped
    assert not check_resumable(layout(1, 1, 0), layout(2, 1, 0), here)    # ZeRO-0, world only: loads as it is
    assert check_resumable(layout(2, 2, 2), layout(1, 1, 2), here)        # ZeRO-1/2: partitions cut anew
    assert check_resumable(layout(2, 1, 1), layout(4, 1, 1), here)
    assert not check_resumable(layout(2, 2, 2), layout(2, 2, 2), here)
    assert not check_resumable(layout(2, 2, 2), layout(2, 2, 1), here)   # ZeRO-2 -> 1: the same files
    assert check_resumable(layout(2, 2, 1), layout(1, 1, 2), here)
    assert check_resumable(layout(2, 2, 2), layout(2, 2, 0), here)      # ZeRO-2 -> 0: converted
    assert check_resumable(layout(1, 1, 0), layout(1, 1, 1), here)      # ZeRO-0 -> 1, same ranks: converted
    assert check_resumable(layout(1, 1, 0, None), layout(2, 1, 2, None), here)  # no MoE layers
    assert check_resumable(layout(2, 1, 2, None), layout(4, 1, 2, None), here)
    assert check_resumable(layout(2, 2, 0, "per_expert"), layout(1, 1, 0, "per_expert"), here)
    offload = {"offload_optimizer": "cpu"}
    assert check_resumable({**layout(2, 2, 2), "offload_optimizer": "none"}, {**layout(2, 2, 2), **offload}, here)
    assert check_resumable({**layout(2, 2, 1), **offload}, {**layout(2, 2, 2), "offload_optimizer": "none"}, here)
    assert not check_resumable({**layout(2, 2, 2), **offload}, {**layout(2, 2, 1), **offload}, here)
    assert not check_resumable(layout(2, 2, 2), {**layout(2, 2, 2), **offload}, here)  # not recorded: as it is
    assert check_resumable(layout(2, 2, 2), {**layout(1, 1, 0), "zero_round_robin": True}, here)  # unused at ZeRO-0
    # ZeRO-3: the world size, or the Adam (offloaded to the CPU or NVMe: DeepSpeed's CPU Adam)
    assert check_resumable(layout(2, 1, 3), layout(1, 1, 3), here)
    assert not check_resumable(layout(2, 1, 3), layout(2, 1, 3), here)
    assert check_resumable({**layout(2, 1, 3), "offload_optimizer": "nvme"}, {**layout(2, 1, 3), "offload_optimizer": "none"}, here)
    assert not check_resumable({**layout(2, 1, 3), "offload_optimizer": "nvme"}, {**layout(2, 1, 3), **offload}, here)
    refused = {"to_zero3": (layout(2, 2, 2), layout(2, 1, 3), "written with train.zero_stage=2"),
               "from_zero3": (layout(1, 1, 3), layout(1, 1, 0), "written with train.zero_stage=3"),
               "per_expert": (layout(2, 2, 2, "per_expert"), layout(1, 1, 2, "per_expert"), "stored per expert"),
               "per_expert_stage": (layout(1, 1, 0, "per_expert"), layout(1, 1, 2, "per_expert"), "stored per expert"),
               "round_robin": (layout(2, 2, 2), {**layout(1, 1, 2), "zero_round_robin": True}, "round_robin"),
               "round_robin_stage": (layout(2, 2, 0), {**layout(2, 2, 2), "zero_round_robin": True}, "round_robin"),
               "alignment": (layout(2, 2, 2), {**layout(1, 1, 2), "zero_parameter_alignment": True},
                             "parameter_alignment")}
    for saved, current, reason in refused.values():
        with pytest.raises(ReshardError, match=reason):
            check_resumable(saved, current, here)


def test_zero3_slices_are_cut_anew_for_another_world_and_sub_groups(tmp_path):
    """ZeRO-3 optimizer state written for 3 ranks in 2 sub-groups, joined, and written for 2 ranks in
    3 sub-groups (what another world size or sub_group_size gives) holds the same weights and Adam
    moments per parameter: read back by the join, and, for the weights, by the export's own ZeRO-3
    reader (`zero3_state_dict`, DeepSpeed's zero_to_fp32 rule), from files on disk."""
    from mtmoe.formats.ds_checkpoint import zero3_model_file, zero3_state_dict, zero_optimizer_file
    from mtmoe.formats.optimizer_state import JoinedGroup, OptimizerLayout, join_zero3, write_zero3

    torch.manual_seed(0)
    shapes = {"a.weight": (5, 7), "a.bias": (5,), "b.weight": (3, 1), "c.weight": (11,), "d.bias": (1,)}
    params = {n: {"fp32": torch.randn(sh), "exp_avg": torch.randn(sh), "exp_avg_sq": torch.rand(sh)}
              for n, sh in shapes.items()}
    joined = [JoinedGroup({"lr": 0.1, "name": "parameters"}, {"step": torch.tensor(4.0)}, params)]

    def target(cuts: list[list[str]]) -> OptimizerLayout:
        return OptimizerLayout(shapes=[], experts=[False], settings=[{"lr": 0.5, "name": "parameters"}],
                               sub_groups=[(0, {n: shapes[n] for n in cut}) for cut in cuts])

    names = list(shapes)
    three, three_shapes = write_zero3(joined, 3, target([names[:2], names[2:]]), {"overflow": False}, {})
    assert [len(f["optimizer_state_dict"]["fp32_flat_groups"]) for f in three] == [2, 2, 2]
    assert three[2]["optimizer_state_dict"]["fp32_flat_groups"][0].numel() == 12 + 2  # ceil(35/3) + ceil(5/3)
    again = join_zero3([f["optimizer_state_dict"] for f in three], three_shapes)
    two, two_shapes = write_zero3(again, 2, target([names[:1], names[1:4], names[4:]]), {"overflow": False}, {})
    back = join_zero3([f["optimizer_state_dict"] for f in two], two_shapes)
    assert float(back[0].scalars["step"]) == 4.0 and back[0].settings["lr"] == 0.1
    for name, p in params.items():
        for key, value in p.items():
            assert torch.equal(back[0].params[name][key], value), (name, key)
    for rank, f in enumerate(two):
        torch.save(f, zero_optimizer_file(tmp_path, rank))
        torch.save({"param_shapes": two_shapes, "module": {}, "buffer_names": []}, zero3_model_file(tmp_path, rank))
    on_disk = zero3_state_dict(tmp_path)
    assert all(torch.equal(on_disk[n], p["fp32"]) for n, p in params.items())


def test_lr_schedule_follows_the_optimizer_groups():
    """A big model's experts fill as many optimizer groups as its ep_size needs (DeepSpeed caps one at
    179 M elements per rank): a conversion that changes their number gives torch's lr scheduler
    per-group lists of the new length (it zips them with the groups), dense first, experts after."""
    from mtmoe.formats.optimizer_state import ReshardError, follow_groups

    assert follow_groups([0.1, 0.2], [False, True], [False, True, True, True]) == [0.1, 0.2, 0.2, 0.2]
    assert follow_groups([0.1, 0.2, 0.2, 0.2], [False, True, True, True], [False, True]) == [0.1, 0.2]
    assert follow_groups([0.1, 0.3], [False, False], [False, False]) == [0.1, 0.3]
    with pytest.raises(ReshardError):
        follow_groups([0.1], [False], [False, True])
