"""Checkpoint averaging (`mtmoe-export average=N`): the element-wise mean of the weights of a run's
newest N checkpoints, exported as one model.

Averaging the last checkpoints of a run (Vaswani et al. 2017; fairseq's average_checkpoints.py)
smooths out the noise of the last updates; `train.snapshots` saves the checkpoints to average,
evenly spaced over the end of the budget. Floating-point tensors are summed in float64 and cast back;
any other tensor (an integer buffer) must be equal in every checkpoint.
"""

from __future__ import annotations

from typing import Iterable

import torch

from mtmoe.errors import ExportError


def average_state_dicts(states: Iterable[tuple[str, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Mean of the (name, state dict) `states` (read one at a time: only the running sum and the
    state dict being added are held). Every state dict must have the same keys and shapes."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    first_name, count = None, 0
    for name, state in states:
        if first_name is None:
            first_name = name
            dtypes = {k: v.dtype for k, v in state.items()}
            total = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}
        else:
            if state.keys() != total.keys():
                diff = sorted(state.keys() ^ total.keys())
                raise ExportError(f"cannot average {name} with {first_name}: their tensors differ ({len(diff)} "
                                  f"names, e.g. {diff[0]})")
            for k, v in state.items():
                if v.shape != total[k].shape:
                    raise ExportError(f"cannot average {name} with {first_name}: {k} has shape {list(v.shape)} "
                                      f"there and {list(total[k].shape)} here")
                if v.is_floating_point():
                    total[k] += v.double()
                elif not torch.equal(v, total[k]):
                    raise ExportError(f"cannot average {name} with {first_name}: {k} (not floating point) differs")
        count += 1
    if count == 0:
        raise ExportError("nothing to average")
    return {k: (v / count).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()}
