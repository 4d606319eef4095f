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
    """As cellpose's ``fill_holes_and_remove_small_masks``: size filter, fill holes, size filter;
    Y×X or Z×Y×X labels (sizes in pixels or voxels).

    A hole is any region of a mask's bounding box that the box border cannot reach without
    crossing the mask (4-connected in 2-D, 6-connected in 3-D); it is given to the mask (even where
    another, enclosed mask lay). One numba call fills every mask, in label order like cellpose's loop.
    """
    from selfadapt_deploy.postprocess.numba_kernels import fill_holes, fill_holes_3d

    masks = np.array(masks, order="C")  # a copy: the caller's array is left alone
    if min_size > 0:
        masks = remove_small_masks(masks, min_size)  # also relabels 1..K
    else:  # gaps: one box per label needs labels 1..K, kept in label order (cellpose's loop)
        present = fastremap.unique(masks)
        if len(present) - 1 < masks.max():
            masks = np.searchsorted(present, masks).astype(masks.dtype) if present[0] == 0 else \
                (np.searchsorted(present, masks) + 1).astype(masks.dtype)
    if masks.max() > 0:
        (fill_holes_3d if masks.ndim == 3 else fill_holes)(masks, mask_boxes(masks))
    if min_size > 0:
        masks = remove_small_masks(masks, min_size)
    return masks
