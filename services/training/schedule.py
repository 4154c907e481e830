"""Learning-rate schedules: ``warmup_steps`` of linear warm-up from 0, then cosine, linear or
constant. Cosine and linear decay to 10 % of the peak at ``max_iterations`` (a floor that keeps
late steps useful). A pure function of the step, so the lr reported for a step is exactly the
one the optimizer applied, and a resumed run continues on the same curve."""

from __future__ import annotations

import math

FLOOR = 0.1


def learning_rate_at(step: int, *, peak: float, schedule: str, warmup_steps: int, max_iterations: int) -> float:
    """The lr applied by update number ``step`` (1-based, as the iteration shown to users)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return peak * step / warmup_steps
    if schedule == "constant":
        return peak
    span = max(1, max_iterations - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        factor = 1.0 - (1.0 - FLOOR) * progress
    elif schedule == "cosine":
        factor = FLOOR + (1.0 - FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr_schedule {schedule!r}")
    return peak * factor
