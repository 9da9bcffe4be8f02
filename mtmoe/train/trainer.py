"""The training run: config -> data -> model in the DeepSpeed engine -> step loop -> results.

One step: every rank takes its own token-budget batch from the shared seed-determined stream,
computes label-smoothed cross-entropy plus the MoE balancing (and z-) losses, and DeepSpeed
does backward, gradient all-reduce (dense params over the data-parallel group, experts over their
expert-data-parallel group) and the optimizer step; clipping and the withholding of a step with a
non-finite loss are queued on the device (`mtmoe.train.update`), so a step does not wait for the
device unless it logs. Where that runs (device, precision, process group, native expert
parallelism or ZeRO-3 partitioning) is `mtmoe.train.layout`'s to decide; batches reach the device
one step ahead (`mtmoe.data.batching.DeviceFeed`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mtmoe.config import TrainAppConfig
from mtmoe.data.batching import Batch, BatchStream, DeviceFeed
from mtmoe.data.prepare import TrainingData, prepare_training_data, training_mixture
from mtmoe.data.vocab import PAD_ID
from mtmoe.device import peak_memory_gib
from mtmoe.errors import ConfigError
from mtmoe.formats import ds_checkpoint, run_description
from mtmoe.formats.integrity import write_atomic
from mtmoe.model.seq2seq import Seq2Seq
from mtmoe.train import checkpoint
from mtmoe.train.distributed import all_reduce_max, all_reduce_sum, any_rank, barrier
from mtmoe.train.guard import DivergenceGuard
from mtmoe.train.layout import TrainingLayout
from mtmoe.train.observe import Progress, RunLog, plot_training_curves, summarize_routing
from mtmoe.train.update import EngineUpdate
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


class Trainer:
    """Holds the engine, the data stream and the run's bookkeeping; `run()` trains to the budget."""

    def __init__(self, cfg: TrainAppConfig, run_dir: Path, on_start: Optional[Callable[[bool], None]] = None):
        """`on_start(finished)` is called once the run is accepted (config, data, model and resume all
        fine), just before the run dir is first written; a refusal before it leaves the run dir as it
        was. `finished`: the run already trained to its budget, and nothing will be written."""
        self.cfg, self.run_dir = cfg, run_dir
        # Device, precision, process group and DeepSpeed set-up: one object decides them.
        self.layout = TrainingLayout(cfg, swap_dir=run_dir / "nvme_swap")
        self.device, self.bf16 = self.layout.device, self.layout.bf16
        self.rank, self.world = self.layout.rank, self.layout.world
        torch.set_num_threads(self.layout.threads)
        self.is_main = self.rank == 0
        if not cfg.train.resume and ds_checkpoint.complete_tags(run_dir):
            raise ConfigError(f"train.resume=false, but {ds_checkpoint.checkpoint_dir(run_dir)} holds checkpoints of an "
                              f"earlier run: a new run there would mix its checkpoints with them (and prune its own as "
                              f"older); choose another hydra.run.dir, or delete that folder to start over")
        run_dir.mkdir(parents=True, exist_ok=True)

        self.data: TrainingData = prepare_training_data(cfg.data, self.is_main, barrier)
        run_description.check_same_model(run_dir, cfg, self.data.vocab)  # before anything of the run is touched
        self.model: Seq2Seq = self.layout.build_model(len(self.data.vocab))
        if (cfg.init.from_dense or cfg.init.aggregate or cfg.init.from_moe) and not (cfg.train.resume and ds_checkpoint.complete_tags(run_dir)):
            from mtmoe.train.init_from import initialise

            log.info("initial weights: %s", initialise(self.model, self.data.vocab, cfg.init, cfg.train.seed))

        warmup = inverse_sqrt_schedule(cfg.train.warmup_steps)
        self.spent = 0.0  # the fraction of the budget spent, as of the last budget check (all ranks alike);
        # during a step under a step budget, as of its end: where the step whose lr the scheduler sets starts

        def scheduler(opt):  # DeepSpeed calls this with the optimizer it ends up using; it steps it
            return torch.optim.lr_scheduler.LambdaLR(  # after each optimizer step
                opt, lambda step: warmup(step) * cooldown_factor(self.spent, cfg.train.cooldown))

        self.engine, self.optimizer, self.scheduler = self.layout.initialize(self.model, scheduler)
        log.info("%s", self.layout.describe())
        sources, mixture = training_mixture(self.data, cfg.tasks, cfg.schedule, cfg.data)
        self.stream = BatchStream(sources, mixture.probs, {lang: self.data.vocab.tag_id(lang) for lang in cfg.data.langs},
                                  cfg.train.max_tokens, cfg.data.max_len, cfg.train.seed, self.rank, self.world,
                                  accumulate=cfg.train.accumulate)
        self.feed: Optional[DeviceFeed] = None  # the stream's batches on the device, during run()
        self.step, self.train_seconds = 0, 0.0
        self.target_tokens: Optional[int] = 0  # trained on by all ranks together; None: unknown (an older checkpoint)
        self.guard = DivergenceGuard(cfg.train.max_bad_steps)
        self.last_checkpoint: str | None = None
        state = self._resume() if cfg.train.resume else None
        self.update = EngineUpdate(self.engine, cfg, self.layout.expert_group())  # after the resume: see keep_fused
        self.layer_names = self.model.moe_layer_names()
        self.finished = self._finished_results() if state is not None else None
        if on_start is not None:
            on_start(self.finished is not None)
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
                             resume_step=self.step)  # a fresh start: 0 (a run killed before its first checkpoint logged)

    def _resume(self) -> dict | None:
        """Loads the run dir's newest good checkpoint (resharded when the layout changed) and
        restores step, time spent, data position and skip count; its mtmoe state, or None."""
        cfg = self.cfg
        if self.is_main:
            checkpoint.remove_stale_partials(self.run_dir)
        barrier()
        layout = self.layout.checkpoint_layout()
        moe_shape = (cfg.moe.num_experts, len(self.model.moe_layer_names()))
        state = checkpoint.load(self.engine, self.run_dir, layout=layout, moe_shape=moe_shape)
        if state is not None:
            self.step, self.train_seconds = state["step"], state["train_seconds"]
            self.target_tokens = state.get("target_tokens")
            self.stream.load_state_dict(state["stream"])
            self.guard.skipped = state.get("skipped_steps", 0)
            self.guard.consecutive = state.get("bad_streak", 0)
            self.last_checkpoint = ds_checkpoint.tag_for_step(self.step)
            log.info("resumed from step %d (%s)", self.step, self.last_checkpoint)
            self._adopt_optimizer_settings()
        return state

    def _adopt_optimizer_settings(self) -> None:
        """The config's lr, betas, eps and weight decay over the checkpoint's (DeepSpeed restores the
        saved optimizer groups and lr schedule whole): a run resumed with another `train.lr` (e.g.
        after divergence) trains at it. The schedule's factor at this step (warmup, cooldown) is
        kept: each group's lr is scaled by new / saved base lr."""
        t = self.cfg.train
        optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        wanted = {"betas": tuple(t.betas), "eps": t.adam_eps, "weight_decay": t.weight_decay}
        changes = set()
        for i, group in enumerate(optimizer.param_groups):
            saved_base = self.scheduler.base_lrs[i] if self.scheduler is not None else group.get("initial_lr", t.lr)
            if saved_base != t.lr:
                changes.add(f"lr {saved_base:g} -> {t.lr:g}")
                group["lr"] = group["lr"] * t.lr / saved_base if saved_base else t.lr
                group["initial_lr"] = t.lr
                if self.scheduler is not None:
                    self.scheduler.base_lrs[i] = t.lr
            for key, value in wanted.items():
                if key in group and _as_tuple(group[key]) != _as_tuple(value):
                    changes.add(f"{key} {group[key]} -> {value}")
                    group[key] = value
        if changes:
            log.info("optimizer settings from the config, not the checkpoint: %s", ", ".join(sorted(changes)))

    def _finished_results(self) -> Optional[dict]:
        """The run's results.json when the resumed run already trained to its budget and wrote its
        results at this step (re-running a finished run), else None. Every rank decides the same."""
        try:
            results = json.loads((self.run_dir / "results.json").read_text())
        except (OSError, ValueError):
            results = None
        spent = self._out_of_budget(time.monotonic())  # a collective under a time budget: every rank calls it
        # The checkpoint's clock may stop short of a time budget the run did reach: the budget can run
        # out in the save or validation after the last step, which is then not saved again. The results
        # name the budget they were written under: the same budget is the same finished run.
        done = (results is not None and results.get("step") == self.step
                and (spent or results.get("budget") == self._budget()))
        return results if not any_rank(not done) else None

    # -- pieces of the loop ----------------------------------------------------------------------
    def _state(self, snapshot: bool = False) -> dict:
        return {"step": self.step, "train_seconds": self.train_seconds, "target_tokens": self.target_tokens,
                "snapshot": snapshot,
                "stream": (self.feed or self.stream).state_dict(),
                "wandb_id": self.runlog.wandb_id, "skipped_steps": self.guard.skipped,
                "bad_streak": self.guard.consecutive,
                **self.layout.checkpoint_layout()}

    def _last_checkpoint_path(self) -> str | None:
        return str(ds_checkpoint.checkpoint_dir(self.run_dir) / self.last_checkpoint) if self.last_checkpoint else None

    def save(self, snapshot: bool = False) -> None:
        """A checkpoint of this step; `snapshot`: one of `train.snapshots` (kept for averaging besides
        the newest `train.keep_checkpoints`)."""
        self.last_checkpoint = checkpoint.save(self.engine, self.run_dir, self.step, self._state(snapshot),
                                               keep=self.cfg.train.keep_checkpoints, is_writer=self.is_main,
                                               keep_snapshots=self.cfg.train.snapshots)

    def validate(self, final: bool = False) -> dict | None:
        """The ranks of the layout's validation group validate together (decoding runs collectives
        there); without one rank 0 validates alone and the others wait (`TrainingLayout.validation_model`)."""
        result = None
        mode = self.cfg.train.valid_bleu
        with_bleu = mode == "always" or (mode == "final" and final)
        with self.layout.validation_model(self.model, len(self.data.vocab)) as (model, sync_group):
            if sync_group is not None or self.is_main:
                result = run_validation(model, self.data, self.cfg.train.max_tokens * 2, self.cfg.data.max_len,
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

    def _budget(self) -> dict:
        return {"max_steps": self.cfg.train.max_steps, "max_minutes": self.cfg.train.max_minutes}

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

    def train_step(self, micro_batches) -> dict:
        """One optimizer step over `train.accumulate` micro-batches -> its sums for the log window
        (losses on the device, token counts on the host).

        Nothing here waits for the device: the loss sums stay there until a log record reads them,
        and a step whose loss is not finite on some rank is withheld on the device on every rank
        (`mtmoe.train.update`) and tallied by the guard, which the log settles. The token count of
        the global batch is summed from host counts through the host group."""
        cfg, accumulate = self.cfg, self.cfg.train.accumulate
        micro_batches = list(micro_batches)
        global_tokens = all_reduce_sum([sum(b.num_target_tokens for b in micro_batches)])[0]
        ce_scale = self.world * accumulate / max(1.0, global_tokens)
        sums = _new_window()
        bad = None
        for m, batch in enumerate(micro_batches):
            # Seeded by the global batch index: dropout and RTS draws are the same after a resume
            # and under any layout with the same world size x accumulate.
            global_batch = (self.step * accumulate + m) * self.world + self.rank
            torch.manual_seed(cfg.train.seed * 1_000_003 + global_batch)
            total, ce_sum, aux, z, self._last_stats = compute_loss(self.engine, batch, cfg, ce_scale, self.bf16)
            finite = torch.isfinite(total)
            sums["loss"] = sums["loss"] + torch.where(finite, ce_sum.detach(), 0.0)
            sums["loss_tokens"] = sums["loss_tokens"] + finite * batch.num_target_tokens
            sums["tokens"] += batch.num_target_tokens
            sums["src_tokens"] += batch.num_source_tokens
            sums["aux"] = sums["aux"] + torch.where(finite, aux.detach().float(), 0.0) / accumulate
            bad = self.update(total, finite, bad, last=m == accumulate - 1)
        self.guard.record(bad)
        if self.update.grad_norm is not None:  # the mean over applied steps is logged
            sums["grad_norm"] = torch.where(bad, 0.0, self.update.grad_norm)
            sums["norm_steps"] = (~bad).long()
        return sums

    def _log_window(self, window: dict, window_start: float, started: float, progress: Progress) -> None:
        """Writes one train record: the means over the steps since the previous record (`steps`).
        Called every `train.log_every` steps, and before a checkpoint and at the end of the run when
        steps are pending, so every step of the run is in the log, also after a resume."""
        self.guard.settle(self.step, self._last_checkpoint_path())  # raises after too many withheld steps in a row
        loss_sum, loss_tokens, tokens, src_tokens = all_reduce_sum(
            [float(window["loss"]), float(window["loss_tokens"]), window["tokens"], window["src_tokens"]])
        if self.target_tokens is not None:
            self.target_tokens += int(tokens)
        norm_steps = int(window["norm_steps"])
        elapsed = time.monotonic() - window_start
        record = {"kind": "train", "step": self.step, "steps": window["steps"],
                  # None (null): every step since the last record was withheld (non-finite loss)
                  "loss": round(loss_sum / loss_tokens, 6) if loss_tokens else None,
                  "lr": self.scheduler.get_last_lr()[0] if self.scheduler else self.cfg.train.lr,
                  "tokens_per_s": round(tokens / elapsed, 1),
                  "src_tokens_per_s": round(src_tokens / elapsed, 1),
                  "aux_loss": round(float(window["aux"]) / max(1, window["steps"]), 4),
                  # the same on every rank (a global norm); None: no step applied, or no norm computed
                  "grad_norm": round(float(window["grad_norm"]) / norm_steps, 4) if norm_steps else None,
                  "skipped_steps": self.guard.skipped,
                  "elapsed_s": round(self.train_seconds + time.monotonic() - started, 1)}
        if self._last_stats:
            record["routing"] = summarize_routing(self._last_stats, self.layer_names)
        if self.is_main:
            self.runlog.write(record)
        loss = "-" if record["loss"] is None else f"{record['loss']:.3f}"
        progress.note(self.step, {"loss": loss, "tok/s": f"{record['tokens_per_s']:.0f}"})

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
        validated = (None, None)  # (step, result) of the loop's last validation
        saved_step, saved_snapshot = self.step, True  # no step taken: nothing new to save at the end
        self._out_of_budget(started)  # the fraction spent before this start (a resumed run's), on every rank
        snapshots = [p for p in snapshot_points(cfg.train.snapshots, cfg.train.snapshot_span) if p > self.spent + 1e-9]
        self.engine.train()
        while not self._out_of_budget(started):
            if cfg.train.max_steps > 0:  # the lr scheduler, stepped after this step, sets the next step's lr
                self.spent = max(self.spent, (self.step + 1) / cfg.train.max_steps)  # from where that one starts
            sums = self.train_step(next(batches) for _ in range(cfg.train.accumulate))
            self.step += 1
            for key, value in sums.items():
                window[key] += value
            window["steps"] += 1
            progress.update(self.step)

            saving = cfg.train.save_every > 0 and self.step % cfg.train.save_every == 0
            # self.spent: the budget spent after this step, set before it (exact under a step budget;
            # under a time budget, the clock all ranks agreed on before it).
            snapshot = bool(snapshots) and self.spent >= snapshots[0] - 1e-9  # 1.0: the last step of a step budget
            if snapshot:
                saving = True
                snapshots = [p for p in snapshots if p > self.spent + 1e-9]
            if self.step % cfg.train.log_every == 0 or saving:
                self._log_window(window, window_start, started, progress)
                window = _new_window()
                window_start = time.monotonic()
            paused = time.monotonic()
            if saving:
                self.train_seconds += time.monotonic() - started
                started = time.monotonic()
                self.save(snapshot)
                saved_step, saved_snapshot = self.step, snapshot
            if cfg.train.valid_every > 0 and self.step % cfg.train.valid_every == 0:
                validated = (self.step, self.validate())
            window_start += time.monotonic() - paused  # tokens/s is training's: saves and validation not counted
        if window["steps"]:
            self._log_window(window, window_start, started, progress)
        self.train_seconds += time.monotonic() - started
        progress.close()
        # The end of the run is the last snapshot: under a step budget the loop saved it as one; under a
        # time budget it is saved here (again, when a `save_every` save just wrote that step).
        if cfg.train.save_every >= 0 and (saved_step != self.step or (cfg.train.snapshots and not saved_snapshot)):
            self.save(snapshot=cfg.train.snapshots > 0)
        if validated[0] == self.step and cfg.train.valid_bleu != "final":  # the last step was just validated
            final = validated[1]
        else:
            final = self.validate(final=True)
        peak_gpu = peak_memory_gib(self.layout.device)
        if peak_gpu is not None:
            peak_gpu = round(all_reduce_max(peak_gpu), 2)  # the fullest rank's GPU
        results = None
        if self.is_main:
            results = {"step": self.step, "train_minutes": round(self.train_seconds / 60, 2),
                       **({"target_tokens": self.target_tokens} if self.target_tokens is not None else {}),
                       **({"peak_gpu_memory_gib": peak_gpu} if peak_gpu is not None else {}),
                       "world_size": self.world, "skipped_steps": self.guard.skipped, "budget": self._budget(),
                       **(final or {})}
            write_atomic(self.run_dir / "results.json", json.dumps(results, indent=1))
            if cfg.train.plot:
                plot_training_curves(self.run_dir / "train_log.jsonl", self.run_dir / "train_curves.png")
            self.runlog.close()
        barrier()
        self.layout.close(self.is_main)
        return results or {}


def _as_tuple(value) -> tuple:
    """An optimizer setting as a tuple (betas are saved as a list or a tuple; eps as a number)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _new_window() -> dict:
    """Sums over the steps since the last log record (of a step's micro-batches in `train_step`).
    `loss`, `aux`, `loss_tokens` (the target tokens of the micro-batches with a finite loss: the
    logged loss's denominator), `grad_norm` and `norm_steps` (the applied steps it sums over) are
    device tensors once a step has added to them."""
    return {"loss": 0.0, "loss_tokens": 0, "tokens": 0, "src_tokens": 0, "steps": 0, "aux": 0.0,
            "grad_norm": 0.0, "norm_steps": 0}


def _plain(cfg: TrainAppConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def train(cfg: TrainAppConfig, run_dir: Path, on_start: Optional[Callable[[bool], None]] = None) -> dict:
    return Trainer(cfg, run_dir, on_start).run()
