"""Instance-segmentation metrics: AP = TP/(TP+FP+FN) at IoU thresholds, Hungarian matching.

Numerically identical to ``cellpose.metrics.average_precision`` on sequentially labelled masks.
Labels are made sequential first: cellpose versions that count objects by the maximum label
silently inflate FN (or FP) on label images with gaps in their ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import fastremap
import numpy as np
from scipy.optimize import linear_sum_assignment

DEFAULT_THRESHOLDS = (0.5, 0.75, 0.9)


def relabel_sequential(masks: np.ndarray) -> np.ndarray:
    """Copy of ``masks`` with labels renumbered 1..N in order of first appearance; 0 stays 0."""
    out, _ = fastremap.renumber(np.asarray(masks), in_place=False)
    return out


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every (gt label, pred label) pair; both labelled 1..N without gaps. Shape n_gt×n_pred."""
    n_gt, n_pred = int(gt.max(initial=0)), int(pred.max(initial=0))
    pairs = gt.ravel().astype(np.int64) * (n_pred + 1) + pred.ravel()
    overlap = np.bincount(pairs, minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)
    area_gt, area_pred = overlap.sum(1, keepdims=True), overlap.sum(0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = overlap / (area_gt + area_pred - overlap)
    return np.nan_to_num(iou)[1:, 1:]


def true_positives(iou: np.ndarray, threshold: float) -> int:
    """Matched pairs with IoU ≥ threshold under the optimal one-to-one assignment."""
    if iou.size == 0:
        return 0
    n_min = min(iou.shape)
    costs = -(iou >= threshold).astype(float) - iou / (2 * n_min)
    rows, cols = linear_sum_assignment(costs)
    return int((iou[rows, cols] >= threshold).sum())


@dataclass(frozen=True)
class APResult:
    """Per-threshold AP, TP, FP, FN for one image pair."""

    thresholds: tuple[float, ...]
    ap: tuple[float, ...]
    tp: tuple[int, ...]
    fp: tuple[int, ...]
    fn: tuple[int, ...]

    @classmethod
    def from_counts(cls, thresholds, tp, fp, fn) -> APResult:
        """AP = TP/(TP+FP+FN) per threshold; no objects on either side is 0/0 → NaN, as cellpose."""
        ap = [t / (t + p + n) if t + p + n else float("nan")
              for t, p, n in zip(tp, fp, fn, strict=True)]
        return cls(tuple(thresholds), tuple(ap), tuple(tp), tuple(fp), tuple(fn))


def average_precision(gt: np.ndarray, pred: np.ndarray,
                      thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> APResult:
    """AP at each IoU threshold for one ground-truth / prediction pair of label images."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    gt, pred = relabel_sequential(gt), relabel_sequential(pred)
    n_gt, n_pred = int(gt.max(initial=0)), int(pred.max(initial=0))
    iou = iou_matrix(gt, pred)
    tp = [true_positives(iou, t) for t in thresholds]
    fp = [n_pred - t for t in tp]
    fn = [n_gt - t for t in tp]
    return APResult.from_counts(thresholds, tp, fp, fn)


def pooled(results: Sequence[APResult]) -> APResult:
    """Totals over images: AP from summed TP/FP/FN (cellpose reports per-image; this adds them)."""
    def total(counts: list[tuple[int, ...]]) -> list[int]:
        return [sum(c) for c in zip(*counts, strict=True)]

    return APResult.from_counts(results[0].thresholds, total([r.tp for r in results]),
                                total([r.fp for r in results]), total([r.fn for r in results]))
