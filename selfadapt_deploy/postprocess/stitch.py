"""Link the 2-D masks of consecutive planes into 3-D labels, exactly as cellpose 4.2's ``stitch3D``.

A plane's mask takes the label of the previous plane's mask it overlaps best when their IoU is at
least the threshold and it is that mask's best match; every other mask gets a new label. Planes
arrive one at a time (:class:`PlaneStitcher`), so a stack is linked without holding more than the
previous plane. cellpose's bookkeeping is kept on purpose, quirk included: until a first pair of
non-empty planes has been linked, an empty plane resets the label counter, so masks above and below
an early empty plane can share a label — the oracle's output, which this module reproduces.
"""

from __future__ import annotations

import fastremap
import numpy as np


def plane_iou(current: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of every mask of ``current`` (rows: labels 1..max) with every label present in
    ``previous`` (columns, ascending), and those labels: cellpose's ``_intersection_over_union``
    restricted to the columns that are not all zero (the others can never be chosen)."""
    n = int(current.max())
    labels = fastremap.unique(previous)
    if labels[0] != 0:  # no background in the plane: keep the column layout (0 first)
        labels = np.concatenate([[0], labels])
    column = np.zeros(int(labels[-1]) + 1, np.int64)
    column[labels] = np.arange(len(labels))
    pairs = current.astype(np.int64).ravel() * len(labels) + column[previous.ravel()]
    overlap = np.bincount(pairs, minlength=(n + 1) * len(labels)).reshape(n + 1, len(labels))
    area_prev = overlap.sum(axis=0, keepdims=True)
    area_cur = overlap.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = overlap / (area_prev + area_cur - overlap)
    iou[np.isnan(iou)] = 0.0
    return iou[1:, 1:], labels[1:]


class PlaneStitcher:
    """Feed the planes' label images in order to :meth:`add`; each comes back with its 3-D labels."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.previous: np.ndarray | None = None
        self.mmax = 0  # the highest label handed out, as cellpose counts it
        self.linked = False  # cellpose's ``empty``: a pair of non-empty planes has been linked

    def add(self, plane: np.ndarray) -> np.ndarray:
        plane = plane.astype(np.uint32, copy=False)
        if self.previous is None:
            self.previous, self.mmax = plane, int(plane.max())
            return plane
        iou, prev_labels = plane_iou(plane, self.previous)
        count = int(plane.max())
        if count == 0 or len(prev_labels) == 0:  # cellpose: ``not iou.size``
            if not self.linked:
                out, self.mmax = plane, count
            else:
                out = np.concatenate([[0], np.arange(self.mmax + 1, self.mmax + count + 1)]
                                     ).astype(np.uint32)[plane]
                self.mmax += count
        else:
            iou[iou < self.threshold] = 0.0
            iou[iou < iou.max(axis=0)] = 0.0
            best = iou.max(axis=1)
            lookup = prev_labels[iou.argmax(axis=1)].astype(np.int64)
            new = np.nonzero(best == 0.0)[0]
            lookup[new] = np.arange(self.mmax + 1, self.mmax + len(new) + 1)
            self.mmax += len(new)
            out = np.concatenate([[0], lookup]).astype(np.uint32)[plane]
            self.linked = True
        self.previous = out
        return out


def stitch_planes(masks: np.ndarray, threshold: float) -> np.ndarray:
    """Z×Y×X per-plane labels → 3-D labels (uint32), as ``cellpose.utils.stitch3D``."""
    stitcher = PlaneStitcher(threshold)
    return np.stack([stitcher.add(plane) for plane in masks])
