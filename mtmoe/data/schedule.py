"""Multitask schedules: the share of training examples each task gets as training goes on.

`share(step)` is the share of the *auxiliary* tasks (everything but translation, e.g. denoising);
translation gets the rest. Within a task, sources (directions, languages) are sampled by
temperature over their line counts. Kinds:

    constant    `start` throughout
    linear      `start` -> `end` over `steps`, then `end`
    stepwise    `milestones` [[step, share], ...]: the share of the last milestone reached
    curriculum  denoising-heavy start moving to translation: cosine from `start` to `end` over `steps`
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mtmoe.config import ScheduleKind, check_choice
from mtmoe.data.sampling import temperature_probs


def auxiliary_share(cfg, step: float) -> float:
    if cfg.kind == "constant":
        return cfg.start
    progress = min(1.0, step / cfg.steps) if cfg.steps > 0 else 1.0
    if cfg.kind == "linear":
        return cfg.start + (cfg.end - cfg.start) * progress
    if cfg.kind == "curriculum":
        return cfg.end + (cfg.start - cfg.end) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.kind == "stepwise":
        share = cfg.start
        for at, value in sorted(cfg.milestones):
            if step >= at:
                share = value
        return share
    check_choice("schedule.kind", cfg.kind, ScheduleKind)  # raises: not a kind handled above
    raise AssertionError(f"schedule.kind={cfg.kind!r} has no share rule")


class Mixture:
    """Sampling probabilities over sources at a training step."""

    def __init__(self, tasks: Sequence[str], sizes: Sequence[int], schedule_cfg, temperature: float):
        self.tasks = np.asarray(tasks)
        self.sizes = np.asarray(sizes, dtype=np.float64)
        self.cfg = schedule_cfg
        self.temperature = temperature
        self.has_aux = bool((self.tasks != "translation").any())
        self.has_translation = bool((self.tasks == "translation").any())

    def probs(self, step: float) -> np.ndarray:
        share = auxiliary_share(self.cfg, step) if self.has_aux else 0.0
        if not self.has_translation:
            share = 1.0
        out = np.zeros(len(self.tasks))
        for is_aux, weight in ((False, 1.0 - share), (True, share)):
            sel = (self.tasks != "translation") == is_aux
            if sel.any() and weight > 0:
                out[sel] = weight * temperature_probs(self.sizes[sel].tolist(), self.temperature)
        return out / out.sum()
