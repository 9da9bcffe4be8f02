"""Writing initial weights into parameters that a sharding wrapper may already have partitioned.

Under DeepSpeed's `zero.Init` (ZeRO-3 training, `parallel=zero3_nvme`) every sub-module's parameters
are partitioned across ranks, and possibly swapped to NVMe, as soon as that sub-module's
`__init__` returns; a parent's init code then sees empty tensors, and `normal_` or `copy_` on them
silently does nothing. The model's init code therefore writes such parameters inside `writable`,
which runs the gatherer the trainer installed with `set_gather` (for ZeRO-3: gather the
partitioned parameters for the block and scatter rank 0's values back; every rank runs the same
seeded init, so any rank would do). Without one it does nothing, and the model stays plain torch.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

from torch import nn

Gather = Callable[[list], ContextManager]
_gather: Optional[Gather] = None


def set_gather(gather: Optional[Gather]) -> None:
    """Installs (None: removes) the context manager factory `writable` runs over its parameters."""
    global _gather
    _gather = gather


@contextlib.contextmanager
def writable(*params: nn.Parameter):
    if _gather is None:
        yield
    else:
        with _gather(list(params)):
            yield
