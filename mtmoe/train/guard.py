"""Divergence guard: a step whose loss is not finite on any rank is skipped on every rank (no
backward, no optimizer update) and counted; too many in a row stop the run with a clear message,
so the last checkpoint, written before the trouble, stays the one to resume from."""

from __future__ import annotations

import logging

from mtmoe.errors import TrainingDiverged

log = logging.getLogger("mtmoe")


class DivergenceGuard:
    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        """Steps skipped over the whole run (restored on resume)."""
        self.consecutive = 0

    def admit(self, all_finite: bool, step: int, last_checkpoint: str | None) -> bool:
        """True when the step may be applied. `all_finite` must be the same on every rank."""
        if all_finite:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        log.warning("non-finite loss after step %d: update skipped (%d in a row, %d in this run)",
                    step, self.consecutive, self.skipped)
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise TrainingDiverged(
                f"training diverged: the loss was non-finite for {self.consecutive} consecutive batches after "
                f"step {step} (train.max_bad_steps={self.max_consecutive}); stopped without saving, {where}. "
                f"Lower train.lr, raise train.warmup_steps or lower train.clip_norm, then re-run the command "
                f"to resume from that checkpoint")
        return False
