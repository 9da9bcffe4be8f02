"""The DeepSpeed JSON config, generated from the Hydra config (one source of truth); the raw
`deepspeed` section of the Hydra config is merged last and may override any key."""

from __future__ import annotations

import copy
from typing import Any

from mtmoe.config import TrainAppConfig


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(cfg: TrainAppConfig, raw_override: dict[str, Any] | None = None) -> dict:
    """Batches are token-budget batches built by mtmoe, one per rank per step, so DeepSpeed's
    micro-batch size is 1 "batch" and there is no gradient accumulation by default."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.clip_norm,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": False},
    }
    return deep_merge(ds, raw_override or {})
