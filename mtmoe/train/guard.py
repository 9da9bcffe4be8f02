"""Divergence guard: a step whose loss is not finite on some rank is withheld on every rank (no
weight or optimizer-state update; `mtmoe.train.update` does that on the device) and counted; too
many in a row stop the run with a clear message, so the last checkpoint, written before the
trouble or during it (a withheld step changes no weight), stays the one to resume from.

The tally lives on the device and is read where the trainer logs (`settle`): checking each step's
verdict on the host would stall the host until the GPU has finished the step, every step. So a run
of bad steps is noticed at the next log record (every `train.log_every` steps, and before every
checkpoint), up to `log_every - 1` steps after it reached `train.max_bad_steps`; those steps were
withheld too."""

from __future__ import annotations

import logging

import torch

from mtmoe.errors import TrainingDiverged

log = logging.getLogger("mtmoe")


class DivergenceGuard:
    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        """Steps withheld over the whole run, as of the last `settle` (restored on resume)."""
        self.consecutive = 0
        """Withheld steps in a row at the last `settle`."""
        self._tally: torch.Tensor | None = None
        """int64 [3] on the device: withheld steps since the last settle, the current run of them,
        the longest run since the last settle (None: no step since)."""

    def record(self, bad: torch.Tensor) -> None:
        """One step's verdict: `bad`, a 0-d bool tensor, true when the step was withheld (the same
        on every rank). Device ops only."""
        if self._tally is None:
            self._tally = torch.zeros(3, dtype=torch.int64, device=bad.device)
            # fill_, not item assignment: `t[1] = n` copies a host scalar to the device and waits for it
            self._tally[1].fill_(self.consecutive)
        bad = bad.to(torch.int64)
        withheld, run, longest = self._tally.unbind()
        run = (run + 1) * bad
        self._tally = torch.stack([withheld + bad, run, torch.maximum(longest, run)])

    def settle(self, step: int, last_checkpoint: str | None) -> int:
        """Reads the tally (one host-device sync: call it where the trainer logs) -> steps withheld
        since the last settle. Raises TrainingDiverged once `max_consecutive` steps were withheld in a
        row (0: never). Every rank reads the same tally and decides the same."""
        if self._tally is None:
            return 0
        withheld, self.consecutive, longest = self._tally.tolist()
        self._tally = None
        self.skipped += withheld
        if withheld:
            log.warning("non-finite loss: %d of the steps up to step %d withheld (%d in a row now, %d in this run)",
                        withheld, step, self.consecutive, self.skipped)
        if self.max_consecutive > 0 and longest >= self.max_consecutive:
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise TrainingDiverged(
                f"training diverged: the loss was non-finite for {longest} consecutive steps by step {step} "
                f"(train.max_bad_steps={self.max_consecutive}); stopped without saving, {where}. "
                f"Lower train.lr, raise train.warmup_steps or lower train.clip_norm, then re-run the command "
                f"to resume from that checkpoint")
        return withheld
