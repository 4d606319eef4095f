"""SelfAdapt loss terms (DESIGN.md §2, step 3), in the paper's equation order.

L = BCE(student cellprob, pseudo label)·M_p + λ_bal · MSE(student flows, teacher flows)·M_f
    + λ_L2SP · Σ_i (w_i − w_i^0)²
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over pixels where ``mask`` is 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def cellprob_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE between the student's cellprob logits (B×H×W) and hard pseudo labels, over kept pixels."""
    return masked_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), mask)


def flow_loss(flows: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between student and teacher flows (B×2×H×W), per component over kept pixels."""
    return masked_mean((flows - target) ** 2, mask)


def l2sp_penalty(params: Iterable[nn.Parameter], anchors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ_i (w_i − w_i^0)²: distance of trainable weights from the pretrained starting point θ0.

    Its gradient is 2(w − w0); multiply by λ_L2SP outside.
    """
    terms = [((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True)]
    return torch.stack(terms).sum() if terms else torch.zeros(())
