"""One training step per system on identical batches, timed in alternating rounds.

Batches come from mtmoe's `BatchStream` (the training stream of the run config) and are built
before any timing. A step is forward + backward + gradient clipping + optimizer step + lr schedule:

- mtmoe: the DeepSpeed engine in a world of one, built by the trainer's own
  `mtmoe.train.layout.TrainingLayout` (on the CPU), loss from `compute_loss`, then the trainer's
  update (`mtmoe.train.update.EngineUpdate`: backward, clipping, step).
- HF: a plain PyTorch loop: `model(input_ids, attention_mask, decoder_input_ids,
  decoder_attention_mask, labels, output_router_logits=True)` (CE + aux loss), backward,
  clip_grad_norm_, torch.optim.Adam (same lr/betas/eps, fused as mtmoe's), the same lr schedule.
- On a GPU (`--device cuda`) both run in the plain loop (`PlainStep` for mtmoe: its Seq2Seq and
  `compute_loss` without DeepSpeed, whose GPU set-up belongs to the trainer), on the device, under
  bf16 autocast, with fused AdamW (same lr/betas/eps): the set-up of the issue's first GPU figures.

Every system's step ends with `loss.item()`, as the mtmoe loop does. Batches move to the device
inside the step (pinned host memory, non-blocking copy), as a trainer's would.
"""

from __future__ import annotations

import dataclasses
import time
from itertools import islice
from typing import Callable, Sequence

import torch

from mtmoe.config import TrainAppConfig
from mtmoe.data.batching import Batch, BatchStream
from mtmoe.data.prepare import TrainingData
from mtmoe.data.vocab import PAD_ID
from mtmoe.train.update import EngineUpdate

from bench.vs_hf.systems import build_hf, set_hf_capacity


def training_batches(data: TrainingData, cfg: TrainAppConfig, count: int) -> list[Batch]:
    """The first `count` batches of the run's training stream (seed `train.seed`, rank 0 of 1)."""
    stream = BatchStream.translation(data.train, data.directions, data.probs,
                         {lang: data.vocab.tag_id(lang) for lang in cfg.data.langs},
                         cfg.train.max_tokens, cfg.data.max_len, cfg.train.seed, rows=data.train_rows)
    return list(islice(iter(stream), count))


def make_optimizer(params, cfg: TrainAppConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam as mtmoe trains on a CPU (fused: `mtmoe.train.layout.build_optimizer`); fused AdamW on a GPU
    (weight decay as configured)."""
    t = cfg.train
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay,
                                 fused=True)
    return torch.optim.Adam(params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay,
                            fused=True)


def hf_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The HF keyword arguments for an mtmoe batch: the same token tensors, PAD masked out."""
    return {"input_ids": batch.src, "attention_mask": (batch.src != PAD_ID).long(),
            "decoder_input_ids": batch.tgt_in, "decoder_attention_mask": (batch.tgt_in != PAD_ID).long(),
            "labels": batch.tgt_out.masked_fill(batch.tgt_out == PAD_ID, -100)}


class MtmoeStep:
    """mtmoe's DeepSpeed engine (world of one) for one moe preset's config."""

    def __init__(self, cfg: TrainAppConfig, vocab_size: int):
        from mtmoe.train.layout import TrainingLayout
        from mtmoe.train.trainer import inverse_sqrt_schedule

        # mtmoe's engine is measured on CPU ranks only (see run()): the trainer's own layout, on the CPU
        self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
        layout = TrainingLayout(self.cfg)
        self.bf16 = layout.bf16
        self.model = layout.build_model(vocab_size)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, inverse_sqrt_schedule(cfg.train.warmup_steps))

        self.engine, *_ = layout.initialize(self.model, scheduler)
        self.engine.train()
        self.update = EngineUpdate(self.engine, self.cfg, layout.expert_group())

    def __call__(self, batch: Batch) -> float:
        from mtmoe.train.trainer import compute_loss

        total, ce_sum, _, _, _ = compute_loss(self.engine, batch, self.cfg, 1.0 / max(1, batch.num_target_tokens),
                                              self.bf16)
        self.update(total, torch.isfinite(total), None, last=True)
        return ce_sum.item()


def plain_update(loss: torch.Tensor, model: torch.nn.Module, optimizer, scheduler, clip_norm: float) -> None:
    """The plain loop's update: backward, grad-norm clipping, optimizer and lr-schedule step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class PlainStep:
    """mtmoe's Seq2Seq in a plain PyTorch loop on `device` (no DeepSpeed), bf16 autocast on a GPU."""

    def __init__(self, cfg: TrainAppConfig, vocab_size: int, device: torch.device):
        from mtmoe.model.seq2seq import build_model
        from mtmoe.train.trainer import inverse_sqrt_schedule

        self.cfg = cfg
        self.device = device
        self.model = build_model(vocab_size, cfg.model, cfg.moe, 0, cfg.train.seed).to(device).train()
        self.optimizer = make_optimizer(self.model.parameters(), cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, inverse_sqrt_schedule(cfg.train.warmup_steps))

    def __call__(self, batch: Batch) -> float:
        from mtmoe.train.trainer import compute_loss

        scale = 1.0 / max(1, batch.num_target_tokens)
        total, ce_sum, _, _, _ = compute_loss(self.model, batch.to(self.device, non_blocking=True), self.cfg, scale,
                                               self.device.type == "cuda")
        plain_update(total, self.model, self.optimizer, self.scheduler, self.cfg.train.clip_norm)
        return ce_sum.item()


class HfStep:
    """NLLB-MoE in a plain PyTorch loop with the same optimizer settings as mtmoe."""

    def __init__(self, cfg: TrainAppConfig, vocab_size: int, fixed_dispatch: bool = False,
                 device: torch.device = torch.device("cpu")):
        from mtmoe.train.trainer import inverse_sqrt_schedule

        self.cfg, self.device = cfg, device
        self.model = build_hf(cfg, vocab_size, cfg.train.seed, fixed_dispatch).to(device)
        self.model.train()
        self.optimizer = make_optimizer(self.model.parameters(), cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, inverse_sqrt_schedule(cfg.train.warmup_steps))

    def __call__(self, batch: Batch) -> float:
        set_hf_capacity(self.model, batch.num_source_tokens, int((batch.tgt_in != PAD_ID).sum()), self.cfg)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.model(**hf_inputs(batch.to(self.device, non_blocking=True)), output_router_logits=True).loss
        plain_update(loss, self.model, self.optimizer, self.scheduler, self.cfg.train.clip_norm)
        return loss.item()


def make_train_step(system: str, cfg: TrainAppConfig, vocab_size: int,
                    device: torch.device = torch.device("cpu")) -> Callable[[Batch], float]:
    """The step of `mtmoe*` (DeepSpeed engine for `cfg`'s moe preset on a CPU, the plain loop on a
    GPU), `hf` or `hf_fixed`."""
    if system.startswith("mtmoe"):
        return MtmoeStep(cfg, vocab_size) if device.type == "cpu" else PlainStep(cfg, vocab_size, device)
    return HfStep(cfg, vocab_size, fixed_dispatch=system == "hf_fixed", device=device)


def peak_training_memory(step_factory: Callable[[], Callable[[Batch], float]], batches: Sequence[Batch],
                         device: torch.device) -> float:
    """GiB of device memory one system holds at its peak over `batches` (weights, optimizer state,
    activations), built alone: allocated after set-up and steps, minus what was allocated before."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step = step_factory()
    for batch in batches:
        step(batch)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return peak / 2 ** 30


def tokens_per_second(step: Callable[[Batch], float], batches: Sequence[Batch]) -> float:
    """Target tokens per second over `batches`, one step each."""
    started = time.perf_counter()
    for batch in batches:
        step(batch)  # each step ends with loss.item(): the device has finished it
    seconds = time.perf_counter() - started
    return sum(b.num_target_tokens for b in batches) / seconds


def alternate(steps: dict[str, Callable[[Batch], float]], batches: Sequence[Batch], warmup: int,
              repeats: int) -> dict[str, list[float]]:
    """Target tokens/s per system per round. Every system first runs `warmup` untimed steps; then
    in each of `repeats` rounds every system, one after another, runs the round's batches (the
    same for all systems; the order rotates per round), so a slow stretch of the machine does not
    fall on one system only."""
    warm, timed = batches[:warmup], batches[warmup:]
    per_round = len(timed) // repeats
    for step in steps.values():
        for batch in warm:
            step(batch)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats):
        chunk = timed[r * per_round:(r + 1) * per_round]
        names = list(steps)[r % len(steps):] + list(steps)[:r % len(steps)]
        for name in names:
            rates[name].append(tokens_per_second(steps[name], chunk))
    return rates
