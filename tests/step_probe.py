"""Runs the trainer's real step (`Trainer.train_step`) on a tiny model, with the losses of chosen
micro-batches made NaN, and writes what each step did to JSON: whether it changed the weights and
the optimizer state, the guard's verdict, and how often mtmoe's own code read a tensor's value on
the host during the step (each such read is a host-device sync on a GPU).

    python tests/step_probe.py --out OUT --steps 4 --bad 2:0 -- model=tiny data.corpus_dir=...
    deepspeed --no_local_rank --num_gpus 2 tests/step_probe.py --out OUT --bad 2:0:1 -- parallel=ed ...

`--bad STEP:MICRO[:RANK]`: micro-batch MICRO of step STEP (0-based) on RANK (default: every rank).
`--clip-check`: also compares mtmoe's clipping with DeepSpeed's `clip_grad_norm_` on one batch.
`--forbid-syncs-from N` (on a GPU): steps N and later run under `torch.cuda.set_sync_debug_mode("error")`,
so any host-device sync in the step (mtmoe's, DeepSpeed's or torch's) raises.
Besides mtmoe's own host reads, each step lists every op in it, mtmoe's, DeepSpeed's or torch's, that
waits for the device on a GPU (`DeviceWaits`): the CPU's view of what `set_sync_debug_mode` catches there.
`--separate-host-group` (several ranks): host values go through a gloo group of their own, as beside
an NCCL default group on GPUs; each step's collectives are then listed with the group they took.
tests/test_update.py runs it, one process (or launch) per layout: DeepSpeed keeps per-process state.
Writes OUT.rank<R>.json on each rank.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import mtmoe
from mtmoe.cli.common import compose_train_config
from mtmoe.data.batching import DeviceFeed
from mtmoe.train import distributed
from mtmoe.train import trainer as trainer_module
from mtmoe.train.trainer import Trainer
from mtmoe.train.update import global_grad_norm

HOST_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}
MTMOE_DIR = str(Path(mtmoe.__file__).resolve().parent)
THIS_FILE = __file__


def nearest_caller(accept) -> Optional[traceback.FrameSummary]:
    """The innermost frame of the calling code whose file name `accept`s, leaving out this file's
    own frames (the probe's modes and wrappers, which call through one another)."""
    return next((f for f in reversed(traceback.extract_stack()) if f.filename != THIS_FILE and accept(f.filename)),
                None)


def site(frame: Optional[traceback.FrameSummary]) -> str:
    return "?" if frame is None else f"{Path(frame.filename).name}:{frame.name}"


class HostReads(TorchFunctionMode):
    """Counts the reads of tensor values whose nearest caller outside torch is mtmoe's code."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            caller = nearest_caller(lambda name: "/torch/" not in name)
            if caller is not None and str(Path(caller.filename).resolve()).startswith(MTMOE_DIR):
                self.sites.append(site(caller))
        return func(*args, **(kwargs or {}))


aten = torch.ops.aten
READ_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
"""Ops whose result is a host value read from a tensor (`item`, `bool`, `torch.equal`)."""
SHAPE_OPS = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
             aten.unique_consecutive.default, aten.bincount.default, aten.repeat_interleave.Tensor}
"""Ops whose output shape depends on tensor values: on a GPU the host waits for the values to
allocate the output (`repeat_interleave` only without `output_size`)."""
HOST_DATA_OPS = {aten.lift_fresh.default}
"""A tensor made from host data (`torch.tensor(...)`, `t[i] = n`): on a GPU its values are then copied
from pageable host memory to the device, a copy the host waits for (the guard's tally once did this).
Except in `HOST_SIDE`, where the tensor stays on the host."""
HOST_SIDE = {"distributed.py:all_reduce_sum", "distributed.py:all_reduce_max", "distributed.py:any_rank"}
"""mtmoe's host-group helpers: host numbers summed over the ranks in CPU tensors (through a gloo group
beside NCCL on GPUs), which never reach the device."""
BOOL_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
"""Indexing ops, which wait only when an index is a boolean mask (turned into positions: `nonzero`)."""


class DeviceWaits(TorchDispatchMode):
    """Lists the ops that make the host wait for a GPU, whoever calls them (mtmoe, DeepSpeed, torch),
    as `op@file:function` of the nearest caller outside torch. On the CPU nothing waits, but the same
    ops run: this is the CPU's view of what `torch.cuda.set_sync_debug_mode("error")` catches on a
    GPU, except copies between host and device, which a CPU run has none of: `tolist`, `numpy` and
    `cpu` of a CPU tensor pass no op, so those reads are not listed here (`HostReads` counts them in
    mtmoe's code: expert parallelism's split sizes, the host group's sums)."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in BOOL_INDEX_OPS:
            waits = any(i is not None and i.dtype == torch.bool for i in args[1])
        else:
            waits = (func in READ_OPS or func in HOST_DATA_OPS
                     or (func in SHAPE_OPS and kwargs.get("output_size") is None))
        if waits:
            where = site(nearest_caller(lambda name: "/torch/" not in name))
            if not (func in HOST_DATA_OPS and where in HOST_SIDE):
                self.sites.append(f"{func.overloadpacket.__name__}@{where}")
        return func(*args, **kwargs)


COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_to_all_single", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "broadcast")


class Collectives:
    """Lists the collectives called while it is on: (the group, `host` for `distributed.host_group()`
    or `other`, and the nearest caller in mtmoe or DeepSpeed, `file:function`). torch.distributed's
    functions are looked up at each call (`dist.all_reduce`, DeepSpeed's comm backend), so they are
    replaced on the module for the while. The group is read from the `group=` keyword (how mtmoe and
    DeepSpeed's comm backend pass it); ZeRO's `all_gather_into_tensor`/`reduce_scatter_tensor`, which
    DeepSpeed binds once at start-up, are not seen (the test that uses this runs without ZeRO)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def __enter__(self):
        self.real = {name: getattr(dist, name) for name in COLLECTIVES}
        for name, real in self.real.items():
            setattr(dist, name, self._recording(real))
        return self

    def __exit__(self, *exc):
        for name, real in self.real.items():
            setattr(dist, name, real)

    def _recording(self, real):
        def call(*args, **kwargs):
            group = kwargs.get("group")
            kind = "host" if group is not None and group is distributed.host_group() else "other"
            caller = nearest_caller(lambda name: "/mtmoe/" in name or "/deepspeed/" in name
                                    and "/deepspeed/comm/" not in name)
            self.calls.append((kind, site(caller)))
            return real(*args, **kwargs)
        return call


def snapshot(trainer: Trainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Copies of (the weights, the optimizer state tensors DeepSpeed's optimizer steps). Under ZeRO-3
    a parameter is an empty placeholder: its weights are this rank's partition (`ds_tensor`)."""
    weights = [getattr(p, "ds_tensor", p).detach().clone() for p in trainer.model.parameters()]
    optimizer = trainer.engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the optimizer that holds the state
    state = [v.detach().clone() for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    return weights, state


def changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return len(before) != len(after) or any(not torch.equal(a, b) for a, b in zip(before, after))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--bad", action="append", default=[])
    ap.add_argument("--clip-check", action="store_true")
    ap.add_argument("--forbid-syncs-from", type=int, default=None)
    ap.add_argument("--separate-host-group", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = compose_train_config([*args.overrides, "train.max_minutes=0", "train.max_steps=1000", "train.save_every=0",
                                "train.valid_every=0", "train.progress=false", "wandb.mode=disabled"])
    trainer = Trainer(cfg, Path(tempfile.mkdtemp()) / "run")
    if args.separate_host_group:
        distributed.start_host_group(separate=True)
        assert distributed.host_group() is not None
    plan = [tuple(int(x) for x in b.split(":")) for b in args.bad]
    at = {"step": 0, "micro": 0}
    real_loss = trainer_module.compute_loss

    def compute_loss(*a, **k):
        total, *rest = real_loss(*a, **k)
        if any(p[:2] == (at["step"], at["micro"]) and (len(p) == 2 or p[2] == trainer.rank) for p in plan):
            total = total * float("nan")
        at["micro"] += 1
        return (total, *rest)

    trainer_module.compute_loss = compute_loss
    feed = DeviceFeed(trainer.stream, trainer.device)
    trainer.engine.train()
    steps = []
    for step in range(args.steps):
        at.update(step=step, micro=0)
        weights, state = snapshot(trainer)
        batches = [next(feed) for _ in range(cfg.train.accumulate)]
        strict = args.forbid_syncs_from is not None and step >= args.forbid_syncs_from
        with HostReads() as reads, Collectives() as collectives, DeviceWaits() as waits:
            if strict:
                torch.cuda.set_sync_debug_mode("error")
            try:
                sums = trainer.train_step(batches)
            finally:
                if strict:
                    torch.cuda.set_sync_debug_mode("default")
        trainer.step += 1
        with HostReads() as settle_reads:
            withheld = trainer.guard.settle(trainer.step, None)
        after_weights, after_state = snapshot(trainer)
        steps.append({"step": step, "withheld": withheld, "weights_changed": changed(weights, after_weights),
                      "state_changed": changed(state, after_state), "step_host_reads": reads.sites,
                      "device_waits": sorted(set(waits.sites)),
                      "settle_host_reads": len(settle_reads.sites), "loss_sum": float(sums["loss"]),
                      "syncs_forbidden": strict, "collectives": sorted(set(collectives.calls)),
                      "grad_norm": None if trainer.update.grad_norm is None else float(trainer.update.grad_norm)})
    result = {"rank": trainer.rank, "world": trainer.world, "device": str(trainer.device), "steps": steps,
              "skipped": trainer.guard.skipped,
              "optimizer": type(trainer.engine.optimizer).__name__}
    if args.clip_check:
        result["clip"] = clip_check(trainer, next(feed), max_norm=0.05)
    Path(f"{args.out}.rank{trainer.rank}.json").write_text(json.dumps(result, indent=1))


def clip_check(trainer: Trainer, batch, max_norm: float) -> dict:
    """One batch's gradients (reduced: a step's last micro-batch) clipped by mtmoe and, on copies of
    them, by DeepSpeed's reference `clip_grad_norm_` -> the norms (also one summed entry by entry in
    a plain loop, experts' squares over the expert-parallel group) and the largest difference.
    Without ZeRO only (under ZeRO DeepSpeed clips its gradient partitions)."""
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.utils import clip_grad_norm_

    total, *_ = trainer_module.compute_loss(trainer.engine, batch, trainer.cfg, 1.0 / batch.num_target_tokens,
                                            trainer.bf16)
    trainer.engine.backward(total)
    params = [p for p in trainer.model.parameters() if p.grad is not None]
    expert_group = trainer.layout.expert_group()
    mtmoe_norm = global_grad_norm(params, expert_group)
    squares = {kind: sum(float(p.grad.double().square().sum()) for p in params if is_moe_param(p) == kind)
               for kind in (False, True)}
    experts = torch.tensor(squares[True], dtype=torch.float64)
    if expert_group is not None:
        dist.all_reduce(experts, group=expert_group)
    reference_norm = (squares[False] + float(experts)) ** 0.5
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(reference, params):
        r.grad = p.grad.detach().clone()
        if hasattr(p, "allreduce"):
            r.allreduce = p.allreduce
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, mtmoe_norm)
    ds_norm = clip_grad_norm_(reference, max_norm)
    return {"mtmoe_norm": float(mtmoe_norm), "reference_norm": reference_norm, "deepspeed_norm": float(ds_norm),
            "experts": sum(is_moe_param(p) for p in params),
            "max_grad_difference": max(float((p.grad - r.grad).abs().max()) for p, r in zip(params, reference)),
            "max_grad": max(float(p.grad.abs().max()) for p in params)}


if __name__ == "__main__":
    main()
