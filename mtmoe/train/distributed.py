"""Process-group set-up: under the `deepspeed` launcher, or as a world of one without it."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket

import torch
import torch.distributed as dist

log = logging.getLogger("mtmoe")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialises torch.distributed through DeepSpeed for ranks computing on `device` (the
    trainer's one device decision, `mtmoe.device.training_device`) and returns (rank, world_size):
    NCCL and DeepSpeed's CUDA accelerator for a GPU, gloo and its CPU accelerator for the CPU (also
    on a GPU machine with `train.device=cpu`).

    Without a launcher (plain `mtmoe-train`) the environment of a world of one is filled in, so
    DeepSpeed neither needs mpi4py nor tries MPI discovery. DeepSpeed's ops are built (or, like
    the shm_comm op its CPU comm backend would load here, not built) as `mtmoe.train.ds_ops` says."""
    use_accelerator(device)
    import deepspeed

    from mtmoe.train.ds_ops import skip_unused_ops, use_mtmoe_build

    use_mtmoe_build()

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with quiet_op_loading():
            skip_unused_ops()  # before the comm backend would build shm_comm (DeepSpeed probes its ops here)
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       auto_mpi_discovery=False)
    start_host_group()
    return dist.get_rank(), dist.get_world_size()


_HOST_GROUP = None
"""The gloo group of all ranks for host values when the default group is NCCL (None otherwise)."""


def start_host_group(separate: bool = False) -> None:
    """Every rank joins a gloo group beside an NCCL default group, once, at start-up (creating a
    group is itself a collective: every rank calls this at the same point). The values the ranks
    agree on each step (the clock of a time budget, the token count of the global batch) are host
    numbers: through NCCL each would be copied to the GPU, reduced behind the step's queued work and
    read back, a host-device sync per step; gloo reduces them between the hosts while the GPU runs on.

    `separate`: a group of its own also beside a gloo default group, i.e. the GPU machines'
    arrangement on CPU ranks (tests/step_probe.py uses it to check which collectives take which group)."""
    global _HOST_GROUP
    if _HOST_GROUP is None and dist.get_world_size() > 1 and (separate or dist.get_backend() != "gloo"):
        _HOST_GROUP = dist.new_group(backend="gloo")


def host_group():
    """The process group for collectives of host values: gloo, the default group on CPU ranks."""
    return _HOST_GROUP


def use_accelerator(device: torch.device) -> None:
    """Makes DeepSpeed's accelerator the one of `device`'s type before DeepSpeed first asks for it
    (DeepSpeed picks CUDA whenever it is there, and caches its pick); a process that already
    runs on another accelerator switches."""
    os.environ["DS_ACCELERATOR"] = device.type
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != device.type:
        if device.type == "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        set_accelerator(Accelerator())


@contextlib.contextmanager
def quiet_op_loading():
    """Keeps DeepSpeed's op loading out of the console and the run's train.log.

    On every start DeepSpeed checks which ops can be built (compiling and linking a test program:
    `gcc ... test.c -laio`, echoed at INFO by setuptools' compiler loggers) and prints
    "DeepSpeed ... built successfully" when it loads its CPU communication op. The compiler loggers
    are set to WARNING (their warnings and errors still show); what DeepSpeed prints meanwhile goes
    to the `mtmoe` log at DEBUG when it reports success, at INFO otherwise. A failed build raises as
    before."""
    for name in ("compilers", "distutils", "setuptools"):
        logging.getLogger(name).setLevel(logging.WARNING)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        for line in printed.getvalue().splitlines():
            if line.strip():
                log.log(logging.DEBUG if "built successfully" in line else logging.INFO, "%s", line)


def several_ranks() -> bool:
    """A process group of more than one rank: the collectives below are no-ops otherwise."""
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if several_ranks():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """The ranks' host `values` summed element-wise, on every rank, through the host group: no
    device is involved (a world of one returns them as they are)."""
    if not several_ranks():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=host_group())
    return t.tolist()


def all_reduce_max(value: float) -> float:
    """The largest of the ranks' host `value`s, on every rank (a clock all ranks must read alike),
    through the host group."""
    if not several_ranks():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return t.item()


def any_rank(flag: bool) -> bool:
    """True on every rank when host `flag` is true on at least one (e.g. the time budget ran out),
    through the host group."""
    if not several_ranks():
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return bool(t.item())


def any_rank_on_device(flag: torch.Tensor) -> torch.Tensor:
    """`flag` (a bool tensor on the device of the default group's collectives) OR-ed over the
    ranks, on the device: the reduction is queued behind the work that computes `flag` and
    nothing waits for it on the host (a world of one returns `flag`)."""
    if not several_ranks():
        return flag
    t = flag.to(torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.bool()


def is_first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_object(obj):
    """`obj` as rank 0 has it, on every rank (decisions that all ranks must share)."""
    if not several_ranks():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
