"""Writing initial weights into parameters that DeepSpeed ZeRO-3 may already have partitioned.

Under `deepspeed.zero.Init` (ZeRO-3 training, `parallel=zero3_nvme`) every sub-module's parameters
are partitioned across ranks, and possibly swapped to NVMe, as soon as that sub-module's
`__init__` returns; a parent's init code then sees empty tensors, and `normal_` or `copy_` on them
silently does nothing. `writable` gathers such parameters for the duration of the block and
scatters rank 0's values back (every rank runs the same seeded init, so any rank would do).
Outside ZeRO-3 it does nothing, and the model code stays free of DeepSpeed imports.
"""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def writable(*params: nn.Parameter):
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0):
            yield
    else:
        yield
