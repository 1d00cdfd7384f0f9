"""Learning-rate schedules of the ZO update: the lr at a step."""

from __future__ import annotations

import math


def lr_at(schedule: str, lr: float, step: int, total: int, warmup: int = 0) -> float:
    """Learning rate at 0-based ``step``: constant, linear decay, or cosine, after linear warm-up."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr * (1.0 - frac)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule!r}")
