"""Label-free stopping and snapshot selection, monitors in the style of Lightning's.

Signals measured every K iterations on held-out unlabeled images (all logged in ``metrics.csv``):

* FN rate = FN / (TP + FN) of θ0's instances not matched (IoU ≥ 0.5) by θt's masks, and
  D_emb = mean ‖E(x; θt) − E(x; θ0)‖₂ of L2-normalised pooled bottlenecks (DESIGN.md §2 step 5).
  The paper's rules (``--stop fn|emb|both``) stop when one reaches τ_FN = 0.05 / τ_emb = 0.5 and
  select the last snapshot before it. Both measure distance from θ0, not quality: an improving
  model stops reproducing θ0's fragmented masks (FN rate up) and moves its embedding (D_emb up).
* flow error: cellpose's own mask quality check — how well the flows a mask implies agree with the
  network's flows — over the masks the flows give without QC (:func:`flow_error`). No method
  trains on it; ``--stop flow`` selects the snapshot with the lowest (:class:`BestMonitor`). On
  the selection benchmark (``benchmarks/selection_rules.py``) it also rose while AP rose, so it is
  not the default.
* TTA spread (disagreement across the 8 D4 views) and agreement with the previous snapshot's
  masks: logged for inspection (SelfAdapt trains towards the TTA ensemble, so its spread falls in
  almost every run, whatever happens to quality).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from selfadapt_deploy.metrics import iou_matrix, relabel_sequential, true_positives
from selfadapt_deploy.models.base import ModelSpec, evaluating
from selfadapt_deploy.postprocess import flows_to_masks
from selfadapt_deploy.postprocess.flow_qc import flow_errors
from selfadapt_deploy.segment import Segmentation, SegmentParams, mask_params, rescale_factor
from selfadapt_deploy.trainer.stop_rules import TAU_EMB, TAU_FN
from selfadapt_deploy.trainer.teacher import teacher_predict

FLOW_MIN_DELTA = 0.02  # a flow error counts as better when at least 2 % lower (--stop flow, guards)


def fn_rate(reference: Sequence[np.ndarray], current: Sequence[np.ndarray]) -> float:
    """FN/(TP+FN) of θ0's instances (``reference``) not matched at IoU ≥ 0.5 by θt's masks."""
    tp = fn = 0
    for ref, cur in zip(reference, current, strict=True):
        ref, cur = relabel_sequential(ref), relabel_sequential(cur)
        matched = true_positives(iou_matrix(ref, cur), 0.5)
        tp, fn = tp + matched, fn + int(ref.max(initial=0)) - matched
    return fn / (tp + fn) if tp + fn else 0.0


def mask_agreement(previous: Sequence[np.ndarray], current: Sequence[np.ndarray],
                   iou: float = 0.5) -> float:
    """F1 at IoU ≥ ``iou`` between two sets of label images (1.0 when both are empty): how much
    the masks changed between two snapshots, or under a perturbation."""
    tp = n = 0
    for a, b in zip(previous, current, strict=True):
        a, b = relabel_sequential(a), relabel_sequential(b)
        tp += true_positives(iou_matrix(a, b), iou)
        n += int(a.max(initial=0)) + int(b.max(initial=0))
    return 2 * tp / n if n else 1.0


def flow_error(segs: Sequence[Segmentation], spec: ModelSpec, params: SegmentParams) -> float:
    """Flow self-consistency: cellpose's per-mask flow error (squared difference between the flows a
    mask implies and the network's flows / 5) averaged over mask pixels, on the masks the flows give
    *without* flow QC — QC would drop exactly the merged and fragmented masks this should see. No
    method trains on it (pseudo-labels are flows, not masks). NaN when there are no masks."""
    raw = mask_params(replace(params, flow_threshold=0.0), rescale_factor(spec, params.diameter))
    total = pixels = 0.0
    for seg in segs:
        masks = flows_to_masks(seg.flows, seg.cellprob, raw)
        if masks.max() == 0:
            continue
        sizes = np.bincount(masks.ravel())[1:]
        total += float(flow_errors(masks, seg.flows) @ sizes)
        pixels += float(sizes.sum())
    return total / pixels if pixels else math.nan


@torch.no_grad()
def tta_spread(net: torch.nn.Module, tiles: torch.Tensor) -> float:
    """Mean standard deviation of the flows across the 8 D4 views, over pixels the ensemble calls
    cells (probability > 0.5): how much the network disagrees with itself under flips/rotations."""
    with evaluating(net):
        out = teacher_predict(net, tiles.to(next(net.parameters()).device))
    cells = out.prob > 0.5
    return float(out.flows_std.mean(dim=1)[cells].mean()) if bool(cells.any()) else math.nan


def embedding_distance(current: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean L2 distance between per-image embeddings (N×D each)."""
    return float((current - reference).norm(dim=1).mean())


def _read(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise KeyError(f"monitor '{name}' found no such metric; available: {', '.join(sorted(metrics))}")
    return float(metrics[name])


@dataclass
class ThresholdMonitor:
    """Stops when ``name`` reaches ``threshold``; selects the last step below it."""

    name: str
    threshold: float
    history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None  # last evaluated step still below the threshold

    def update(self, metrics: dict[str, float], step: int) -> tuple[bool, str]:
        """(should_stop, reason). Raises if the metric is missing; stops on NaN/inf."""
        value = _read(metrics, self.name)
        self.history.append((step, value))
        if not math.isfinite(value):
            return True, f"{self.name} is {value} at iteration {step}"
        if value >= self.threshold:
            return True, (f"{self.name} = {value:.4f} reached {self.threshold} at iteration {step}; "
                          f"selected iteration {self.best_step}")
        self.best_step = step
        return False, ""

    def selected(self, last: int) -> int:
        """The snapshot this monitor deploys when evaluations ended at ``last``."""
        return (self.best_step or 0) if self.history else last

    def summary(self) -> str:
        return f"{self.name} stayed below {self.threshold}"

    def state_dict(self) -> dict:
        return {"history": list(self.history), "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state["history"]]
        self.best_step = state["best_step"]


@dataclass
class BestMonitor:
    """Selects the step where ``name`` is lowest — a new lowest must beat the best so far by the
    fraction ``min_delta`` — and stops after ``patience`` evaluations without one (Lightning's
    EarlyStopping, mode min). Non-finite values never count as an improvement."""

    name: str
    patience: int = 4
    min_delta: float = FLOW_MIN_DELTA
    history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_value: float = math.inf
    wait: int = 0

    def update(self, metrics: dict[str, float], step: int) -> tuple[bool, str]:
        value = _read(metrics, self.name)
        self.history.append((step, value))
        improved = math.isfinite(value) and value < self.best_value * (1 - self.min_delta)
        if self.best_step is None or improved:
            self.best_step, self.wait = step, 0
            self.best_value = value if math.isfinite(value) else math.inf
            return False, ""
        self.wait += 1
        if self.wait >= self.patience:
            return True, (f"{self.name} did not improve on {self.best_value:.4f} by "
                          f"{self.min_delta:.0%} in {self.patience} evaluations (iteration {step}); "
                          f"selected iteration {self.best_step}")
        return False, ""

    def selected(self, last: int) -> int:
        return last if self.best_step is None else self.best_step

    def summary(self) -> str:
        return f"lowest {self.name} ({self.best_value:.4f}) at iteration {self.best_step}"

    def state_dict(self) -> dict:
        return {"history": list(self.history), "best_step": self.best_step,
                "best_value": self.best_value, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state["history"]]
        self.best_step, self.best_value, self.wait = state["best_step"], state["best_value"], state["wait"]


Monitor = ThresholdMonitor | BestMonitor


def monitors_for(stop: str, tau_fn: float = TAU_FN, tau_emb: float = TAU_EMB) -> list[Monitor]:
    """Monitors for ``--stop fn|emb|both|flow|none``."""
    choices = {"fn": ["fn"], "emb": ["emb"], "both": ["fn", "emb"], "flow": ["flow"], "none": []}
    if stop not in choices:
        raise ValueError(f"--stop must be one of {', '.join(choices)}, got '{stop}'")
    make = {"fn": lambda: ThresholdMonitor("fn_rate", tau_fn),
            "emb": lambda: ThresholdMonitor("d_emb", tau_emb),
            "flow": lambda: BestMonitor("flow_err")}
    return [make[m]() for m in choices[stop]]


def selected_iteration(monitors: Sequence[Monitor], last: int) -> int:
    """The snapshot the label-free rule deploys once evaluations end at iteration ``last``: the
    earliest of the monitors' selections; ``last`` without monitors (``--stop none``)."""
    return min((m.selected(last) for m in monitors), default=last)
