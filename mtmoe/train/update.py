"""The update of one training step after its forwards, queued on the device without a host-device
sync: backward of each micro-batch, the step's verdict, gradient clipping and the optimizer step.

**Withheld steps.** A step with a non-finite loss on some micro-batch of some rank, or a
non-finite gradient, is withheld on every rank: weights and optimizer state stay as they were.
Deciding that on the host would mean reading the loss, i.e. waiting for the GPU to finish the
forward, every micro-batch; here the verdict stays on the device:
- a non-finite loss is multiplied by NaN before backward, so every gradient of its step is NaN.
  DeepSpeed's ZeRO optimizers (stages 1-3, CPU Adam included) then find the gradient norm
  non-finite and skip the step themselves (they read the norm on the host: those layouts sync
  there anyway, and the engine reports it: `was_step_applied`);
- without ZeRO the engine steps mtmoe's optimizer, torch's fused Adam, directly: it is handed the
  verdict as `found_inf` (torch's GradScaler protocol) and its kernel leaves weights, moments and
  step counts unchanged when it is set.
The step still counts as a step (its batches are consumed; the lr schedule advances without ZeRO,
DeepSpeed holds it under ZeRO). `mtmoe.train.guard` tallies the verdicts on the device.

**Clipping.** Under ZeRO DeepSpeed's optimizer clips the gradient partitions it owns. Without ZeRO
mtmoe clips here (`ds_config.deepspeed_clips_gradients`): the global norm on the device, with the
experts' squares summed over the expert-parallel group, i.e. the norm of the whole model's
gradient as a world of one computes it (DeepSpeed's engine averages the ranks' own norms, which
differ under expert parallelism, and builds its scalars from host numbers). DeepSpeed's
`clip_grad_norm_` stays the reference: tests hold the two equal in a world of one."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from mtmoe.config import TrainAppConfig
from mtmoe.errors import ConfigError
from mtmoe.train.distributed import any_rank_on_device
from mtmoe.train.ds_config import deepspeed_clips_gradients


def _squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of the squared entries of `grads` -> 0-d fp32 on `device` (foreach norms: a few kernels)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.nn.utils.get_total_norm(grads).float().square()


def global_grad_norm(params: list[torch.nn.Parameter], expert_group=None) -> torch.Tensor:
    """The 2-norm of the whole model's gradient -> 0-d fp32 on the gradients' device, without a host
    sync. Dense gradients are the same on every rank (reduced before); each expert (a parameter
    DeepSpeed's MoE container marked: `is_moe_param`) lives on one rank of `expert_group` (None: all
    experts are here), so their squares are summed over it."""
    from deepspeed.moe.utils import is_moe_param  # deepspeed is imported once the layout chose its accelerator

    with_grad = [p for p in params if p.grad is not None]
    device = with_grad[0].device if with_grad else torch.device("cpu")
    dense = _squares([p.grad for p in with_grad if not is_moe_param(p)], device)
    experts = _squares([p.grad for p in with_grad if is_moe_param(p)], device)
    if expert_group is not None:
        dist.all_reduce(experts, group=expert_group)
    return (dense + experts).sqrt()


def keep_fused(optimizer) -> bool:
    """Whether `optimizer` is a torch optimizer built fused; if so its parameter groups are set to
    run fused again. A checkpoint restores the groups' implementation flags with their
    hyperparameters: one written by a foreach optimizer (mtmoe before it trained with the fused
    one) would make this optimizer run foreach, which cannot take `found_inf`."""
    if not (isinstance(optimizer, torch.optim.Optimizer) and optimizer.defaults.get("fused")):
        return False
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
    return True


class EngineUpdate:
    """Backward of each micro-batch and, at the step's last one, the update of a DeepSpeed engine
    built by `mtmoe.train.layout.TrainingLayout` (the trainer and the benchmarks share it)."""

    def __init__(self, engine, cfg: TrainAppConfig, expert_group=None):
        """Built once the engine holds its final state (after a resume: `keep_fused`)."""
        self.engine = engine
        self.expert_group = expert_group
        self.owns_clipping = not deepspeed_clips_gradients(cfg)
        self.clip_norm = cfg.train.clip_norm
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        optimizer = engine.optimizer
        self.takes_verdict = keep_fused(optimizer)
        """The optimizer DeepSpeed steps is torch's fused one: it withholds a step given `found_inf`."""
        keep_fused(getattr(optimizer, "optimizer", None))  # the one a ZeRO optimizer steps
        self.grad_norm: Optional[torch.Tensor] = None
        """The last step's gradient norm before clipping: 0-d fp32 on the device, not finite for a
        withheld step; None where DeepSpeed computes none (ZeRO with `compute_grad_norm` off)."""
        if not self.takes_verdict and not hasattr(optimizer, "overflow"):
            raise ConfigError(
                f"the optimizer DeepSpeed built ({type(optimizer).__name__}) can neither take a non-finite step's "
                f"verdict on the device nor skip it itself: without ZeRO (train.zero_stage=0) leave the optimizer "
                f"to mtmoe (no `deepspeed.optimizer` section)")

    def __call__(self, total: torch.Tensor, finite: torch.Tensor, bad: Optional[torch.Tensor],
                 last: bool) -> torch.Tensor:
        """Backward of one micro-batch's loss `total` (0-d; `finite`: torch.isfinite of it) and, when it
        is the step's `last`, the step. `bad`: the step's verdict so far (None at its first micro-batch)
        -> the verdict with this micro-batch (0-d bool on the device); at the last one, the step's
        final verdict, the same on every rank."""
        bad = ~finite if bad is None else bad | ~finite
        self.engine.backward(total * torch.where(finite, 1.0, float("nan")))
        if last:
            bad = any_rank_on_device(bad)
            if self.owns_clipping:
                norm = self.grad_norm = global_grad_norm(self.params, self.expert_group)
                bad = bad | ~torch.isfinite(norm)
                if self.clip_norm > 0:
                    torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_norm, norm)
            if self.takes_verdict:
                self.engine.optimizer.found_inf = bad.float()
        self.engine.step()
        if last and not self.owns_clipping:
            self.grad_norm = _as_device_norm(self.engine.get_global_grad_norm(), bad.device)
        if last and not self.engine.was_step_applied():  # DeepSpeed's ZeRO optimizer skipped it itself
            bad = bad | True
        return bad


def _as_device_norm(norm, device: torch.device) -> Optional[torch.Tensor]:
    """DeepSpeed's ZeRO gradient norm (a tensor, a float such as inf after a skipped step, or None)
    -> 0-d fp32 on `device` (a host number is filled in, not copied)."""
    if norm is None:
        return None
    if torch.is_tensor(norm):
        return norm.detach().float().reshape(()).to(device)
    return torch.full((), float(norm), dtype=torch.float32, device=device)
