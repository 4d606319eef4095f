"""Flows → masks: integrate, assemble, flow QC, fill holes / min size (cellpose 4.2's rules)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfadapt_deploy.postprocess.cleanup import fill_holes_and_remove_small
from selfadapt_deploy.postprocess.flow_qc import remove_bad_flow_masks
from selfadapt_deploy.postprocess.integrate import integrate
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


def flows_to_masks(flows: np.ndarray, cellprob: np.ndarray, params: MaskParams = MaskParams(),
                   device: torch.device | str = "cpu") -> np.ndarray:
    """2×Y×X flows (network units) and Y×X cellprob logits → label image (uint16, or uint32)."""
    if not (cellprob > params.cellprob_threshold).any():
        return np.zeros(cellprob.shape, np.uint16)
    inds, positions = integrate(flows, cellprob, params.cellprob_threshold, params.niter, device,
                                 params.integrator)
    masks = assemble_masks(inds, positions, cellprob.shape, params.max_size_fraction)
    if masks.max() > 0 and params.flow_threshold > 0:
        masks = remove_bad_flow_masks(masks, flows, params.flow_threshold, device)
    masks = fill_holes_and_remove_small(masks, params.min_size)
    return masks.astype(np.uint16) if masks.max(initial=0) < 2**16 else masks.astype(np.uint32)


__all__ = ["MaskParams", "flows_to_masks"]
