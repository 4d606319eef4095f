"""Final clean-up: fill holes in each mask and drop masks smaller than ``min_size`` pixels."""

from __future__ import annotations

import fastremap
import fill_voids
import numpy as np
from scipy import ndimage


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
    crossing the mask; it is given to the mask (even where another, enclosed mask lay).
    """
    if min_size > 0:
        masks = remove_small_masks(masks, min_size)
    for label, box in enumerate(ndimage.find_objects(masks), start=1):
        if box is not None:
            filled = fill_voids.fill(masks[box] == label)
            masks[box][filled] = label
    if min_size > 0:
        masks = remove_small_masks(masks, min_size)
    return masks
