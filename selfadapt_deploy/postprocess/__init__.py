"""Flows → masks: integrate, assemble, flow QC, fill holes / min size (cellpose 4.2's rules)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfadapt_deploy.io.writers import label_dtype
from selfadapt_deploy.postprocess.cleanup import fill_holes_and_remove_small
from selfadapt_deploy.postprocess.flow_qc import flow_errors_torch, remove_bad_flow_masks
from selfadapt_deploy.postprocess.integrate import integrate_batch, integrate_tensors
from selfadapt_deploy.postprocess.masks import assemble_masks, assemble_masks_torch, relabel_torch


@dataclass(frozen=True)
class MaskParams:
    """Post-processing settings; defaults are cellpose's."""

    niter: int = 200  # Euler steps of flow integration
    cellprob_threshold: float = 0.0  # logit; pixels above it are integrated
    flow_threshold: float = 0.4  # max mean squared flow error per mask; 0 disables flow QC
    min_size: int = 15  # masks smaller than this (pixels) are removed; ≤ 0 disables
    max_size_fraction: float = 0.4  # masks larger than this fraction of the image are removed
    integrator: str = "auto"  # auto (triton on CUDA, numba on CPU) | torch (reference) | numba | triton


def flows_to_masks_batch(flows: np.ndarray, cellprob: np.ndarray, params: MaskParams = MaskParams(),
                         device: torch.device | str = "cpu") -> list[np.ndarray]:
    """B images of one size — flows B×2×Y×X (network units), cellprob B×Y×X logits — → B label
    images. One integrator call walks the whole batch (one kernel launch on a GPU); assembly,
    flow QC and clean-up follow per image."""
    out = []
    for (inds, positions), f in zip(integrate_batch(flows, cellprob, params.cellprob_threshold,
                                                    params.niter, device, params.integrator),
                                    flows, strict=True):
        if len(inds[0]) == 0:
            out.append(np.zeros(cellprob.shape[-2:], np.uint16))
            continue
        masks = assemble_masks(inds, positions, cellprob.shape[-2:], params.max_size_fraction)
        if masks.max() > 0 and params.flow_threshold > 0:
            masks = remove_bad_flow_masks(masks, f, params.flow_threshold, device)
        out.append(_finish(masks, params.min_size))
    return out


def _finish(masks: np.ndarray, min_size: int) -> np.ndarray:
    masks = fill_holes_and_remove_small(masks, min_size)
    return masks.astype(label_dtype(masks), copy=False)


@torch.no_grad()
def flows_to_masks_on_device(flows: torch.Tensor, cellprob: torch.Tensor,
                             params: MaskParams = MaskParams()) -> list[np.ndarray]:
    """:func:`flows_to_masks_batch` for tensors that stay on their device (flows B×2×Y×X, cellprob
    B×Y×X): integration, assembly, flow QC (heat diffusion batched over masks) and the removal of
    bad masks run there; each label image then crosses to the host once for hole filling and the
    size filter (the CPU kernels). Same masks as the host path on the same numbers."""
    out = []
    for (inds, positions), f in zip(integrate_tensors(flows, cellprob, params.cellprob_threshold,
                                                      params.niter, params.integrator),
                                    flows, strict=True):
        masks = assemble_masks_torch(inds, positions, tuple(cellprob.shape[-2:]), params.max_size_fraction)
        if params.flow_threshold > 0 and bool(masks.any()):
            bad = flow_errors_torch(masks, f) > params.flow_threshold
            masks = relabel_torch(masks, torch.cat([bad.new_zeros(1), bad]))
        host = masks.cpu().numpy()  # the one transfer of this image
        out.append(_finish(host.astype(label_dtype(host)), params.min_size))
    return out


def flows_to_masks(flows: np.ndarray, cellprob: np.ndarray, params: MaskParams = MaskParams(),
                   device: torch.device | str = "cpu") -> np.ndarray:
    """2×Y×X flows (network units) and Y×X cellprob logits → label image (uint16, or uint32)."""
    return flows_to_masks_batch(flows[None], cellprob[None], params, device)[0]


__all__ = ["MaskParams", "flows_to_masks", "flows_to_masks_batch", "flows_to_masks_on_device"]
