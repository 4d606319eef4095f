"""Learning-rate schedule: linear warm-up then cosine decay to a floor (pure function of the step)."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total: int, floor: float = 0.0) -> float:
    """Learning rate at optimisation step ``step`` (0-based) of ``total``."""
    # 1) linear warm-up from base_lr/warmup to base_lr
    if step < warmup:
        return base_lr * (step + 1) / warmup
    # 2) past the end: stay at the floor
    if step >= total:
        return floor
    # 3) cosine from base_lr down to floor
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base_lr - floor) * (1.0 + math.cos(math.pi * progress))
