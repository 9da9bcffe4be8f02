"""The training run: config -> data -> model in the DeepSpeed engine -> step loop -> results.

One step: every rank takes its own token-budget batch from the shared seed-determined stream,
computes label-smoothed cross-entropy plus the MoE balancing (and z-) losses, and DeepSpeed
does backward, gradient all-reduce (dense params over the data-parallel group, experts over their
expert-data-parallel group), clipping and the optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mtmoe.config import TrainAppConfig, validate
from mtmoe.data.batching import Batch, BatchStream, DeviceFeed
from mtmoe.data.prepare import TrainingData, prepare_training_data, training_mixture
from mtmoe.data.vocab import PAD_ID
from mtmoe.device import resolve_bf16, training_device
from mtmoe.formats import ds_checkpoint, run_description
from mtmoe.formats.integrity import write_atomic
from mtmoe.model.partitioned import set_gather
from mtmoe.model.seq2seq import Seq2Seq, build_model
from mtmoe.train import checkpoint
from mtmoe.train.distributed import all_reduce_max, all_reduce_sum, any_rank, barrier, init_distributed
from mtmoe.train.ds_config import build_deepspeed_config
from mtmoe.train.guard import DivergenceGuard
from mtmoe.train.observe import Progress, RunLog, plot_training_curves, summarize_routing
from mtmoe.train.validation import run_validation

log = logging.getLogger("mtmoe")


def inverse_sqrt_schedule(warmup_steps: int):
    """lr multiplier: linear warm-up to 1 at `warmup_steps`, then 1/sqrt(step/warmup)."""
    warmup = max(1, warmup_steps)

    def factor(step: int) -> float:
        step = step + 1
        return min(step / warmup, math.sqrt(warmup / step))

    return factor


def cooldown_factor(spent: float, cooldown: float) -> float:
    """lr multiplier of `train.cooldown`: 1 until the last `cooldown` fraction of the budget, then
    linearly down to 0 at `spent` = 1 (the fraction of the budget spent)."""
    if cooldown <= 0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - spent) / cooldown))


def snapshot_points(count: int, span: float) -> list[float]:
    """The fractions of the budget spent at which `train.snapshots` are saved: `count` points evenly
    spaced over the last `span` of the budget, from its start to the end of the run (1.0: the
    end-of-run save). E.g. (4, 0.3) -> [0.7, 0.8, 0.9, 1.0]; (1, span) -> [1.0]."""
    if count < 2:
        return [1.0] * count
    return [1.0 - span * j / (count - 1) for j in range(count - 1, -1, -1)]


def build_optimizer(model: torch.nn.Module, cfg: TrainAppConfig, ds_config: dict):
    """Optimizer param groups with experts split out (DeepSpeed's MoE helper); a torch Adam unless
    the DeepSpeed config names its own optimizer (e.g. CPU-Adam for offload)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": params, "name": "parameters", "weight_decay": cfg.train.weight_decay})
    if "optimizer" in ds_config:
        return None, groups
    optimizer = torch.optim.Adam(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.adam_eps,
                                 weight_decay=cfg.train.weight_decay, foreach=True)
    return optimizer, groups


def compute_loss(model, batch: Batch, cfg: TrainAppConfig, ce_scale: float, bf16: bool):
    """-> (loss for backward, summed label-smoothed CE, aux, z, routing stats).

    `ce_scale` = micro-batches in the global batch / target tokens in the global batch. DeepSpeed
    averages gradients over micro-batches (1/accumulate) and data-parallel ranks (1/world), so the
    update is that of the CE summed over the whole global batch divided by its target tokens: every
    token weighs the same whatever the layout. Aux and z losses are per-micro-batch means, averaged
    the same way. `bf16`: autocast on the batch's device (`mtmoe.device.resolve_bf16`)."""
    with torch.autocast(batch.src.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, (aux, z), stats = model(batch.src, batch.tgt_in)
    ce_sum = F.cross_entropy(logits.float().flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID,
                             label_smoothing=cfg.train.label_smoothing, reduction="sum")
    total = ce_sum * ce_scale + cfg.moe.aux_loss_weight * aux.float() + cfg.moe.z_loss_weight * z.float()
    return total, ce_sum, aux, z, stats


def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss of 0 that reaches every trainable parameter: backward of it stands in for a skipped
    micro-batch, so DeepSpeed's accumulation and gradient hooks run as usual with nothing added."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0



def gather_partitioned(params: list):
    """`mtmoe.model.partitioned`'s gatherer under ZeRO-3: the parameters `zero.Init` partitioned
    (they carry DeepSpeed's `ds_id`) are gathered for the block, rank 0's values scattered back."""
    import deepspeed

    partitioned = [p for p in params if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0) if partitioned else contextlib.nullcontext()

class Trainer:
    """Holds the engine, the data stream and the run's bookkeeping; `run()` trains to the budget."""

    def __init__(self, cfg: TrainAppConfig, run_dir: Path, on_start: Optional[Callable[[], None]] = None):
        """`on_start` is called once the run is accepted (config, data, model and resume all fine),
        just before the run dir is first written; a refusal before it leaves the run dir as it was."""
        import deepspeed

        self.cfg, self.run_dir = cfg, run_dir
        # The one device decision (before the process group, whose backend follows it).
        self.device = training_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.bf16 = resolve_bf16(cfg.train.bf16, self.device)
        self.rank, self.world = init_distributed(self.device)
        validate(cfg, self.world)
        torch.set_num_threads(max(1, cfg.train.threads))
        self.is_main = self.rank == 0
        run_dir.mkdir(parents=True, exist_ok=True)

        self.data: TrainingData = prepare_training_data(cfg.data, self.is_main, barrier)
        run_description.check_same_model(run_dir, cfg, self.data.vocab)  # before anything of the run is touched
        self.zero3 = cfg.train.zero_stage == 3
        self.swap_dir = Path(cfg.train.nvme_path) if cfg.train.nvme_path else run_dir / "nvme_swap"
        self.ds_config = build_deepspeed_config(cfg, cfg.deepspeed, nvme_path=str(self.swap_dir),
                                                pin_memory=self.device.type == "cuda", bf16=self.bf16)
        self.model: Seq2Seq = self._build_model()
        if (cfg.init.from_dense or cfg.init.aggregate or cfg.init.from_moe) and not (cfg.train.resume and ds_checkpoint.complete_tags(run_dir)):
            from mtmoe.train.init_from import initialise

            log.info("initial weights: %s", initialise(self.model, len(self.data.vocab), cfg.init, cfg.train.seed))
        if cfg.moe.enabled and not self.zero3:
            from mtmoe.train.deepspeed_moe import wrap_moe_layers

            wrap_moe_layers(self.model)
        optimizer, groups = build_optimizer(self.model, cfg, self.ds_config)

        warmup = inverse_sqrt_schedule(cfg.train.warmup_steps)
        self.spent = 0.0  # the fraction of the budget spent, as of the last budget check (all ranks alike)

        def scheduler(opt):  # DeepSpeed calls this with the optimizer it ends up using; it steps it
            return torch.optim.lr_scheduler.LambdaLR(  # after each optimizer step
                opt, lambda step: warmup(step) * cooldown_factor(self.spent, cfg.train.cooldown))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            lr_scheduler=scheduler, config=self.ds_config)
        assert self.engine.device == self.device, (self.engine.device, self.device)
        log.info("rank %d trains on %s (%s)%s", self.rank, self.device,
                 torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU",
                 ", bf16 autocast" if self.bf16 else ", fp32")
        self.ep_group = self._expert_group()
        sources, mixture = training_mixture(self.data, cfg.tasks, cfg.schedule, cfg.data.temperature)
        self.stream = BatchStream(sources, mixture.probs, {lang: self.data.vocab.tag_id(lang) for lang in cfg.data.langs},
                                  cfg.train.max_tokens, cfg.data.max_len, cfg.train.seed, self.rank, self.world,
                                  accumulate=cfg.train.accumulate)
        self.feed: Optional[DeviceFeed] = None  # the stream's batches on the device, during run()
        self.step, self.train_seconds = 0, 0.0
        self.target_tokens: Optional[int] = 0  # trained on by all ranks together; None: unknown (an older checkpoint)
        self.guard = DivergenceGuard(cfg.train.max_bad_steps)
        self.last_checkpoint: str | None = None
        state = self._resume() if cfg.train.resume else None
        self.layer_names = self.model.moe_layer_names()
        self.finished = self._finished_results() if state is not None else None
        if on_start is not None:
            on_start()
        self.runlog = None
        if self.finished is not None:
            return  # nothing to write: see run()
        if self.is_main:
            desc = run_description.describe_run(cfg, len(self.data.vocab), sources)
            if state is not None:  # what the run trained on before, plus what it trains on now
                desc["training"] = run_description.merged_training(
                    (run_description.read_description(run_dir) or {}).get("training"), desc["training"])
            run_description.write_model_description(run_dir, self.data.vocab.path, desc)
        self.runlog = RunLog(run_dir, self.is_main, cfg.wandb, _plain(cfg), state and state.get("wandb_id"),
                             resume_step=self.step if state is not None else None)

    def _build_model(self) -> Seq2Seq:
        """The model with its seeded initial weights. Under ZeRO-3 it is built inside
        `deepspeed.zero.Init`, so each parameter is partitioned (and swapped to NVMe with
        `train.offload_param=nvme`) as soon as its module exists: no rank ever holds the whole model.
        The MoE layers stay plain `MoEFFN`s (DeepSpeed's MoE container refuses ZeRO-3); their experts
        are partitioned like every other parameter, and the mtmoe router, capacity and RTS run as usual."""
        cfg = self.cfg
        ep_rank = self.rank % cfg.moe.ep_size if cfg.moe.enabled else 0
        if not self.zero3:
            return build_model(len(self.data.vocab), cfg.model, cfg.moe, ep_rank, cfg.train.seed)
        import deepspeed

        _fixed_mmap_threshold()

        if "nvme" in (cfg.train.offload_param, cfg.train.offload_optimizer):
            self.swap_dir.mkdir(parents=True, exist_ok=True)
        set_gather(gather_partitioned)
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
            model = build_model(len(self.data.vocab), cfg.model, cfg.moe, ep_rank, cfg.train.seed)
        # Parameters used outside their own module's forward (the tied output projection, learned
        # positions): ZeRO-3 must gather them whenever the model runs.
        deepspeed.zero.register_external_parameter(model, model.embed.weight)
        deepspeed.zero.register_external_parameter(model.project, model.embed.weight)  # decoding's projection
        if cfg.model.positions == "learned":
            deepspeed.zero.register_external_parameter(model.positions, model.positions.table.weight)
        return model

    def _resume(self) -> dict | None:
        """Loads the run dir's newest good checkpoint (resharded when the layout changed) and
        restores step, time spent, data position and skip count; its mtmoe state, or None."""
        cfg = self.cfg
        if self.is_main:
            checkpoint.remove_stale_partials(self.run_dir)
        barrier()
        layout = {"world_size": self.world, "ep_size": cfg.moe.ep_size if cfg.moe.enabled else 1,
                  "zero_stage": cfg.train.zero_stage, "accumulate": cfg.train.accumulate,
                  "expert_storage": cfg.moe.expert_storage if cfg.moe.enabled else None}
        moe_shape = (cfg.moe.num_experts, len(self.model.moe_layer_names()))
        state = checkpoint.load(self.engine, self.run_dir, layout=layout, moe_shape=moe_shape)
        if state is not None:
            self.step, self.train_seconds = state["step"], state["train_seconds"]
            self.target_tokens = state.get("target_tokens")
            self.stream.load_state_dict(state["stream"])
            self.guard.skipped = state.get("skipped_steps", 0)
            self.last_checkpoint = ds_checkpoint.tag_for_step(self.step)
            log.info("resumed from step %d (%s)", self.step, self.last_checkpoint)
        return state

    def _finished_results(self) -> Optional[dict]:
        """The run's results.json when the resumed run already trained to its budget and wrote its
        results at this step (re-running a finished run), else None. Every rank decides the same."""
        try:
            results = json.loads((self.run_dir / "results.json").read_text())
        except (OSError, ValueError):
            results = None
        spent = self._out_of_budget(time.monotonic())  # a collective under a time budget: every rank calls it
        done = results is not None and results.get("step") == self.step and spent
        return results if not any_rank(not done) else None

    def _expert_group(self):
        """The expert-parallel process group when experts are sharded over ranks, else None."""
        if not self.cfg.moe.enabled or self.cfg.moe.ep_size == 1:
            return None
        from deepspeed.utils import groups

        name = f"ep_size_{self.cfg.moe.ep_size}"
        assert groups._get_expert_parallel_rank(name) == self.rank % self.cfg.moe.ep_size, \
            "DeepSpeed's expert-parallel rank differs from the one the experts were built for"
        return groups._get_expert_parallel_group(name)

    # -- pieces of the loop ----------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "train_seconds": self.train_seconds, "target_tokens": self.target_tokens,
                "stream": (self.feed or self.stream).state_dict(),
                "wandb_id": self.runlog.wandb_id, "world_size": self.world, "ep_size": self.cfg.moe.ep_size,
                "accumulate": self.cfg.train.accumulate, "zero_stage": self.cfg.train.zero_stage,
                "skipped_steps": self.guard.skipped, "expert_storage": self.cfg.moe.expert_storage}

    def _last_checkpoint_path(self) -> str | None:
        return str(ds_checkpoint.checkpoint_dir(self.run_dir) / self.last_checkpoint) if self.last_checkpoint else None

    def save(self) -> None:
        keep = self.cfg.train.keep_checkpoints + self.cfg.train.snapshots  # the snapshots stay for averaging
        self.last_checkpoint = checkpoint.save(self.engine, self.run_dir, self.step, self._state(),
                                               keep=keep, is_writer=self.is_main)

    def validate(self, final: bool = False) -> dict | None:
        """All ranks take part when experts are sharded (decoding runs collectives); otherwise rank 0
        validates alone and the others wait."""
        result = None
        mode = self.cfg.train.valid_bleu
        with_bleu = mode == "always" or (mode == "final" and final)
        # Under ZeRO-3 every forward gathers parameters collectively: all ranks validate, in lockstep.
        sync_group = self.ep_group
        if self.zero3 and self.world > 1:
            import torch.distributed as dist

            sync_group = dist.group.WORLD
        if sync_group is not None or self.is_main:
            result = run_validation(self.model, self.data, self.cfg.train.max_tokens * 2, self.cfg.data.max_len,
                                    with_bleu, self.bf16, sync_group)
        barrier()
        if result is not None and self.is_main:
            record = {"kind": "valid", "step": self.step, "valid_loss": result["valid_loss"]}
            if "valid_bleu" in result:
                record["valid_bleu"], record["valid_chrf"] = result["valid_bleu"], result["valid_chrf"]
            record["directions"] = result["directions"]
            self.runlog.write(record)
            log.info("step %d valid loss %.3f%s", self.step, result["valid_loss"],
                     f" BLEU {result['valid_bleu']:.2f}" if "valid_bleu" in result else "")
        return result

    def _out_of_budget(self, started: float) -> bool:
        """Updates `self.spent`, the fraction of the budget spent (steps or training time, whichever
        is further; the time is the slowest rank's, so every rank reads the same) -> spent >= 1.
        A collective under a time budget: every rank calls it."""
        t = self.cfg.train
        spent = self.step / t.max_steps if t.max_steps > 0 else 0.0
        if t.max_minutes > 0:
            seconds = all_reduce_max(self.train_seconds + (time.monotonic() - started))
            spent = max(spent, seconds / (t.max_minutes * 60))
        self.spent = spent
        return spent >= 1

    def _train_step(self, micro_batches) -> dict | None:
        """One optimizer step over `train.accumulate` micro-batches; its sums for the log window,
        or None when it was skipped.

        A micro-batch whose loss is not finite on some rank is skipped on every rank: with one
        micro-batch per step nothing is applied; with several, it contributes no gradient."""
        cfg, accumulate = self.cfg, self.cfg.train.accumulate
        micro_batches = list(micro_batches)
        global_tokens = all_reduce_sum([sum(b.num_target_tokens for b in micro_batches)])[0]
        ce_scale = self.world * accumulate / max(1.0, global_tokens)
        # Loss sums stay on the device until a log record reads them: no host sync for them per step.
        sums = {"loss": 0.0, "tokens": 0, "src_tokens": 0, "aux": 0.0}
        for m, batch in enumerate(micro_batches):
            # Seeded by the global batch index: dropout and RTS draws are the same after a resume
            # and under any layout with the same world size x accumulate.
            global_batch = (self.step * accumulate + m) * self.world + self.rank
            torch.manual_seed(cfg.train.seed * 1_000_003 + global_batch)
            total, ce_sum, aux, z, self._last_stats = compute_loss(self.engine, batch, cfg, ce_scale, self.bf16)
            finite = not any_rank(not bool(torch.isfinite(total)))
            if not self.guard.admit(finite, self.step, self._last_checkpoint_path()):
                if accumulate == 1:
                    return None
                total = zero_loss(self.engine)
            else:
                sums["loss"] = sums["loss"] + ce_sum.detach()
                sums["tokens"] += batch.num_target_tokens
                sums["src_tokens"] += batch.num_source_tokens
                sums["aux"] = sums["aux"] + aux.detach().float() / accumulate
            self.engine.backward(total)
            self.engine.step()
        return sums  # DeepSpeed stepped (with accumulation, even when every micro-batch was skipped)

    def _log_window(self, window: dict, window_start: float, started: float, progress: Progress) -> None:
        """Writes one train record: the means over the steps since the previous record (`steps`).
        Called every `train.log_every` steps, and before a checkpoint and at the end of the run when
        steps are pending, so every step of the run is in the log, also after a resume."""
        loss_sum, tokens, src_tokens = all_reduce_sum([float(window["loss"]), window["tokens"], window["src_tokens"]])
        if self.target_tokens is not None:
            self.target_tokens += int(tokens)
        elapsed = time.monotonic() - window_start
        record = {"kind": "train", "step": self.step, "steps": window["steps"],
                  "loss": round(loss_sum / max(1, tokens), 6),
                  "lr": self.scheduler.get_last_lr()[0] if self.scheduler else self.cfg.train.lr,
                  "tokens_per_s": round(tokens / elapsed, 1),
                  "src_tokens_per_s": round(src_tokens / elapsed, 1),
                  "aux_loss": round(float(window["aux"]) / max(1, window["steps"]), 4),
                  "skipped_steps": self.guard.skipped,
                  "elapsed_s": round(self.train_seconds + time.monotonic() - started, 1)}
        if self._last_stats:
            record["routing"] = summarize_routing(self._last_stats, self.layer_names)
        if self.is_main:
            self.runlog.write(record)
        progress.note(self.step, {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"})

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        if self.finished is not None:
            log.info("%s is finished: it trained to its budget (step %d) and its results are in results.json; "
                     "nothing to do (raise train.max_steps or train.max_minutes to train on)", self.run_dir, self.step)
            return self.finished
        progress = Progress(self.is_main and cfg.train.progress, cfg.train.max_steps, cfg.train.max_minutes,
                            self.step, self.train_seconds)
        self.feed = batches = DeviceFeed(self.stream, self.device)
        window = _new_window()
        window_start = started = time.monotonic()
        saved_step = self.step
        self._out_of_budget(started)  # the fraction spent before this start (a resumed run's), on every rank
        snapshots = [p for p in snapshot_points(cfg.train.snapshots, cfg.train.snapshot_span)[:-1]
                     if p > self.spent + 1e-9]
        self.engine.train()
        while not self._out_of_budget(started):
            sums = self._train_step(next(batches) for _ in range(cfg.train.accumulate))
            if sums is None:
                continue  # nothing applied: the next batches are tried at the same step
            self.step += 1
            for key, value in sums.items():
                window[key] += value
            window["steps"] += 1
            progress.update(self.step)

            saving = cfg.train.save_every > 0 and self.step % cfg.train.save_every == 0
            # The budget spent after this step (exact under a step budget; under a time budget, the
            # clock all ranks agreed on before it).
            spent = max(self.spent, self.step / cfg.train.max_steps if cfg.train.max_steps > 0 else 0.0)
            if snapshots and spent >= snapshots[0] - 1e-9:  # the last point is the end-of-run save below
                saving = True
                snapshots = [p for p in snapshots if p > spent + 1e-9]
            if self.step % cfg.train.log_every == 0 or saving:
                self._log_window(window, window_start, started, progress)
                window = _new_window()
                window_start = time.monotonic()
            if saving:
                self.train_seconds += time.monotonic() - started
                started = time.monotonic()
                self.save()
                saved_step = self.step
            if cfg.train.valid_every > 0 and self.step % cfg.train.valid_every == 0:
                self.validate()
        if window["steps"]:
            self._log_window(window, window_start, started, progress)
        self.train_seconds += time.monotonic() - started
        progress.close()
        if saved_step != self.step and cfg.train.save_every >= 0:
            self.save()
        final = self.validate(final=True)
        results = None
        if self.is_main:
            results = {"step": self.step, "train_minutes": round(self.train_seconds / 60, 2),
                       **({"target_tokens": self.target_tokens} if self.target_tokens is not None else {}),
                       "world_size": self.world, "skipped_steps": self.guard.skipped, **(final or {})}
            write_atomic(self.run_dir / "results.json", json.dumps(results, indent=1))
            if cfg.train.plot:
                plot_training_curves(self.run_dir / "train_log.jsonl", self.run_dir / "train_curves.png")
            self.runlog.close()
        barrier()
        if self.is_main and not self.cfg.train.nvme_path and self.swap_dir.is_dir():
            import shutil

            shutil.rmtree(self.swap_dir, ignore_errors=True)  # DeepSpeed's swap files: scratch, not state
        return results or {}


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


def _new_window() -> dict:
    """Sums over the steps since the last log record."""
    return {"loss": 0.0, "tokens": 0, "src_tokens": 0, "steps": 0, "aux": 0.0}


def _plain(cfg: TrainAppConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def train(cfg: TrainAppConfig, run_dir: Path, on_start: Optional[Callable[[], None]] = None) -> dict:
    return Trainer(cfg, run_dir, on_start).run()
