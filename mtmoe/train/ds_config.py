"""The DeepSpeed JSON config, generated from the Hydra config (one source of truth); the raw
`deepspeed` section of the Hydra config is merged last and may override any key but those mtmoe
decides itself (`OWNED_KEYS`)."""

from __future__ import annotations

import copy
from typing import Any

from mtmoe.config import TrainAppConfig
from mtmoe.errors import ConfigError


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_clips_gradients(cfg: TrainAppConfig) -> bool:
    """Whether DeepSpeed clips the gradients (its `gradient_clipping`): under ZeRO its optimizer owns
    the gradient partitions and clips them (reading the norm on the host, as it does to skip a step
    with a non-finite one). Without ZeRO mtmoe clips on the device (`mtmoe.train.update`): DeepSpeed's
    engine would build its clipping scalars from host numbers, a host-device sync twice a step."""
    return cfg.train.zero_stage > 0


OWNED_KEYS = {
    "train_batch_size": "train.accumulate", "gradient_accumulation_steps": "train.accumulate",
    "train_micro_batch_size_per_gpu": "train.max_tokens (a micro-batch is one token-budget batch)",
    "gradient_clipping": "train.clip_norm", "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer.device": "train.offload_optimizer",
    "zero_optimization.offload_param.device": "train.offload_param",
    "zero_optimization.offload_optimizer.nvme_path": "train.nvme_path",
    "zero_optimization.offload_param.nvme_path": "train.nvme_path",
    "bf16": "train.bf16", "fp16": "train.bf16 (fp16 is not supported)", "torch_autocast": "train.bf16",
    "amp": "train.bf16", "optimizer": "train.lr, train.betas, train.adam_eps, train.weight_decay",
    "scheduler": "train.warmup_steps and train.cooldown",
}
"""Raw DeepSpeed keys (dotted paths) whose value mtmoe decides from the field named: the trainer acts
on that field too (who clips, what the checkpoint records, the loss normalisation, the lr schedule),
so a raw value would contradict it, e.g. `zero_optimization.stage=2` under `train.zero_stage=0`
trained ZeRO-2 with clipping computed over no gradients and checkpoints saying ZeRO-0."""


def check_raw_override(raw: dict, prefix: str = "") -> None:
    """ConfigError naming the field to set instead, for a raw key that mtmoe decides (`OWNED_KEYS`)."""
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if path in OWNED_KEYS:
            raise ConfigError(f"deepspeed.{path}: mtmoe sets this from {OWNED_KEYS[path]}; set that instead")
        if isinstance(value, dict):
            check_raw_override(value, f"{path}.")


def build_deepspeed_config(cfg: TrainAppConfig, raw_override: dict[str, Any] | None = None,
                           nvme_path: str = "", pin_memory: bool = False, bf16: bool = False) -> dict:
    """Batches are token-budget batches built by mtmoe, so DeepSpeed's micro-batch is 1 "batch";
    `train.accumulate` of them make an optimizer step. With optimizer offload DeepSpeed builds the
    optimizer (DeepSpeedCPUAdam, L2-style Adam like the in-RAM torch.optim.Adam).

    ZeRO-3 (`parallel=zero3_nvme`): parameters and/or optimizer state offloaded to `nvme_path`
    through DeepSpeed's async_io op. Prefetch/persistence thresholds are set to 0 so that no
    parameter stays resident or is fetched early: the point of this layout is the smallest RAM.

    `pin_memory` (training on a GPU): offloaded optimizer state and parameters live in pinned host
    memory, so their copies to and from the GPU run asynchronously at full PCIe speed; on a CPU
    there is nothing to pin for.

    `bf16` (`mtmoe.device.resolve_bf16`): DeepSpeed's `torch_autocast` section, so the engine's
    forward runs under bf16 autocast. Without it the engine *disables* an autocast its caller opened
    (DeepSpeed's `autocast_if_enabled`), and bf16 silently trains in fp32. Weights, gradients and Adam
    state stay fp32 (not DeepSpeed's `bf16` section, which would make the module's weights bf16 in the
    checkpoints and the export); no module is listed as safe for bf16 gradient communication, so
    gradients are reduced in fp32 as without bf16."""
    t = cfg.train
    raw_override = raw_override or {}
    check_raw_override(raw_override)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": t.accumulate,
        "gradient_clipping": t.clip_norm if deepspeed_clips_gradients(cfg) else 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": False},
        # DeepSpeed's throughput timer synchronizes the whole device at every forward and step (its
        # default): the host could never queue a step ahead of the GPU. mtmoe times steps itself.
        "timers": {"throughput": {"enabled": False}},
    }
    if bf16:
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if t.offload_optimizer == "cpu":
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
        ds["optimizer"] = {"type": "Adam", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.adam_eps,
                                                      "weight_decay": t.weight_decay, "adam_w_mode": False}}
    if t.zero_stage == 3:
        zero = ds["zero_optimization"]
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                     "stage3_max_live_parameters": 1, "stage3_max_reuse_distance": 0,
                     "stage3_gather_16bit_weights_on_model_save": False,
                     # The optimizer steps (and swaps) one sub-group at a time, through buffers of a
                     # sub-group's size: DeepSpeed's default (1e9 elements, 4 GB per fp32 buffer)
                     # would make the swap buffers alone larger than a mid-size model.
                     "sub_group_size": 20_000_000,
                     # Gradient reduce / parameter gather buckets: DeepSpeed's 5e8-element defaults
                     # are 2 GB fp32 buffers per rank, more than the rest of an NVMe run's RAM.
                     "reduce_bucket_size": 20_000_000, "allgather_bucket_size": 20_000_000})
        for kind, device in (("offload_param", t.offload_param), ("offload_optimizer", t.offload_optimizer)):
            if device == "none":
                continue
            zero[kind] = {"device": device, "pin_memory": pin_memory}
            if device == "nvme":
                zero[kind]["nvme_path"] = nvme_path
        if t.offload_param == "nvme":
            # Each swap buffer must hold the largest single parameter (elements, fp32 here).
            zero["offload_param"].update({"buffer_count": 5, "buffer_size": t.nvme_buffer_mib * 2**20 // 4,
                                          "max_in_cpu": 0})
        if t.offload_optimizer != "none":
            ds["optimizer"] = {"type": "Adam", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.adam_eps,
                                                          "weight_decay": t.weight_decay, "adam_w_mode": False}}
        if "nvme" in (t.offload_param, t.offload_optimizer):
            ds["aio"] = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1,
                         "single_submit": False, "overlap_events": True}
    return deep_merge(ds, raw_override)
