"""The DeepSpeed JSON config, generated from the Hydra config (one source of truth); the raw
`deepspeed` section of the Hydra config is merged last and may override any key."""

from __future__ import annotations

import copy
from typing import Any

from mtmoe.config import ConfigError, TrainAppConfig


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(cfg: TrainAppConfig, raw_override: dict[str, Any] | None = None) -> dict:
    """Batches are token-budget batches built by mtmoe, so DeepSpeed's micro-batch is 1 "batch";
    `train.accumulate` of them make an optimizer step. With optimizer offload DeepSpeed builds the
    optimizer (DeepSpeedCPUAdam, L2-style Adam like the in-RAM torch.optim.Adam)."""
    t = cfg.train
    raw_override = raw_override or {}
    if "gradient_accumulation_steps" in raw_override or "train_batch_size" in raw_override:
        raise ConfigError("deepspeed.gradient_accumulation_steps/train_batch_size: set train.accumulate instead "
                          "(the loss normalisation and the data stream depend on it)")
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": t.accumulate,
        "gradient_clipping": t.clip_norm,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": False},
    }
    if t.offload_optimizer == "cpu":
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        ds["optimizer"] = {"type": "Adam", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.adam_eps,
                                                      "weight_decay": t.weight_decay, "adam_w_mode": False}}
    return deep_merge(ds, raw_override)
