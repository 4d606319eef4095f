"""Flow quality control: recompute flows from the masks, drop masks whose flows disagree.

Flows from masks follow cellpose 4.2's ``masks_to_flows_gpu``: heat diffusion from each mask's
centre (the pixel nearest its centroid) for 2·max(bbox height + width + 2) steps in float64,
gradients of the heat map, normalised to unit length. A mask's error is the mean over its pixels
of |flows_from_masks − net_flows/5|²; masks above ``flow_threshold`` are removed.
"""

from __future__ import annotations

import fastremap
import numpy as np
import torch
from scipy import ndimage

# 3×3 neighbourhood, centre first, then up, down, left, right, diagonals (cellpose's order)
NEIGHBOURS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


def mask_centres(masks: np.ndarray, slices: list[tuple[slice, slice]]) -> np.ndarray:
    """K×2 (y, x) per label 1..K: the rounded centroid, or the mask pixel nearest it if outside.

    The centroid is rounded (half to even) in bounding-box coordinates, as cellpose does.
    """
    lab = masks.ravel()
    ys, xs = np.indices(masks.shape).reshape(2, -1)
    fg = lab > 0
    lab, ys, xs = lab[fg].astype(np.int64), ys[fg], xs[fg]
    n = np.bincount(lab)[1:]
    y0 = np.array([s[0].start for s in slices])
    x0 = np.array([s[1].start for s in slices])
    cy = y0 + np.round(np.bincount(lab, ys)[1:] / n - y0).astype(np.int64)
    cx = x0 + np.round(np.bincount(lab, xs)[1:] / n - x0).astype(np.int64)
    centres = np.stack([cy, cx], axis=1)
    outside = masks[cy, cx] != np.arange(1, len(n) + 1)
    if outside.any():
        # nearest pixel, ties broken by row-major order (np.nonzero order), as cellpose does;
        # only the pixels of masks whose centroid lies outside them are searched
        sel = outside[lab - 1]
        lab, ys, xs = lab[sel], ys[sel], xs[sel]
        d2 = (ys - cy[lab - 1]) ** 2 + (xs - cx[lab - 1]) ** 2
        order = np.lexsort((ys * masks.shape[1] + xs, d2, lab))
        first = order[np.r_[0, np.flatnonzero(np.diff(lab[order])) + 1]]
        centres[lab[first] - 1] = np.stack([ys[first], xs[first]], axis=1)
    return centres


@torch.no_grad()
def _heat_torch(masks: np.ndarray, centres: np.ndarray, niter: int, device) -> np.ndarray:
    """Heat diffusion over the whole image at once (any torch device): Y×X float64."""
    ly, lx = masks.shape
    padded = torch.from_numpy(np.pad(masks.astype(np.int64), 1)).to(device)
    y, x = torch.nonzero(padded, as_tuple=True)
    wide = lx + 2
    nbr = torch.stack([(y + dy) * wide + (x + dx) for dy, dx in NEIGHBOURS])  # 9×P flat indices
    flat_lab = padded.view(-1)
    same = flat_lab[nbr] == flat_lab[nbr[0]][None]  # 9×P: neighbour inside the same mask
    c = torch.from_numpy(centres + 1).to(device)
    flat_centres = c[:, 0] * wide + c[:, 1]
    heat = torch.zeros(padded.numel(), dtype=torch.float64, device=device)
    for _ in range(niter):
        heat[flat_centres] += 1
        heat[nbr[0]] = (heat[nbr] * same).sum(dim=0) / len(NEIGHBOURS)
    return heat.view(ly + 2, lx + 2)[1:-1, 1:-1].cpu().numpy()


def _heat_numba(masks: np.ndarray, slices, centres: np.ndarray, niter: int) -> np.ndarray:
    """The same diffusion per mask inside its bounding box, masks in parallel (CPU)."""
    from selfadapt_deploy.postprocess.numba_kernels import mask_heat

    boxes = np.array([(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in slices], np.int64)
    return mask_heat(np.ascontiguousarray(masks), boxes, centres.astype(np.int64), niter)


def masks_to_flows(masks: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """2×Y×X unit flows (dY, dX) pointing towards each mask's centre; 0 outside masks.

    ``masks`` must be labelled 1..K without gaps. On the CPU the diffusion runs per mask (numba),
    elsewhere over the whole image (torch); both give cellpose's numbers.
    """
    ly, lx = masks.shape
    if masks.max() == 0:
        return np.zeros((2, ly, lx))
    slices = ndimage.find_objects(masks)
    niter = 2 * max(s[0].stop - s[0].start + s[1].stop - s[1].start + 2 for s in slices)
    centres = mask_centres(masks, slices)
    if torch.device(device).type == "cpu":
        heat = _heat_numba(masks, slices, centres, niter)
    else:
        heat = _heat_torch(masks, centres, niter, device)
    heat = np.pad(heat, 1)
    y, x = np.nonzero(masks)
    mu = np.stack([heat[y + 2, x + 1] - heat[y, x + 1], heat[y + 1, x + 2] - heat[y + 1, x]])
    mu /= 1e-60 + np.sqrt((mu**2).sum(axis=0))
    out = np.zeros((2, ly, lx))
    out[:, y, x] = mu
    return out


def flow_errors(masks: np.ndarray, flows: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Per-mask mean squared error between flows from the masks and the network's flows / 5."""
    err = ((masks_to_flows(masks, device) - flows / 5.0) ** 2).sum(axis=0)
    lab = masks.ravel()
    n = np.bincount(lab, minlength=masks.max() + 1)[1:]
    return np.bincount(lab, err.ravel(), minlength=masks.max() + 1)[1:] / np.maximum(n, 1)


def remove_bad_flow_masks(masks: np.ndarray, flows: np.ndarray, threshold: float = 0.4,
                          device: torch.device | str = "cpu") -> np.ndarray:
    """Drop masks whose flow error exceeds ``threshold``; relabel 1..N."""
    bad = 1 + np.flatnonzero(flow_errors(masks, flows, device) > threshold)
    masks = fastremap.mask(masks, bad)
    fastremap.renumber(masks, in_place=True)
    return masks
