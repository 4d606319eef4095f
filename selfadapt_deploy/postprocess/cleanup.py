"""Final clean-up: fill holes in each mask and drop masks smaller than ``min_size`` pixels."""

from __future__ import annotations

import fastremap
import numpy as np

from selfadapt_deploy.postprocess.flow_qc import mask_boxes


def remove_small_masks(masks: np.ndarray, min_size: int) -> np.ndarray:
    """Zero out masks with fewer than ``min_size`` pixels, relabel 1..N."""
    labels, counts = fastremap.unique(masks, return_counts=True)
    small = labels[(counts < min_size) & (labels != 0)]
    masks = fastremap.mask(masks, small)
    fastremap.renumber(masks, in_place=True)
    return masks


def fill_holes_and_remove_small(masks: np.ndarray, min_size: int = 15) -> np.ndarray:
    """As cellpose's ``fill_holes_and_remove_small_masks``: size filter, fill holes, size filter.

    A hole is any region of a mask's bounding box that the box border cannot reach without
    crossing the mask; it is given to the mask (even where another, enclosed mask lay). One numba
    call fills every mask, in label order like cellpose's loop.
    """
    from selfadapt_deploy.postprocess.numba_kernels import fill_holes

    masks = np.array(masks, order="C")  # a copy: the caller's array is left alone
    if min_size > 0:
        masks = remove_small_masks(masks, min_size)  # also relabels 1..K
    elif len(fastremap.unique(masks)) - 1 < masks.max():
        fastremap.renumber(masks, in_place=True)  # gaps: one box per label needs labels 1..K
    if masks.max() > 0:
        fill_holes(masks, mask_boxes(masks))
    if min_size > 0:
        masks = remove_small_masks(masks, min_size)
    return masks
