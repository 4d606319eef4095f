"""Mask assembly: histogram of final positions → seeds → seed growth → per-pixel labels.

Same rules as cellpose 4.2's ``get_masks_torch``: positions are histogrammed on a grid padded by
20; seeds are 5×5 local maxima with more than 10 hits; each seed grows over its 11×11 window by
5 dilations restricted to bins with more than 2 hits; later (higher-count) seeds win overlaps;
each pixel takes its final position's label; masks over ``max_size_fraction`` of the image go.
"""

from __future__ import annotations

import fastremap
import numpy as np
import torch
import torch.nn.functional as F

from selfadapt_deploy.io.writers import label_dtype

RPAD = 20  # histogram padding: positions may converge just outside the image
SEED_WINDOW = 5  # local-maximum window for seeds
MIN_SEED_COUNT = 10  # a seed needs more hits than this
GROW_RADIUS = 5  # seeds grow within an 11×11 window ...
GROW_STEPS = 5  # ... by this many 3×3 dilations ...
MIN_GROW_COUNT = 2  # ... over bins with more hits than this


def _max_filter(h: torch.Tensor, size: int) -> torch.Tensor:
    """size×size maximum filter of N×H×W, edges see only in-bounds values."""
    return F.max_pool2d(h[:, None], size, stride=1, padding=size // 2)[:, 0]


def _seeds(hist: torch.Tensor) -> torch.Tensor:
    """S×2 bins with more than MIN_SEED_COUNT hits that equal the maximum of their 5×5 window.

    Same set as a 5×5 max filter over the whole histogram (cellpose), but only the few bins above
    the count threshold are examined: their windows are gathered (in-bounds neighbours only).
    """
    cand = torch.nonzero(hist > MIN_SEED_COUNT)
    if len(cand) == 0:
        return cand
    r = SEED_WINDOW // 2
    offs = torch.arange(-r, r + 1, device=hist.device)
    wy = (cand[:, 0, None, None] + offs[None, :, None]).expand(-1, -1, len(offs))
    wx = (cand[:, 1, None, None] + offs[None, None, :]).expand(-1, len(offs), -1)
    inside = (wy >= 0) & (wy < hist.shape[0]) & (wx >= 0) & (wx < hist.shape[1])
    window = torch.where(inside, hist[wy.clamp(0, hist.shape[0] - 1), wx.clamp(0, hist.shape[1] - 1)],
                         torch.tensor(float("-inf"), device=hist.device))
    window_max = window.flatten(1).amax(dim=1)
    return cand[hist[cand[:, 0], cand[:, 1]] - window_max > -1e-6]


@torch.no_grad()
def label_points(positions: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """(label 0..S of every point, S seeds) from final positions (2×N int-castable): histogram,
    seeds, seed growth; label 0 where a point's bin belongs to no seed."""
    device = positions.device
    ly, lx = shape
    hy, hx = ly + 2 * RPAD, lx + 2 * RPAD
    pos = positions.int() + RPAD
    pos[0].clamp_(0, ly + RPAD - 1)
    pos[1].clamp_(0, lx + RPAD - 1)
    flat = (pos[0] * hx + pos[1]).long()
    hist = torch.bincount(flat, minlength=hy * hx).reshape(hy, hx).float()

    seeds = _seeds(hist)
    if len(seeds) == 0:
        return torch.zeros_like(flat), 0
    seeds = seeds[hist[seeds[:, 0], seeds[:, 1]].argsort()]  # ascending count: stronger seeds win

    offs = torch.arange(-GROW_RADIUS, GROW_RADIUS + 1, device=device)
    win_y = seeds[:, 0, None, None] + offs[None, :, None]  # S×11×1
    win_x = seeds[:, 1, None, None] + offs[None, None, :]  # S×1×11
    counts = hist[win_y, win_x]  # S×11×11
    grown = torch.zeros_like(counts)
    grown[:, GROW_RADIUS, GROW_RADIUS] = 1
    for _ in range(GROW_STEPS):
        grown = _max_filter(grown, 3) * (counts > MIN_GROW_COUNT)

    s, gy, gx = torch.nonzero(grown, as_tuple=True)
    label_of_bin = torch.zeros(hy * hx, dtype=torch.int64, device=device)
    label_of_bin.scatter_reduce_(0, ((win_y[s, gy, 0]) * hx + win_x[s, 0, gx]).long(), s + 1,
                                 reduce="amax", include_self=False)
    return label_of_bin[flat], len(seeds)


def assemble_masks(inds: tuple[np.ndarray, np.ndarray], positions: torch.Tensor,
                   shape: tuple[int, int], max_size_fraction: float = 0.4) -> np.ndarray:
    """Label image (uint16/uint32, labels 1..N sequential) from final positions (2×N int-castable)."""
    ly, lx = shape
    point_labels, n_seeds = label_points(positions, shape)
    if n_seeds == 0:
        return np.zeros(shape, np.uint16)
    masks = np.zeros(shape, label_dtype(n_seeds))
    masks[inds] = point_labels.cpu().numpy()

    labels, counts_px = fastremap.unique(masks, return_counts=True)
    too_big = labels[(counts_px > ly * lx * max_size_fraction) & (labels != 0)]
    if len(too_big):
        masks = fastremap.mask(masks, too_big)
    fastremap.renumber(masks, in_place=True)
    return masks


def relabel_torch(masks: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """``fastremap.mask`` + ``renumber`` on a label tensor (any device): labels where ``drop``
    (bool, indexed by label) is true become 0, the rest 1..N in order of first appearance
    (row-major), as fastremap numbers them."""
    flat = masks.flatten().long()
    k = int(flat.max()) + 1 if flat.numel() else 1
    if drop is not None:
        flat = torch.where(drop[:k][flat], 0, flat)
    n = flat.numel()
    first = torch.full((k,), n, dtype=torch.int64, device=flat.device)
    first.scatter_reduce_(0, flat, torch.arange(n, device=flat.device), "amin")
    first[0] = -1  # background stays 0
    present = first < n
    order = torch.argsort(torch.where(present, first, n + 1))
    new = torch.zeros(k, dtype=torch.int64, device=flat.device)
    new[order] = torch.arange(k, device=flat.device)
    new = torch.where(present, new, 0)
    return new[flat].view(masks.shape)


@torch.no_grad()
def assemble_masks_torch(inds: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                         shape: tuple[int, int], max_size_fraction: float = 0.4) -> torch.Tensor:
    """:func:`assemble_masks` on the positions' device: a Y×X int64 label tensor, labels 1..N."""
    ly, lx = shape
    point_labels, n_seeds = label_points(positions, shape)
    masks = torch.zeros(shape, dtype=torch.int64, device=positions.device)
    if n_seeds == 0:
        return masks
    masks[inds] = point_labels
    counts = torch.bincount(masks.flatten(), minlength=n_seeds + 1)
    too_big = counts > ly * lx * max_size_fraction
    too_big[0] = False
    return relabel_torch(masks, too_big)
