"""DeepSpeed's ops as mtmoe builds them (mtmoe.train.ds_ops): DeepSpeed's flags minus debug info,
the CPU probed once."""

from __future__ import annotations

import cpuinfo
import pytest
import torch.utils.cpp_extension
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.op_builder.builder import OpBuilder

from mtmoe.train.ds_ops import skip_unused_ops, use_mtmoe_build


def test_ops_build_with_deepspeeds_flags_minus_debug_info(monkeypatch):
    builds = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: builds.append(kw) or object())
    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})
    use_mtmoe_build()
    use_mtmoe_build()  # idempotent: one wrapper
    assert getattr(OpBuilder.jit_load, "__wrapped__").__name__ == "jit_load"
    assert not hasattr(OpBuilder.jit_load.__wrapped__, "__wrapped__")
    for name in ("CPUAdamBuilder", "AsyncIOBuilder"):
        builder = get_accelerator().create_op_builder(name)
        deepspeed_flags = builder.cxx_args()
        assert "-g" in deepspeed_flags  # what DeepSpeed asks for (if it stops, ds_ops has nothing to do)
        builder.jit_load(verbose=False)
        flags = builds[-1]["extra_cflags"]
        assert "-g" not in flags
        assert flags[:len(deepspeed_flags) - 1] == [f for f in deepspeed_flags if f != "-g"]
        assert builder.cxx_args() == deepspeed_flags  # the builder itself is left as DeepSpeed made it
    assert len(builds) == 2


def test_cpu_probed_once_per_process():
    use_mtmoe_build()
    assert cpuinfo.get_cpu_info() is cpuinfo.get_cpu_info()


def test_ops_of_many_sources_get_torchs_header_precompiled(monkeypatch, tmp_path):
    """torch's ninja-file writer, wrapped: an op of PCH_MIN_SOURCES C++ sources or more is compiled with
    the precompiled torch/extension.h forced first (`-include`); a smaller op, or a precompile that
    failed, is compiled as before. The header is precompiled with the op's own flags."""
    from mtmoe.train import ds_ops

    written, precompiled = [], []

    def write_ninja_file(path, cflags, post_cflags, cuda_cflags, cuda_post_cflags, cuda_dlink_post_cflags,
                         sycl_cflags, sycl_post_cflags, sycl_dlink_post_cflags, sources, objects, ldflags,
                         library_target, with_cuda, with_sycl):  # torch's signature
        written.append(cflags)

    monkeypatch.setattr(torch.utils.cpp_extension, "_write_ninja_file", write_ninja_file)
    header = tmp_path / "pch" / "torch_extension.h"
    monkeypatch.setattr(ds_ops, "precompile_torch_header",
                        lambda build_dir, cflags, built: precompiled.append((build_dir, cflags)) or header)
    ds_ops.use_mtmoe_build()  # wraps the writer it finds (the jit_load wrapper exists already)
    assert torch.utils.cpp_extension._write_ninja_file.__wrapped__ is write_ninja_file

    def write(n_sources):
        torch.utils.cpp_extension._write_ninja_file(
            path=str(tmp_path / "op" / "build.ninja"), cflags=["-DTORCH_EXTENSION_NAME=op", "-O0"], post_cflags=None,
            cuda_cflags=None, cuda_post_cflags=None, cuda_dlink_post_cflags=None, sycl_cflags=None,
            sycl_post_cflags=[], sycl_dlink_post_cflags=None, sources=[f"s{i}.cpp" for i in range(n_sources)],
            objects=[f"s{i}.o" for i in range(n_sources)], ldflags=[], library_target="op.so", with_cuda=False,
            with_sycl=False)
        return written[-1]

    assert write(ds_ops.PCH_MIN_SOURCES) == ["-DTORCH_EXTENSION_NAME=op", "-O0", f"-include {header}"]
    assert precompiled == [(tmp_path / "op", ["-DTORCH_EXTENSION_NAME=op", "-O0"])]
    assert write(ds_ops.PCH_MIN_SOURCES - 1) == ["-DTORCH_EXTENSION_NAME=op", "-O0"] and len(precompiled) == 1
    monkeypatch.setattr(ds_ops, "precompile_torch_header", lambda build_dir, cflags, built: None)  # failed
    assert write(ds_ops.PCH_MIN_SOURCES) == ["-DTORCH_EXTENSION_NAME=op", "-O0"]


def test_the_shm_comm_op_is_neither_built_nor_loaded(monkeypatch):
    """DeepSpeed's CPU comm backend loads shm_comm when the process group starts, for tensor-parallel
    inference only; mtmoe marks it incompatible (ds_ops.UNUSED_OPS), so DeepSpeed's own loader
    returns None without building it."""
    import importlib

    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm's `torch` is torch)
    builds = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: builds.append(kw) or object())
    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})
    skip_unused_ops()
    assert ds_comm_torch.build_shm_op() is None and builds == []


def test_the_table_of_ops_is_not_probed_where_no_unused_op_exists(monkeypatch):
    """On CUDA, DeepSpeed's accelerator has no shm_comm builder; reading `__compatible_ops__` there
    would probe every CUDA op builder (compiler runs) at each start for nothing."""
    import deepspeed.ops

    from mtmoe.train import ds_ops

    class NoSuchOps:
        def create_op_builder(self, name):
            return None

    def probe():
        raise AssertionError("the table of ops was probed")

    monkeypatch.delattr(deepspeed.ops, "__compatible_ops__", raising=False)  # not read yet in this process
    monkeypatch.setattr(deepspeed.ops, "_probe_compatible_ops", probe)
    monkeypatch.setattr(ds_ops, "get_accelerator", NoSuchOps)
    skip_unused_ops()
    monkeypatch.setattr(ds_ops, "get_accelerator", get_accelerator)
    with pytest.raises(AssertionError, match="probed"):
        skip_unused_ops()  # the CPU accelerator has shm_comm: its table is read
