"""The device decision, owned here: which device an app computes on, whether bf16 runs there, and
on which device a process group's collectives take their tensors.

Every app asks once (`resolve_device` for eval/translate/export, `training_device` for a training
rank) before it writes anything, and everything after follows the answer: the model is moved
there, batches are copied there (`mtmoe.data.batching.DeviceFeed`), autocast uses its type.
`device=` values: `auto` (the GPU when CUDA is there, else the CPU), `cpu`, `cuda`, `cuda:N`.
Deciding on a GPU also decides its attention kernels (`choose_attention_kernels`).
Above config (whose `check_device_spec` checks a `device=` value's syntax without importing torch,
so the tools refuse a bad config before loading torch), below data, so every later layer may use it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from mtmoe.config import check_device_spec
from mtmoe.errors import ConfigError


def resolve_device(spec: str, field: str = "device") -> torch.device:
    """The device `spec` names on this machine; ConfigError naming `field` when it has no CUDA or no
    GPU of that index."""
    check_device_spec(field, spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{field}={spec}: this machine has no CUDA device (torch {torch.__version__}, "
                          f"CUDA build: {torch.version.cuda or 'no'}); use {field}=cpu or auto")
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{field}={spec}: there is no such GPU (this machine has {count}: cuda:0"
                          f"{f'..cuda:{count - 1}' if count > 1 else ''})")
    device = torch.device("cuda", index)
    choose_attention_kernels(device)
    return device


KEEP_CUDNN_ATTENTION = "MTMOE_CUDNN_ATTENTION"
"""Environment variable: `1` leaves torch's own choice of attention kernels (cuDNN's first where
torch prefers it), e.g. to measure what `choose_attention_kernels` saves."""


def choose_attention_kernels(device: torch.device) -> None:
    """On a GPU, takes cuDNN's fused attention out of `scaled_dot_product_attention`'s backends,
    for the whole process (nothing on a CPU, or with MTMOE_CUDNN_ATTENTION=1).

    Why: recent torch builds (cuDNN >= 9.9) try cuDNN's attention first on sm90/sm100 GPUs (H100,
    H200, B200) for bf16/fp16 inputs, and cuDNN builds an execution plan for every problem shape it
    has not seen (batch, heads, query and key lengths): tens to hundreds of milliseconds of host
    time each, forward and backward apart. mtmoe's shapes rarely repeat: token-budget batches vary
    in batch size, source length and target length together, and incremental decoding grows the key
    length every step. The memory-efficient kernel (flash attention where there is no mask) takes
    the same inputs, padding masks included, with no per-shape set-up; fp32 never reached cuDNN."""
    if device.type == "cuda" and os.environ.get(KEEP_CUDNN_ATTENTION, "") != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)


def training_device(spec: str, local_rank: int, field: str = "train.device") -> torch.device:
    """A training rank's device: `cuda:<LOCAL_RANK>` on a GPU machine (the launcher starts one rank
    per GPU of each node, so the local rank, not the global one, picks the GPU), the CPU otherwise
    or with `cpu`. `cuda:N` is refused: under a launcher the rank's GPU is not the user's choice."""
    check_device_spec(field, spec)
    if ":" in spec:
        raise ConfigError(f"{field}={spec}: a training rank uses the GPU of its LOCAL_RANK; "
                          f"use {field}=cuda (or auto), and CUDA_VISIBLE_DEVICES to pick GPUs")
    device = resolve_device(spec, field)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"{field}={spec}: local rank {local_rank} has no GPU of its own (this node has {count}); "
                          f"launch at most {count} ranks per node")
    return torch.device("cuda", local_rank)


def rank_threads(requested: int, device: torch.device) -> int:
    """torch threads of a training rank: `requested` (train.threads) when given, else on a CPU rank 1
    (ranks x 1 thread is the fast layout of a small CPU box: 2 ranks on its 2 cores), on a GPU rank the
    cores this process may run on shared among the node's ranks (LOCAL_WORLD_SIZE, set by the
    launchers). Why more than 1 there: the GPU does the model's compute, and what stays on the
    host is DeepSpeed's CPU Adam under optimizer offload, an OpenMP loop over every parameter that
    runs on the threads torch is set to: one thread would leave it one core of a GPU node's dozens."""
    if requested > 0:
        return requested
    if device.type != "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 compute runs natively on `device` (CUDA: compute capability >= 8.0)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return True  # on a CPU torch always runs bf16 (fast only with avx512_bf16 / AMX)


def resolve_bf16(requested: Optional[bool], device: torch.device, field: str = "train.bf16") -> bool:
    """bf16 autocast or not: `requested` when given (true on a GPU without bf16 is refused, naming
    the field and the GPU), else (None, `auto`) on a GPU with bf16 and off on a CPU, where fp32 is the
    fast path unless the CPU has avx512_bf16."""
    if requested is None:
        return device.type == "cuda" and bf16_supported(device)
    if requested and device.type == "cuda" and not bf16_supported(device):
        raise ConfigError(f"{field}=true: {torch.cuda.get_device_name(device)} has no bf16 "
                          f"(compute capability < 8.0); use {field}=false")
    return bool(requested)


def cap_memory(device: torch.device, gib: float, field: str = "train.gpu_memory_gib") -> None:
    """Caps what the caching allocator may hold on `device` at `gib` GiB (nothing when `gib` is 0):
    `torch.cuda.set_per_process_memory_fraction`, so an allocation beyond it raises CUDA's
    out-of-memory error as on a GPU of that size. Called before anything is put on the GPU.
    ConfigError naming `field` on a CPU device or for more than the GPU has."""
    if gib <= 0:
        return
    if device.type != "cuda":
        raise ConfigError(f"{field}={gib}: caps a GPU's memory, and this rank computes on the {device.type} "
                          f"(train.device); leave {field}=0")
    total = torch.cuda.get_device_properties(device).total_memory
    if gib * 2**30 > total:
        raise ConfigError(f"{field}={gib}: more than {torch.cuda.get_device_name(device)} has "
                          f"({total / 2**30:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, device)


def peak_memory_gib(device: torch.device) -> Optional[float]:
    """The most GPU memory the caching allocator held on `device` in this process, in GiB (what
    `cap_memory` caps: tensors plus the allocator's cached blocks, not the CUDA context); None on a
    CPU, whose memory the allocator does not account."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / 2**30


def free_memory_bytes(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: the GPU's free memory (`cudaMemGetInfo`) plus
    what torch's caching allocator holds unused (after training steps, most of what it reserved),
    under any `cap_memory` cap; or the host's available memory (MemAvailable: free plus reclaimable
    caches; free pages where /proc/meminfo is missing)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction_cap = torch.cuda.get_per_process_memory_fraction(device) if hasattr(
            torch.cuda, "get_per_process_memory_fraction") else 1.0
        allocated = torch.cuda.memory_allocated(device)
        cached = torch.cuda.memory_reserved(device) - allocated
        return int(min(free + cached, fraction_cap * total - allocated))
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def collective_device(group=None) -> torch.device:
    """Where the tensors of `group`'s collectives must live: the current GPU under NCCL (which takes
    CUDA tensors only), the CPU under gloo (or with no process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

