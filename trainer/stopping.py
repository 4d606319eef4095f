"""Label-free early stopping (DESIGN.md §2 step 5), monitors in the style of Lightning's.

Both signals grow with training time and are measured every K iterations on held-out unlabeled
images against the pretrained model θ0:

* FN rate = FN / (TP + FN): instances of θ0's masks matched (IoU ≥ 0.5) by θt's masks are TP;
  stop when it reaches τ_FN = 0.05.
* D_emb = mean over images of ‖E(x; θt) − E(x; θ0)‖₂ (L2-normalised pooled bottleneck); stop
  when it reaches τ_emb = 0.5.

The selected model is the last snapshot evaluated *before* a threshold was crossed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from selfadapt_deploy.metrics import iou_matrix, relabel_sequential, true_positives

TAU_FN = 0.05
TAU_EMB = 0.5


def fn_rate(reference: Sequence[np.ndarray], current: Sequence[np.ndarray]) -> float:
    """FN/(TP+FN) of θ0's instances (``reference``) not matched at IoU ≥ 0.5 by θt's masks."""
    tp = fn = 0
    for ref, cur in zip(reference, current, strict=True):
        ref, cur = relabel_sequential(ref), relabel_sequential(cur)
        matched = true_positives(iou_matrix(ref, cur), 0.5)
        tp, fn = tp + matched, fn + int(ref.max(initial=0)) - matched
    return fn / (tp + fn) if tp + fn else 0.0


def embedding_distance(current: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean L2 distance between per-image embeddings (N×D each)."""
    return float((current - reference).norm(dim=1).mean())


@dataclass
class ThresholdMonitor:
    """Stops when ``name`` reaches ``threshold``; remembers the last step below it."""

    name: str
    threshold: float
    history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None  # last evaluated step still below the threshold

    def update(self, metrics: dict[str, float], step: int) -> tuple[bool, str]:
        """(should_stop, reason). Raises if the metric is missing; stops on NaN/inf."""
        if self.name not in metrics:
            raise KeyError(f"monitor '{self.name}' found no such metric; available: "
                           f"{', '.join(sorted(metrics))}")
        value = float(metrics[self.name])
        self.history.append((step, value))
        if not math.isfinite(value):
            return True, f"{self.name} is {value} at iteration {step}"
        if value >= self.threshold:
            return True, (f"{self.name} = {value:.4f} reached {self.threshold} at iteration {step}; "
                          f"selected iteration {self.best_step}")
        self.best_step = step
        return False, ""

    def state_dict(self) -> dict:
        return {"history": list(self.history), "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state["history"]]
        self.best_step = state["best_step"]


def monitors_for(stop: str, tau_fn: float = TAU_FN, tau_emb: float = TAU_EMB) -> list[ThresholdMonitor]:
    """Monitors for ``--stop emb|fn|both|none``."""
    choices = {"fn": ["fn"], "emb": ["emb"], "both": ["fn", "emb"], "none": []}
    if stop not in choices:
        raise ValueError(f"--stop must be one of {', '.join(choices)}, got '{stop}'")
    make = {"fn": lambda: ThresholdMonitor("fn_rate", tau_fn),
            "emb": lambda: ThresholdMonitor("d_emb", tau_emb)}
    return [make[m]() for m in choices[stop]]
