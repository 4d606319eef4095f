"""Flow quality control: recompute flows from the masks, drop masks whose flows disagree.

Flows from masks follow cellpose 4.2's ``masks_to_flows_gpu``: heat diffusion from each mask's
centre (its rounded centroid, or the mask pixel nearest it) for 2·max(bbox height + width + 2)
steps in float64, gradients of the heat map, normalised to unit length. A mask's error is the mean
over its pixels of |flows_from_masks − net_flows/5|²; masks above ``flow_threshold`` are removed.
On the CPU every step runs per mask in numba kernels (masks in parallel); on other devices the
diffusion and the per-mask sums run over the whole image in torch.
"""

from __future__ import annotations

import fastremap
import numpy as np
import torch
from scipy import ndimage

# 3×3 neighbourhood, centre first, then up, down, left, right, diagonals (cellpose's order)
NEIGHBOURS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """K×4 int64 bounding boxes (y0, y1, x0, x1) of labels 1..K (labels must have no gaps)."""
    slices = ndimage.find_objects(masks)
    if any(s is None for s in slices):
        raise ValueError("masks must be labelled 1..K without gaps (renumber them first)")
    return np.array([(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in slices], np.int64)


def diffusion_steps(boxes: np.ndarray) -> int:
    """cellpose's number of heat-diffusion sweeps: twice the largest bbox height + width + 2."""
    return int(2 * (boxes[:, 1] - boxes[:, 0] + boxes[:, 3] - boxes[:, 2] + 2).max())


@torch.no_grad()
def _heat_torch(masks: np.ndarray, centres: np.ndarray, niter: int, device) -> torch.Tensor:
    """Heat diffusion over the whole image at once (any torch device): (Y+2)×(X+2) float64."""
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
    return heat.view(ly + 2, lx + 2)


def heat_map(masks: np.ndarray, boxes: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """cellpose's heat diffusion from every mask's centre: (Y+2)×(X+2) float64 on ``device``.

    On the CPU it runs per mask in its bounding box (numba, masks in parallel); elsewhere over
    the whole image (torch). Both give cellpose's numbers.
    """
    from selfadapt_deploy.postprocess.numba_kernels import mask_centres, mask_heat

    masks = np.ascontiguousarray(masks)
    centres = mask_centres(masks, boxes)
    if torch.device(device).type == "cpu":
        return torch.from_numpy(mask_heat(masks, boxes, centres, diffusion_steps(boxes)))
    return _heat_torch(masks, centres, diffusion_steps(boxes), device)


def masks_to_flows(masks: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """2×Y×X unit flows (dY, dX) pointing towards each mask's centre; 0 outside masks.

    Any labelling works (gaps included): flows depend only on which pixels share a label.
    """
    ly, lx = masks.shape
    if masks.max() == 0:
        return np.zeros((2, ly, lx))
    masks, _ = fastremap.renumber(masks)  # a relabelled copy 1..K: one bounding box per label
    heat = heat_map(masks, mask_boxes(masks), device).cpu().numpy()
    y, x = np.nonzero(masks)
    mu = np.stack([heat[y + 2, x + 1] - heat[y, x + 1], heat[y + 1, x + 2] - heat[y + 1, x]])
    mu /= 1e-60 + np.sqrt((mu**2).sum(axis=0))
    out = np.zeros((2, ly, lx))
    out[:, y, x] = mu
    return out


@torch.no_grad()
def _flow_errors_torch(masks: np.ndarray, heat: torch.Tensor, flows: np.ndarray) -> np.ndarray:
    """Per-mask mean error as segmented sums over mask pixels (any torch device)."""
    lab = torch.from_numpy(masks.astype(np.int64)).to(heat.device)
    y, x = torch.nonzero(lab, as_tuple=True)
    mu = torch.stack([heat[y + 2, x + 1] - heat[y, x + 1], heat[y + 1, x + 2] - heat[y + 1, x]])
    mu /= 1e-60 + mu.square().sum(dim=0).sqrt()
    net = torch.from_numpy(flows).to(heat.device)[:, y, x] / 5.0
    err = (mu - net.double()).square().sum(dim=0)
    k = int(masks.max()) + 1
    lab = lab[y, x]
    sums = torch.zeros(k, dtype=torch.float64, device=heat.device).index_add_(0, lab, err)
    return (sums / torch.bincount(lab, minlength=k))[1:].cpu().numpy()


def flow_errors(masks: np.ndarray, flows: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Per-mask mean squared error between flows from the masks and the network's flows / 5
    (cellpose's ``flow_error``); ``masks`` labelled 1..K without gaps."""
    boxes = mask_boxes(masks)
    heat = heat_map(masks, boxes, device)
    if heat.device.type != "cpu":
        return _flow_errors_torch(masks, heat, flows)
    from selfadapt_deploy.postprocess.numba_kernels import mask_flow_errors

    return mask_flow_errors(np.ascontiguousarray(masks), heat.numpy(), np.ascontiguousarray(flows),
                            boxes, flows.dtype.type(5))


def remove_bad_flow_masks(masks: np.ndarray, flows: np.ndarray, threshold: float = 0.4,
                          device: torch.device | str = "cpu") -> np.ndarray:
    """Drop masks whose flow error exceeds ``threshold``; relabel 1..N."""
    bad = 1 + np.flatnonzero(flow_errors(masks, flows, device) > threshold)
    masks = fastremap.mask(masks, bad)
    fastremap.renumber(masks, in_place=True)
    return masks
