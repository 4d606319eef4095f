"""Flows → masks: integrate, assemble, flow QC, fill holes / min size (cellpose 4.2's rules)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfadapt_deploy.postprocess.cleanup import fill_holes_and_remove_small
from selfadapt_deploy.postprocess.flow_qc import remove_bad_flow_masks
from selfadapt_deploy.postprocess.integrate import integrate_batch
from selfadapt_deploy.postprocess.masks import assemble_masks


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
        masks = fill_holes_and_remove_small(masks, params.min_size)
        out.append(masks.astype(np.uint16) if masks.max(initial=0) < 2**16 else masks.astype(np.uint32))
    return out


def flows_to_masks(flows: np.ndarray, cellprob: np.ndarray, params: MaskParams = MaskParams(),
                   device: torch.device | str = "cpu") -> np.ndarray:
    """2×Y×X flows (network units) and Y×X cellprob logits → label image (uint16, or uint32)."""
    return flows_to_masks_batch(flows[None], cellprob[None], params, device)[0]


__all__ = ["MaskParams", "flows_to_masks", "flows_to_masks_batch"]
