"""DeepSpeed's C++ ops as mtmoe builds them: without debug info, the CPU probed once per process,
torch's header precompiled for an op of many sources.

DeepSpeed JIT-compiles its ops on first use into TORCH_EXTENSIONS_DIR (on a CPU-only machine:
cpu_adam for optimizer offload, async_io + pin_memory for NVMe offload). One op it would load that
mtmoe never calls is not built at all (`UNUSED_OPS`: shm_comm). Three things cost every cold start
and nothing for what the op does:
- its CPU builders compile with `-g`: debug info for every torch header a source includes. Measured
  on this project's 2-core box, that is ~40 % of the compiler's time (cpu_adam.cpp at -O3: 78 s ->
  47 s of CPU; an async_io source at -O0: 62 s -> 37 s), ~5 of the ~16 CPU-minutes of a cold build
  of all four ops. Optimisation levels and every other flag stay DeepSpeed's.
- each builder's `cpu_arch()` / `simd_width()` calls py-cpuinfo's `get_cpu_info()`, which starts a
  Python subprocess (~0.9 s of CPU) on every call: several times per rank and start.
- every C++ source of an op is compiled on its own, and each that includes torch/extension.h
  parses it again: async_io's 12 sources spend most of their ~7 CPU-minutes there. For an op of
  `PCH_MIN_SOURCES` or more sources, torch/extension.h is precompiled once, with the op's own
  compile flags, into the op's build folder (`pch/`), and forced first into each of its sources
  (`-include`), so GCC loads the parsed header instead of parsing it again. A header GCC finds
  unusable (other flags) is parsed as before: the objects compute the same either way. The
  precompiled header (~0.8 GB for torch's) is deleted once the op is built; it is made again only
  when the op's compile flags change.

`use_mtmoe_build()` changes all three for the process (idempotent); `skip_unused_ops()` (called by
`init_distributed` before the process group starts) keeps the unused ops out. Every mtmoe process that loads an
op calls it first (`init_distributed` does, and the pre-build below), and so must any other
process that shares the build folder: ninja rebuilds an op whose compile command changed, so a
process with DeepSpeed's own flags rebuilds it with `-g` (and the next mtmoe process back again).
scripts/env.sh gives each clone its own build folder, which only mtmoe uses.

`python -m mtmoe.train.ds_ops` builds, ahead of a run, the ops this machine can build (what
scripts/test.sh starts in the background while the first tests run)."""

from __future__ import annotations

import functools
import inspect
import logging
import shlex
import subprocess
from pathlib import Path

from deepspeed.accelerator import get_accelerator
from deepspeed.ops.op_builder.builder import OpBuilder

log = logging.getLogger("mtmoe")

DEBUG_INFO_FLAGS = frozenset({"-g"})
PRECOMPILED: list[Path] = []
"""Precompiled headers this process made for the op build under way (deleted when it is loaded)."""
PCH_MIN_SOURCES = 3
"""Ops with at least this many C++ sources get a precompiled torch/extension.h (async_io has 12;
shm_comm and cpu_adam have 2, where the header's own compile would cost what it saves)."""
PREBUILT_OPS = ("CPUAdamBuilder", "AsyncIOBuilder")
"""The accelerator's builders of the ops a CPU run loads (async_io loads pin_memory itself)."""
UNUSED_OPS = ("ShareMemCommBuilder",)
"""Ops DeepSpeed would load by itself that mtmoe never calls, marked incompatible so they are not
built. shm_comm: DeepSpeed's torch comm backend builds and initialises it (with a /dev/shm
workspace) when the process group starts on a CPU, for `inference_all_reduce`, which only its
tensor-parallel inference layers call; training's all-reduces and the MoE all-to-all go through
torch.distributed (gloo). Its cold build cost ~1 CPU-minute on every fresh clone, before the
first training step (the main job's start-up included)."""


def without_debug_info(flags: list[str]) -> list[str]:
    return [f for f in flags if f not in DEBUG_INFO_FLAGS]


def use_mtmoe_build() -> None:
    """Makes this process build DeepSpeed's ops without debug info, with torch's header precompiled
    for an op of many sources, and probe the CPU once."""
    _use_precompiled_torch_header()
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
            while PRECOMPILED:  # needed by this build only: the objects are compiled
                PRECOMPILED.pop().unlink(missing_ok=True)

    jit_load.mtmoe_build = True
    OpBuilder.jit_load = jit_load
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then falls back to lscpu by itself
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


def skip_unused_ops(names=UNUSED_OPS) -> None:
    """Marks the ops of `names` incompatible in DeepSpeed's table of ops (`deepspeed.ops.__compatible_ops__`,
    which it consults before building an op it loads by itself), so they are neither built nor loaded.

    The table is built on its first read by probing every op builder of the accelerator (on CUDA ~25
    of them, some running the compiler), so it is read only when this accelerator has one of the
    ops: CUDA's has no shm_comm, and DeepSpeed's CUDA comm backend never reads the table."""
    builders = [b for b in map(get_accelerator().create_op_builder, names) if b is not None]
    if not builders:
        return
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    for builder in builders:
        compatible[builder.NAME] = False


def _use_precompiled_torch_header() -> None:
    """Wraps torch's ninja-file writer (called under the op's build lock, with the complete compile
    flags) so that an op of `PCH_MIN_SOURCES` C++ sources or more is compiled with a precompiled
    torch/extension.h. Where torch's writer does not look as expected, nothing changes."""
    from torch.utils import cpp_extension

    write_ninja_file = getattr(cpp_extension, "_write_ninja_file", None)
    if write_ninja_file is None or getattr(write_ninja_file, "mtmoe_pch", False):
        return
    signature = inspect.signature(write_ninja_file)
    if not {"path", "cflags", "sources", "with_cuda", "library_target"} <= set(signature.parameters):
        return

    @functools.wraps(write_ninja_file)
    def with_pch(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        cxx_sources = [s for s in a["sources"] if str(s).endswith((".cpp", ".cc", ".cxx"))]
        if len(cxx_sources) >= PCH_MIN_SOURCES and a["cflags"] and not a["with_cuda"]:
            build_dir = Path(a["path"]).parent
            header = precompile_torch_header(build_dir, list(a["cflags"]), (build_dir / a["library_target"]).is_file())
            if header is not None:
                a["cflags"] = [*a["cflags"], f"-include {shlex.quote(str(header))}"]
        return write_ninja_file(*bound.args, **bound.kwargs)

    with_pch.mtmoe_pch = True
    cpp_extension._write_ninja_file = with_pch


def precompile_torch_header(build_dir: Path, cflags: list[str], built: bool = False) -> Path | None:
    """`build_dir/pch/torch_extension.h` (one line: #include <torch/extension.h>) with its GCC
    precompiled form `.h.gch` beside it, compiled with `cflags` (torch's quoted compile flags of
    the op) -> the header to force-include. Not compiled again when the last one was made by the
    same command and is still there, or the op was `built` with it (its objects are up to date, or
    ninja recompiles a changed source by parsing the header). None when the compiler is not GCC or
    the precompile fails (the op is then built as before)."""
    from torch.utils.cpp_extension import check_compiler_is_gcc, get_cxx_compiler

    compiler = get_cxx_compiler()
    folder = build_dir / "pch"
    header, pch, signature = folder / "torch_extension.h", folder / "torch_extension.h.gch", folder / "command"
    command = [compiler, "-x", "c++-header", *shlex.split(" ".join(cflags)), str(header), "-o", str(pch)]
    if signature.is_file() and signature.read_text() == shlex.join(command) and (pch.is_file() or built):
        return header  # every later load of a built op ends here, without asking the compiler anything
    try:
        if not check_compiler_is_gcc(compiler):
            return None
    except Exception:  # noqa: BLE001 - a compiler torch cannot identify: build as before
        return None
    folder.mkdir(parents=True, exist_ok=True)
    header.write_text("#include <torch/extension.h>\n")
    signature.unlink(missing_ok=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("precompiling torch/extension.h for %s failed; building without it: %s", build_dir.name,
                    done.stderr.strip()[-500:])
        pch.unlink(missing_ok=True)
        return None
    signature.write_text(shlex.join(command))
    PRECOMPILED.append(pch)
    return header


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
    import resource
    import time

    started = time.monotonic()
    names = prebuild()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the compilers ninja ran
    print(f"built: {', '.join(names)} in {time.monotonic() - started:.0f} s "
          f"(compilers: {children.ru_utime + children.ru_stime:.0f} CPU-s)")
