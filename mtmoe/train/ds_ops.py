"""DeepSpeed's C++ ops as mtmoe builds them: without debug info, the CPU probed once per process.

DeepSpeed JIT-compiles its ops on first use into TORCH_EXTENSIONS_DIR (on a CPU-only machine:
shm_comm for the collectives, cpu_adam for optimizer offload, async_io + pin_memory for NVMe
offload). Two of its choices cost every cold start and nothing for what the op does:
- its CPU builders compile with `-g`: debug info for every torch header a source includes. Measured
  on this project's 2-core box, that is ~40 % of the compiler's time (cpu_adam.cpp at -O3: 78 s ->
  47 s of CPU; an async_io source at -O0: 62 s -> 37 s), ~5 of the ~16 CPU-minutes of a cold build
  of all four ops. Optimisation levels and every other flag stay DeepSpeed's.
- each builder's `cpu_arch()` / `simd_width()` calls py-cpuinfo's `get_cpu_info()`, which starts a
  Python subprocess (~0.9 s of CPU) on every call: several times per rank and start.

`use_mtmoe_build()` changes both for the process (idempotent). Every mtmoe process that loads an
op calls it first (`init_distributed` does, and the pre-build below), and so must any other
process that shares the build folder: ninja rebuilds an op whose compile command changed, so a
process with DeepSpeed's own flags rebuilds it with `-g` (and the next mtmoe process back again).
scripts/env.sh gives each clone its own build folder, which only mtmoe uses.

`python -m mtmoe.train.ds_ops` builds, ahead of a run, the ops this machine can build (what
scripts/test.sh starts in the background while the first tests run)."""

from __future__ import annotations

import functools

from deepspeed.accelerator import get_accelerator
from deepspeed.ops.op_builder.builder import OpBuilder

DEBUG_INFO_FLAGS = frozenset({"-g"})
PREBUILT_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder", "AsyncIOBuilder")
"""The accelerator's builders of the ops a CPU run loads (async_io loads pin_memory itself)."""


def without_debug_info(flags: list[str]) -> list[str]:
    return [f for f in flags if f not in DEBUG_INFO_FLAGS]


def use_mtmoe_build() -> None:
    """Makes this process build DeepSpeed's ops without debug info and probe the CPU once."""
    if getattr(OpBuilder.jit_load, "mtmoe_build", False):
        return
    deepspeed_jit_load = OpBuilder.jit_load

    @functools.wraps(deepspeed_jit_load)
    def jit_load(self, verbose=True):
        # An instance attribute shadows the builder class's cxx_args for this load only; the
        # class's method computes DeepSpeed's flags as before.
        self.cxx_args = lambda: without_debug_info(type(self).cxx_args(self))
        try:
            return deepspeed_jit_load(self, verbose)
        finally:
            del self.cxx_args

    jit_load.mtmoe_build = True
    OpBuilder.jit_load = jit_load
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then falls back to lscpu by itself
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


def prebuild(names=PREBUILT_OPS) -> list[str]:
    """Builds (or finds built) each op of `names` this machine can build -> the names of those loaded."""
    use_mtmoe_build()
    loaded = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible(verbose=False):
            builder.load(verbose=False)
            loaded.append(builder.name)
    return loaded


if __name__ == "__main__":
    print("built:", ", ".join(prebuild()))
