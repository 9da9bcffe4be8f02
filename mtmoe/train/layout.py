"""The parallel layout of a training rank, owned in one place: its device, its precision, and which
of DeepSpeed's two MoE set-ups it runs.

- Native expert parallelism (`train.zero_stage` 0-2): the model is built whole on every rank
  (its local experts only), the MoE layers are put in DeepSpeed's MoE container
  (`mtmoe.train.deepspeed_moe`) so DeepSpeed builds the expert-parallel groups, reduces expert
  gradients over their expert-data-parallel group and checkpoints experts per file.
- Partitioned (`train.zero_stage=3`): the model is built inside `deepspeed.zero.Init`, every
  parameter (experts included) partitioned over all ranks and possibly offloaded to CPU or NVMe; the
  MoE layers stay plain (DeepSpeed's MoE container refuses ZeRO-3), every forward gathers
  collectively; validation runs on a gathered whole copy where it fits (`validation_model`).

`TrainingLayout.build_model` and `.initialize` are the whole way from config to a DeepSpeed
engine: the trainer and `bench/vs_hf/training.py` both take it, so what is benchmarked is what trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mtmoe.config import TrainAppConfig, validate
from mtmoe.device import cap_memory, free_memory_bytes, rank_threads, resolve_bf16, training_device
from mtmoe.model.partitioned import set_gather
from mtmoe.model.seq2seq import Seq2Seq, build_model
from mtmoe.train.distributed import broadcast_object, init_distributed
from mtmoe.train.ds_config import build_deepspeed_config

log = logging.getLogger("mtmoe")


def build_optimizer(model: torch.nn.Module, cfg: TrainAppConfig, ds_config: dict):
    """Optimizer param groups with experts split out (DeepSpeed's MoE helper); torch's fused Adam
    (one kernel per step on a GPU, and it withholds a step on the device given `found_inf`:
    `mtmoe.train.update`) unless the DeepSpeed config names its own optimizer (e.g. CPU-Adam for
    offload)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": params, "name": "parameters", "weight_decay": cfg.train.weight_decay})
    if "optimizer" in ds_config:
        return None, groups
    optimizer = torch.optim.Adam(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.adam_eps,
                                 weight_decay=cfg.train.weight_decay, fused=True)
    return optimizer, groups


def gather_partitioned(params: list):
    """`mtmoe.model.partitioned`'s gatherer under ZeRO-3: the parameters `zero.Init` partitioned
    (they carry DeepSpeed's `ds_id`) are gathered for the block, rank 0's values scattered back."""
    import deepspeed

    partitioned = [p for p in params if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0) if partitioned else contextlib.nullcontext()


class TrainingLayout:
    """One rank's device, precision, process group and DeepSpeed set-up for `cfg`.

    Built first thing in a training process: it decides the device (`mtmoe.device.training_device`,
    from LOCAL_RANK), starts the process group on it (NCCL for a GPU, gloo for the CPU), validates
    `cfg` against the world size and writes the DeepSpeed config."""

    def __init__(self, cfg: TrainAppConfig, swap_dir: Optional[Path] = None):
        self.cfg = cfg
        self.device = training_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.bf16 = resolve_bf16(cfg.train.bf16, self.device)
        self.threads = rank_threads(cfg.train.threads, self.device)
        cap_memory(self.device, cfg.train.gpu_memory_gib)
        self.rank, self.world = init_distributed(self.device)
        validate(cfg, self.world)
        self.partitioned = cfg.train.zero_stage == 3
        self._told_validation: Optional[bool] = None  # the choice `_validates_whole` logged last
        self.swap_dir = run_swap_dir(cfg.train.nvme_path, swap_dir)
        self.ds_config = build_deepspeed_config(cfg, cfg.deepspeed, nvme_path=str(self.swap_dir or ""),
                                                pin_memory=self.device.type == "cuda", bf16=self.bf16)

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        kind = f"ZeRO-{self.cfg.train.zero_stage}" + (", partitioned MoE" if self.partitioned else "")
        cap = f", memory capped at {self.cfg.train.gpu_memory_gib} GiB" if self.cfg.train.gpu_memory_gib else ""
        return (f"rank {self.rank} trains on {self.device} ({name}{cap}), {'bf16 autocast' if self.bf16 else 'fp32'}, "
                f"{kind}, {self.threads} CPU thread(s)")

    # -- building ------------------------------------------------------------------------------
    def build_model(self, vocab_size: int) -> Seq2Seq:
        """The model with its seeded initial weights (this rank's experts under expert parallelism).
        Partitioned: built inside `deepspeed.zero.Init`, so each parameter is partitioned (and swapped
        to NVMe with `train.offload_param=nvme`) as soon as its module exists: no rank ever holds the
        whole model; the parameters used outside their own module's forward (the tied embedding, the
        learned positions) are registered for gathering wherever the model runs."""
        cfg = self.cfg
        ep_rank = self.rank % cfg.moe.ep_size if cfg.moe.enabled else 0
        if not self.partitioned:
            return build_model(vocab_size, cfg.model, cfg.moe, ep_rank, cfg.train.seed)
        import deepspeed

        _fixed_mmap_threshold()
        if "nvme" in (cfg.train.offload_param, cfg.train.offload_optimizer):
            self.swap_dir.mkdir(parents=True, exist_ok=True)
        set_gather(gather_partitioned)
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
            model = build_model(vocab_size, cfg.model, cfg.moe, ep_rank, cfg.train.seed)
        deepspeed.zero.register_external_parameter(model, model.embed.weight)
        deepspeed.zero.register_external_parameter(model.project, model.embed.weight)  # decoding's projection
        if cfg.model.positions == "learned":
            deepspeed.zero.register_external_parameter(model.positions, model.positions.table.weight)
        return model

    def initialize(self, model: Seq2Seq, scheduler: Optional[Callable] = None):
        """(engine, optimizer, lr scheduler) of DeepSpeed around `model` (MoE layers put in DeepSpeed's
        container first under native expert parallelism); the engine is on this layout's device.
        `scheduler(optimizer)` builds the lr scheduler DeepSpeed steps after each optimizer step."""
        import deepspeed

        if self.cfg.moe.enabled and not self.partitioned:
            from mtmoe.train.deepspeed_moe import wrap_moe_layers

            wrap_moe_layers(model)
        optimizer, groups = build_optimizer(model, self.cfg, self.ds_config)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            lr_scheduler=scheduler, config=self.ds_config)
        assert engine.device == self.device, (engine.device, self.device)
        return engine, optimizer, scheduler

    # -- running -------------------------------------------------------------------------------
    def expert_group(self):
        """The expert-parallel process group when experts are sharded over ranks, else None."""
        cfg = self.cfg
        if not cfg.moe.enabled or cfg.moe.ep_size == 1 or self.partitioned:
            return None
        from deepspeed.utils import groups

        name = f"ep_size_{cfg.moe.ep_size}"
        assert groups._get_expert_parallel_rank(name) == self.rank % cfg.moe.ep_size, \
            "DeepSpeed's expert-parallel rank differs from the one the experts were built for"
        return groups._get_expert_parallel_group(name)

    @contextlib.contextmanager
    def validation_model(self, model: Seq2Seq, vocab_size: int):
        """-> (the model validation runs, the group whose ranks run it together, or None when rank 0
        validates alone) for one validation; every rank enters (ZeRO-3's gathers are collectives).

        Native expert parallelism: the model itself, decoded by its expert-parallel group (the
        all-to-all runs there). Partitioned: with `train.valid_model` whole (or auto and room on
        rank 0's device, `_validates_whole`), a plain copy of the whole model on rank 0's device,
        gathered one parameter at a time (no rank holds more than one gathered parameter besides
        its partitions) and dropped afterwards; else the partitioned model on every rank in lock-step.
        Why the copy: the partitioned model gathers each module's parameters collectively at each of
        its forwards, and greedy decoding runs the decoder once per output token (on this CPU, world
        of one, the partitioned validation takes 3-5x as long: scripts/bench_zero3_validation.py)."""
        if not self.partitioned:
            yield model, self.expert_group()
            return
        if not self._validates_whole(model):
            yield model, (dist.group.WORLD if self.world > 1 else None)
            return
        import deepspeed

        cfg = self.cfg
        whole = None
        if self.rank == 0:
            with torch.device("meta"):  # no initialisation: every tensor is overwritten below
                whole = Seq2Seq(vocab_size, cfg.model, cfg.moe, ep_rank=0, init_seed=cfg.train.seed)
            whole = whole.to_empty(device=self.device).eval()
            targets = {**dict(whole.named_parameters()), **dict(whole.named_buffers())}
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):  # read-only: nothing is scattered back
                if whole is not None:
                    targets[name].data.copy_(param.data)
        if whole is not None:
            for name, buffer in model.named_buffers():  # not partitioned (e.g. the sinusoidal table)
                targets[name].data.copy_(buffer)
        yield whole, None  # dropped with this frame when the validation ends

    def _validates_whole(self, model: Seq2Seq) -> bool:
        """`train.valid_model` resolved, alike on every rank: `auto` is whole when rank 0's device
        has four times the fp32 weights free (the copy, and room to decode beside it)."""
        choice = self.cfg.train.valid_model
        if choice != "auto":
            return choice == "whole"
        weight_bytes = 4 * sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        free = free_memory_bytes(self.device) if self.rank == 0 else 0
        whole = broadcast_object(4 * weight_bytes <= free)
        if self.rank == 0 and self._told_validation != whole:  # the first choice, and every change
            self._told_validation = whole
            log.info("ZeRO-3 validation runs %s (train.valid_model=auto: %.2f GiB of fp32 weights, %.1f GiB free on %s)",
                     f"a whole copy of the model on {self.device}" if whole else "the partitioned model on every rank",
                     weight_bytes / 2**30, free / 2**30, self.device)
        return whole

    def checkpoint_layout(self) -> dict:
        """What a checkpoint records of the layout that wrote it (resume reshards or refuses by it,
        `mtmoe.formats.reshard.check_resumable`)."""
        cfg = self.cfg
        return {"world_size": self.world, "ep_size": cfg.moe.ep_size if cfg.moe.enabled else 1,
                "zero_stage": cfg.train.zero_stage, "accumulate": cfg.train.accumulate,
                "expert_storage": cfg.moe.expert_storage if cfg.moe.enabled else None,
                "offload_optimizer": cfg.train.offload_optimizer,
                "zero_round_robin": bool(self.ds_config.get("zero_optimization", {}).get("round_robin_gradients")),
                "zero_parameter_alignment": bool(self.ds_config.get("zero_optimization", {}).get("parameter_alignment"))}

    def close(self, is_writer: bool) -> None:
        """Removes DeepSpeed's swap files (scratch, not state): the run's own folder."""
        if is_writer and self.swap_dir is not None and self.swap_dir.is_dir():
            shutil.rmtree(self.swap_dir, ignore_errors=True)


def run_swap_dir(nvme_path: str, default: Optional[Path]) -> Optional[Path]:
    """The run's swap folder: `default` (`<run dir>/nvme_swap`), or a folder of its own under
    `train.nvme_path`, named after the run (the same for a resumed run). DeepSpeed clears
    `<path>/zero_stage_3/.../rank<N>` at start, a name the same for every run, so two runs given one
    `nvme_path` deleted each other's swapped parameters."""
    if not nvme_path:
        return default
    owner = str(default.resolve()) if default is not None else f"pid{os.getpid()}"
    return Path(nvme_path) / f"mtmoe-{hashlib.sha1(owner.encode()).hexdigest()[:12]}"


def _fixed_mmap_threshold(threshold: int = 1 << 20) -> None:
    """Makes glibc serve every allocation over 1 MiB by mmap, so freeing it returns the memory.

    ZeRO-3 with offload allocates and frees parameter- and expert-sized CPU tensors (a few MiB) all
    the time (swap in, swap out). glibc's default mmap threshold grows to 32 MiB after the first
    large free, so these then come from the heap, which does not shrink: measured on a 0.22 B-param
    model with `parallel=zero3_nvme`, resident memory halves (4.2 -> 2.1 GiB per rank) with the
    threshold fixed. Same effect as MALLOC_MMAP_THRESHOLD_=1048576 in the environment."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
