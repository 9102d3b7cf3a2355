"""Learning-rate schedules as pure functions of the step: Warmup-Stable-Decay (the paper's) and cosine.

Each returns a multiplier of the peak learning rate, so the optimiser's base lr stays the peak.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleName = Literal["wsd", "cosine", "constant"]
SCHEDULES: tuple[str, ...] = ("wsd", "cosine", "constant")


def lr_multiplier(step: int, total_steps: int, schedule: ScheduleName = "wsd", warmup_steps: int = 0,
                  decay_fraction: float = 0.2, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``.

    Args:
        schedule: ``wsd``: linear warmup, constant, then a linear decay over the last ``decay_fraction``
            of training down to ``min_ratio`` (LLaDA pretraining, Sec. 2.2 / B.1: warmup, stable phase,
            then decay). ``cosine``: linear warmup, then half a cosine down to ``min_ratio``.
            ``constant``: warmup, then 1.
        warmup_steps: steps of linear warmup from 0 (step 0 gets 1/warmup_steps).
        decay_fraction: share of all steps spent decaying (wsd only).
        min_ratio: final multiplier.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if total_steps < 1 or warmup_steps < 0 or not 0 <= decay_fraction <= 1 or not 0 <= min_ratio <= 1:
        raise ValueError("need total_steps >= 1, warmup_steps >= 0, 0 <= decay_fraction <= 1, 0 <= min_ratio <= 1")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = round(decay_fraction * total_steps)
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - min_ratio) * progress
