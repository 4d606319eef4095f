"""3-D flows → masks, as cellpose 4.2's ``compute_masks(do_3D=True)`` (the torch reference path).

Flow following is cellpose's ``steps_interp`` in 3-D: every foreground voxel walks ``niter`` Euler
steps through the trilinear ``grid_sample`` of the (dX, dY, dZ) field in normalised coordinates,
clamped to the volume, in float32 with cellpose's order of operations — on the CPU by the numba
kernel (bit-identical; voxels that have met at bit-identical positions walked once), on CUDA by
the fused Triton kernel (one launch; ``triton_kernels.integrate_field_3d``). Mask assembly is
``get_masks_torch`` in 3-D (:mod:`postprocess.masks` holds its 2-D rules): a histogram of final
positions padded by 20, seeds at 5×5×5 maxima above 10 hits, grown over 11³ windows by five 3×3×3
dilations on bins above 2 hits, later (higher-count) seeds winning; masks over
``max_size_fraction`` of the volume are dropped. There is no flow QC in 3-D (cellpose documents
``flow_threshold`` as unused there); holes are filled and small masks dropped in 3-D. Everything
up to the label volume runs on the device of the flows' tensors (the CPU, or CUDA).
"""

from __future__ import annotations

import fastremap
import numpy as np
import torch
import torch.nn.functional as F

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.writers import label_dtype
from selfadapt_deploy.postprocess import MaskParams
from selfadapt_deploy.postprocess.cleanup import fill_holes_and_remove_small
from selfadapt_deploy.postprocess.integrate import resolve_integrator, triton_block, walk_merging
from selfadapt_deploy.postprocess.masks import (
    GROW_RADIUS,
    GROW_STEPS,
    MIN_GROW_COUNT,
    MIN_SEED_COUNT,
    RPAD,
    SEED_WINDOW,
)


def _steps_torch(im: torch.Tensor, pt: torch.Tensor, niter: int) -> torch.Tensor:
    """cellpose's ``steps_interp`` loop in 3-D: one ``grid_sample`` of all points per step."""
    for _ in range(niter):
        step = F.grid_sample(im, pt, align_corners=False)  # 1×3×1×1×N
        for k in range(3):
            pt[..., k] += step[:, k]
            torch.clamp_(pt[..., k], -1.0, 1.0)
    return pt


def _steps_numba(im: torch.Tensor, pt: torch.Tensor, niter: int) -> torch.Tensor:
    """The same walk in the numba kernel (channels last, a border of zeros), each group of points
    at bit-identical positions walked once (:func:`walk_merging`)."""
    from selfadapt_deploy.postprocess.numba_kernels import integrate_field_3d

    field = np.zeros((*(n + 2 for n in im.shape[2:]), 3), np.float32)
    field[1:-1, 1:-1, 1:-1] = im[0].permute(1, 2, 3, 0).numpy()
    final = walk_merging(lambda pts, _, n: integrate_field_3d(field, pts, n),
                         np.ascontiguousarray(pt[0, 0, 0].numpy()), niter)
    return torch.from_numpy(final)[None, None, None]


def _steps_triton(im: torch.Tensor, pt: torch.Tensor, niter: int) -> torch.Tensor:
    """The same walk in the fused Triton kernel: every voxel through every step in one launch."""
    from selfadapt_deploy.postprocess.triton_kernels import integrate_field_3d

    start = pt[0, 0, 0]
    return integrate_field_3d(im[0], start, niter, triton_block(len(start)))[None, None, None]


_STEPS = {"torch": _steps_torch, "numba": _steps_numba, "triton": _steps_triton}


@torch.no_grad()
def follow_flows_3d(flows: np.ndarray | torch.Tensor, cellprob: np.ndarray | torch.Tensor,
                    threshold: float, niter: int, integrator: str = "auto",
                    device: torch.device | str = "cpu",
                    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """flows 3×Z×Y×X (dZ, dY, dX; network units), cellprob Z×Y×X → (foreground (z, y, x) index
    tensors, 3×N float32 final positions (z, y, x) in voxels), all on ``device``, where every step
    runs. ``integrator`` as for 2-D (``integrate.resolve_integrator``): numba on the CPU (``auto``;
    bit-identical to the torch reference), triton on CUDA (``auto``), torch (cellpose's
    ``steps_interp``) on either."""
    device = torch.device(device)
    method = resolve_integrator(integrator, device)
    flows = torch.as_tensor(flows).to(device, torch.float32)
    cellprob = torch.as_tensor(cellprob).to(device)
    fg = cellprob > threshold
    inds = torch.nonzero(fg, as_tuple=True)
    shape = [float(n - 1) for n in cellprob.shape[::-1]]  # (x, y, z) extents
    field = (flows * fg).div_(5.0)  # cellpose's dP * mask / 5 (float32)
    if not bool(torch.isfinite(field.sum())):  # NaN and ±inf survive a sum: one cheap pass
        raise SaDeployError("the network's flows contain NaN or infinite values inside cells; the "
                            "model or the input stack is broken, or reduced precision overflowed "
                            "(try --precision fp32)")
    im = field.flip(0)[None]  # 1×3×Z×Y×X (x, y, z); flip copies
    pt = torch.stack([i.float() for i in inds[::-1]], dim=-1)[None, None, None]
    for k in range(3):
        im[:, k] *= 2.0 / shape[k]
        pt[..., k] /= shape[k]
    pt = pt * 2 - 1
    pt = _STEPS[method](im, pt, niter).to(device)
    pt = (pt + 1) * 0.5
    for k in range(3):
        pt[..., k] *= shape[k]
    return inds, pt[0, 0, 0].flip(-1).T.contiguous()


def _max_filter_3d(h: torch.Tensor, size: int) -> torch.Tensor:
    """size³ maximum filter of N×Z×Y×X, edges seeing only in-bounds values: one 1-D maximum per
    axis (a box maximum is separable, exactly; as cellpose's ``max_pool_nd``), far faster on the
    CPU than ``max_pool3d``."""
    for axis in (1, 2, 3):
        moved = h.movedim(axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        pooled = F.max_pool1d(flat, size, stride=1, padding=size // 2).reshape(moved.shape)
        h = pooled.movedim(-1, axis)
    return h.contiguous()


@torch.no_grad()
def assemble_masks_3d(inds: tuple[torch.Tensor | np.ndarray, ...], positions: torch.Tensor,
                      shape: tuple[int, int, int], max_size_fraction: float = 0.4) -> np.ndarray:
    """Z×Y×X labels (1..N in order of appearance) from final positions (3×N), computed on the
    positions' device; the label volume crosses to the host once, for the size filter."""
    device = positions.device
    pt = positions.int() + RPAD
    pt.clamp_(min=0)
    for i in range(3):
        pt[i].clamp_(max=shape[i] + RPAD - 1)
    padded = tuple(int(n) + 2 * RPAD for n in shape)
    hist = torch.zeros(padded, dtype=torch.int32, device=device)
    hist.index_put_(tuple(pt.long()), torch.ones(pt.shape[1], dtype=torch.int32, device=device),
                    accumulate=True)
    hmax = _max_filter_3d(hist[None].float(), SEED_WINDOW)[0]
    seeds = torch.nonzero((hist - hmax > -1e-6) & (hist > MIN_SEED_COUNT))
    if len(seeds) == 0:
        return np.zeros(shape, np.uint16)
    seeds = seeds[hist[seeds[:, 0], seeds[:, 1], seeds[:, 2]].argsort()]  # stronger seeds win
    offs = torch.arange(-GROW_RADIUS, GROW_RADIUS + 1, device=device)
    width = len(offs)
    oz, oy, ox = torch.meshgrid(offs, offs, offs, indexing="ij")
    flat = (oz * padded[1] * padded[2] + oy * padded[2] + ox).flatten()
    flat = flat + (seeds[:, 0] * padded[1] * padded[2] + seeds[:, 1] * padded[2] + seeds[:, 2])[:, None]
    counts = hist.view(-1)[flat].reshape(len(seeds), width, width, width)
    grown = torch.zeros(counts.shape, device=device)
    grown[:, GROW_RADIUS, GROW_RADIUS, GROW_RADIUS] = 1
    for _ in range(GROW_STEPS):
        grown = _max_filter_3d(grown, 3) * (counts > MIN_GROW_COUNT)
    dtype = torch.int32 if len(seeds) < 2**16 else torch.int64
    label_of_bin = torch.zeros(int(np.prod(padded)), dtype=dtype, device=device)
    ipix = torch.nonzero(grown).to(dtype)
    which = ipix[:, 0]
    where = ipix[:, 1:] + seeds[which].to(dtype) - GROW_RADIUS
    bins = where[:, 0] * padded[1] * padded[2] + where[:, 1] * padded[2] + where[:, 2]
    label_of_bin.scatter_reduce_(0, bins.long(), which + 1, reduce="amax", include_self=False)
    point_labels = label_of_bin.reshape(padded)[pt[0].long(), pt[1].long(), pt[2].long()]
    labelled = torch.zeros(shape, dtype=dtype, device=device)
    labelled[tuple(torch.as_tensor(i, device=device) for i in inds)] = point_labels
    masks = labelled.cpu().numpy().astype(label_dtype(len(seeds)))
    labels, sizes = fastremap.unique(masks, return_counts=True)
    big = labels[sizes > np.prod(shape) * max_size_fraction]
    if len(big) > 0 and (len(big) > 1 or big[0] != 0):
        masks = fastremap.mask(masks, big)
    fastremap.renumber(masks, in_place=True)
    return masks


def flows_to_masks_3d(flows: np.ndarray, cellprob: np.ndarray, params: MaskParams,
                      device: torch.device | str = "cpu") -> np.ndarray:
    """3×Z×Y×X flows (dZ, dY, dX; network units) and Z×Y×X cellprob logits → Z×Y×X labels
    (uint16, or uint32), as cellpose 4.2's ``resize_and_compute_masks(do_3D=True)``. Flow
    following and mask assembly run on ``device`` (flows and cellprob uploaded once); hole
    filling and the size filter on the host."""
    if not (cellprob > params.cellprob_threshold).any():
        return np.zeros(cellprob.shape, np.uint16)
    inds, positions = follow_flows_3d(flows, cellprob, params.cellprob_threshold, params.niter,
                                      params.integrator, device)
    masks = assemble_masks_3d(inds, positions, cellprob.shape, params.max_size_fraction)
    masks = fill_holes_and_remove_small(masks, params.min_size)
    return masks.astype(label_dtype(masks), copy=False)
