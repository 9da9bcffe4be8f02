"""DeepSpeed's ops as mtmoe builds them (mtmoe.train.ds_ops): DeepSpeed's flags minus debug info,
the CPU probed once."""

from __future__ import annotations

import cpuinfo
import torch.utils.cpp_extension
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.op_builder.builder import OpBuilder

from mtmoe.train.ds_ops import use_mtmoe_build


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
