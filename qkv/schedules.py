"""Learning-rate schedules as pure functions of the step: multipliers of the peak rate."""

from __future__ import annotations

import math


def noam(step: int, *, warmup: int) -> float:
    """Sec. 5.3, Eq. 3, normalised to peak 1 at step = warmup.

    lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5); with the peak lr set to
    (d_model * warmup)^-0.5 this multiplier reproduces the paper's schedule exactly.
    """
    step = max(step, 1)
    if warmup <= 0:
        return 1.0 / math.sqrt(step)
    return min(step / warmup, math.sqrt(warmup / step))


def cosine(step: int, *, warmup: int, total: int, floor: float = 0.0) -> float:
    """Linear warm-up, then half a cosine from 1 down to ``floor`` at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(step: int, *, warmup: int, total: int, floor: float = 0.0) -> float:
    """Linear warm-up, then linear decay to ``floor`` at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - (1.0 - floor) * progress


def multiplier(name: str, step: int, *, warmup: int, total: int, floor: float = 0.0) -> float:
    """The multiplier of schedule ``name`` at optimizer step ``step`` (counted from 0)."""
    if name == "noam":
        return noam(step + 1, warmup=warmup)
    if name == "cosine":
        return cosine(step, warmup=warmup, total=total, floor=floor)
    if name == "linear":
        return linear(step, warmup=warmup, total=total, floor=floor)
    if name == "constant":
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    raise ValueError(f"unknown schedule {name!r}")
