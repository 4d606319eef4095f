"""Flow quality control: recompute flows from the masks, drop masks whose flows disagree.

Flows from masks follow cellpose 4.2's ``masks_to_flows_gpu``: heat diffusion from each mask's
centre (its rounded centroid, or the mask pixel nearest it) for 2·max(bbox height + width + 2)
steps in float64, gradients of the heat map, normalised to unit length. A mask's error is the mean
over its pixels of |flows_from_masks − net_flows/5|²; masks above ``flow_threshold`` are removed.
On the CPU every step runs per mask in numba kernels (masks in parallel); on other devices (and
in the device-resident pipeline) in torch, with the diffusion batched over crops of masks.
"""

from __future__ import annotations

import fastremap
import numpy as np
import torch
from scipy import ndimage

# 3×3 neighbourhood, centre first, then up, down, left, right, diagonals (cellpose's order)
NEIGHBOURS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """K×2D int64 bounding boxes of labels 1..K, start and stop per axis — (y0, y1, x0, x1) in 2-D,
    (z0, z1, y0, y1, x0, x1) in 3-D (labels must have no gaps)."""
    slices = ndimage.find_objects(masks)
    if any(s is None for s in slices):
        raise ValueError("masks must be labelled 1..K without gaps (renumber them first)")
    return np.array([[b for axis in s for b in (axis.start, axis.stop)] for s in slices],
                    np.int64).reshape(len(slices), 2 * masks.ndim)


def diffusion_steps(boxes: np.ndarray) -> int:
    """cellpose's number of heat-diffusion sweeps: twice the largest bbox height + width + 2."""
    return int(2 * (boxes[:, 1] - boxes[:, 0] + boxes[:, 3] - boxes[:, 2] + 2).max())


def mask_geometry(labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For a Y×X label tensor (labels 1..K, no gaps) on any device: the mask pixels' (y, x), their
    label index 0..K−1, K×4 int64 boxes (y0, y1, x0, x1) and K×2 centres as :func:`mask_centres`
    (rounded mean position, half to even; the nearest mask pixel when that is outside the mask)."""
    y, x = torch.nonzero(labels, as_tuple=True)
    lab = labels[y, x].long() - 1
    k = int(lab.max()) + 1
    big = torch.iinfo(torch.int64).max

    def extreme(v: torch.Tensor, fill: int, how: str) -> torch.Tensor:
        return torch.full((k,), fill, dtype=torch.int64, device=v.device).scatter_reduce_(
            0, lab, v, how, include_self=False)

    boxes = torch.stack([extreme(y, big, "amin"), extreme(y, -1, "amax") + 1,
                         extreme(x, big, "amin"), extreme(x, -1, "amax") + 1], dim=1)
    n = torch.bincount(lab, minlength=k).double()
    sums = torch.zeros((k, 2), dtype=torch.int64, device=y.device)
    sums.index_add_(0, lab, torch.stack([y - boxes[lab, 0], x - boxes[lab, 2]], dim=1))
    centres = (sums.double() / n[:, None]).round().long() + boxes[:, [0, 2]]
    outside = labels[centres[:, 0], centres[:, 1]].long() - 1 != torch.arange(k, device=y.device)
    for m in torch.nonzero(outside).flatten().tolist():  # concave masks: rare, a few pixels each
        sel = lab == m  # row-major order, so argmin's first minimum is the reference's tie-break
        d2 = (y[sel] - centres[m, 0]) ** 2 + (x[sel] - centres[m, 1]) ** 2
        i = int(torch.argmin(d2))
        centres[m] = torch.stack([y[sel][i], x[sel][i]])
    return y, x, lab, boxes, centres


def _heat_bucket(inside: torch.Tensor, centres: torch.Tensor, niter: int) -> torch.Tensor:
    """The sweeps of :func:`numba_kernels.mask_heat` on n crops at once: inside n×T×T (1.0 on the
    mask, with a margin of zeros), centres n×2 in crop coordinates; same sum order, same numbers."""
    a, b = torch.zeros_like(inside), torch.zeros_like(inside)
    slot = torch.arange(len(inside), device=inside.device)
    ins = inside[:, 1:-1, 1:-1]
    for _ in range(niter):
        a[slot, centres[:, 0], centres[:, 1]] += 1.0
        up, mid, down = a[:, :-2], a[:, 1:-1], a[:, 2:]
        s = (mid[..., 1:-1] + up[..., 1:-1] + down[..., 1:-1] + mid[..., :-2] + mid[..., 2:]
             + up[..., :-2] + up[..., 2:] + down[..., :-2] + down[..., 2:])
        b[:, 1:-1, 1:-1] = s / 9.0 * ins
        a, b = b, a
    return a


HEAT_BUDGET = 2**24  # float64 elements per crop batch (128 MiB); larger buckets run in chunks


@torch.no_grad()
def heat_map_torch(labels: torch.Tensor, niter: int | None = None) -> torch.Tensor:
    """cellpose's heat diffusion for a Y×X label tensor (labels 1..K) on its device, batched over
    masks: each mask runs in its own bounding-box crop, crops of similar size (power-of-two
    buckets) as one batch — never the whole image. (Y+2)×(X+2) float64, equal to the CPU kernel's."""
    ly, lx = labels.shape
    heat = torch.zeros((ly + 2) * (lx + 2), dtype=torch.float64, device=labels.device)
    if labels.max() == 0:
        return heat.view(ly + 2, lx + 2)
    y, x, lab, boxes, centres = mask_geometry(labels)
    size = torch.maximum(boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]) + 2
    if niter is None:
        niter = int(2 * (boxes[:, 1] - boxes[:, 0] + boxes[:, 3] - boxes[:, 2] + 2).max())
    bucket = torch.clamp(torch.ceil(torch.log2(size.double())), min=3).long()
    for e in torch.unique(bucket).tolist():
        side = 2**e
        members = torch.nonzero(bucket == e).flatten()
        for chunk in torch.split(members, max(1, HEAT_BUDGET // side**2)):
            slot_of = torch.full((len(boxes),), -1, dtype=torch.int64, device=labels.device)
            slot_of[chunk] = torch.arange(len(chunk), device=labels.device)
            pix = torch.nonzero(torch.isin(lab, chunk)).flatten()
            m = lab[pix]
            cy, cx = y[pix] - boxes[m, 0] + 1, x[pix] - boxes[m, 2] + 1
            inside = torch.zeros((len(chunk), side, side), dtype=torch.float64, device=labels.device)
            inside[slot_of[m], cy, cx] = 1.0
            crop_centres = centres[chunk] - boxes[chunk][:, [0, 2]] + 1
            crops = _heat_bucket(inside, crop_centres, niter)
            heat[(y[pix] + 1) * (lx + 2) + x[pix] + 1] = crops[slot_of[m], cy, cx]
    return heat.view(ly + 2, lx + 2)


def heat_map(masks: np.ndarray, boxes: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """cellpose's heat diffusion from every mask's centre: (Y+2)×(X+2) float64 on ``device``.

    On the CPU it runs per mask in its bounding box (numba, masks in parallel); elsewhere in
    torch, crops of masks batched (:func:`heat_map_torch`). Both give cellpose's numbers.
    """
    from selfadapt_deploy.postprocess.numba_kernels import mask_centres, mask_heat

    masks = np.ascontiguousarray(masks)
    if torch.device(device).type == "cpu":
        centres = mask_centres(masks, boxes)
        return torch.from_numpy(mask_heat(masks, boxes, centres, diffusion_steps(boxes)))
    return heat_map_torch(torch.from_numpy(masks.astype(np.int64)).to(device), diffusion_steps(boxes))


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
def flow_errors_torch(labels: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
    """Per-mask mean error (K float64) for a Y×X label tensor (1..K, no gaps) and the network's
    2×Y×X flows, on their device: batched heat diffusion, then segmented sums over mask pixels."""
    heat = heat_map_torch(labels)
    y, x = torch.nonzero(labels, as_tuple=True)
    mu = torch.stack([heat[y + 2, x + 1] - heat[y, x + 1], heat[y + 1, x + 2] - heat[y + 1, x]])
    mu /= 1e-60 + mu.square().sum(dim=0).sqrt()
    net = flows[:, y, x] / 5.0  # in the flows' dtype, as numpy's flows / 5.
    err = (mu - net.double()).square().sum(dim=0)
    lab = labels[y, x].long() - 1
    k = int(labels.max())
    sums = torch.zeros(k, dtype=torch.float64, device=heat.device).index_add_(0, lab, err)
    return sums / torch.bincount(lab, minlength=k)


def flow_errors(masks: np.ndarray, flows: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Per-mask mean squared error between flows from the masks and the network's flows / 5
    (cellpose's ``flow_error``); ``masks`` labelled 1..K without gaps."""
    if torch.device(device).type != "cpu":
        labels = torch.from_numpy(masks.astype(np.int64)).to(device)
        net = torch.from_numpy(np.ascontiguousarray(flows)).to(device)
        return flow_errors_torch(labels, net).cpu().numpy()
    from selfadapt_deploy.postprocess.numba_kernels import mask_flow_errors

    boxes = mask_boxes(masks)
    heat = heat_map(masks, boxes, device)
    return mask_flow_errors(np.ascontiguousarray(masks), heat.numpy(), np.ascontiguousarray(flows),
                            boxes, flows.dtype.type(5))


def remove_bad_flow_masks(masks: np.ndarray, flows: np.ndarray, threshold: float = 0.4,
                          device: torch.device | str = "cpu") -> np.ndarray:
    """Drop masks whose flow error exceeds ``threshold``; relabel 1..N."""
    bad = 1 + np.flatnonzero(flow_errors(masks, flows, device) > threshold)
    masks = fastremap.mask(masks, bad)
    fastremap.renumber(masks, in_place=True)
    return masks
