"""EMA teacher (as timm's ``ModelEmaV3``): in-place, explicit about eval mode and buffers.

ACTIS's reference code rebinds a loop variable and never updates its teacher; here every
parameter is lerped in place, so the teacher really follows the student.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Teacher = exponential moving average of the student's weights.

    ``decay`` α: teacher ← α·teacher + (1−α)·student, every ``update_`` call. ``warmup`` uses
    ``min(α, (1+step)/(10+step))`` so early teachers are not stuck at θ0 (timm's rule); off by
    default, as in the paper. Float buffers (BatchNorm statistics) are averaged like weights when
    ``average_buffers`` (default), else copied; integer buffers are always copied.
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, warmup: bool = False,
                 average_buffers: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(student).eval()  # the teacher always predicts in eval mode
        self.module.requires_grad_(False)
        self.decay, self.warmup, self.average_buffers = decay, warmup, average_buffers

    def decay_at(self, step: int) -> float:
        """α used at optimisation step ``step`` (pure)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update_(self, student: nn.Module, step: int) -> None:
        """teacher ← α·teacher + (1−α)·student, in place."""
        alpha = self.decay_at(step)
        teacher_params = list(self.module.parameters())
        student_params = list(student.parameters())
        if len(teacher_params) != len(student_params):
            raise ValueError("student and teacher have different parameter lists")
        pairs = [(t, s) for t, s in zip(teacher_params, student_params, strict=True)
                 if t.dtype.is_floating_point]
        if pairs:
            torch._foreach_lerp_([t for t, _ in pairs], [s.detach() for _, s in pairs], 1.0 - alpha)
        for t, s in zip(self.module.buffers(), student.buffers(), strict=True):
            if self.average_buffers and t.dtype.is_floating_point:
                t.lerp_(s, 1.0 - alpha)
            else:
                t.copy_(s)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
