"""Dropout consistency (CRank, Talks et al. 2025): a candidate that segments the same way when its
first layer's features are randomly dropped has learnt features that fit these images; one whose
masks fall apart has not. Lower disagreement is better.

The held-out images are segmented once more with spatial dropout (whole channels zeroed with
probability ``rate``, the rest scaled by 1/(1 − rate)) on the first feature map, the masks drawn
from a generator seeded by ``seed`` — the same drop pattern for every candidate of a run — and
compared with the candidate's own unperturbed masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.segment import SegmentParams
from selfadapt_deploy.trainer.stopping import mask_agreement
from selfadapt_deploy.volume import NO_SMOOTHING, Sigmas3, segment_with_net

DROPOUT_RATE = 0.2  # CRank ranks with rates 0.05–0.4; 0.1–0.3 kept its ranking stable
DROPOUT_SEED = 0


@contextlib.contextmanager
def feature_dropout(net: SegmentationNet, rate: float, seed: int) -> Iterator[None]:
    """Within the block, every forward of ``net`` drops whole channels of its first feature map
    (channel masks from a CPU generator seeded by ``seed``, so any device draws the same ones)."""
    if not 0 <= rate < 1:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    g = torch.Generator().manual_seed(seed)

    def drop(features: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * features.ndim
        shape[0], shape[channel_dim] = features.shape[0], features.shape[channel_dim]
        keep = (torch.rand(shape, generator=g) >= rate).to(features.device, features.dtype)
        return features * keep / (1 - rate)

    handle = net.perturb_first_features(drop)
    try:
        yield
    finally:
        handle.remove()


def perturbed_masks(net: SegmentationNet, images: Sequence[np.ndarray], params: SegmentParams,
                    rate: float = DROPOUT_RATE, seed: int = DROPOUT_SEED,
                    anisotropy: float = 1.0, smooth: Sigmas3 = NO_SMOOTHING
                    ) -> list[np.ndarray]:
    """Masks of ``images`` (C×Y×X, or Z×C×Y×X stacks segmented in 3-D at ``anisotropy``, flows
    smoothed by ``smooth``; the network's channels) with first-layer spatial dropout."""
    with feature_dropout(net, rate, seed):
        return [seg.masks for seg in segment_with_net(net, images, params, anisotropy, "native", smooth)]


def dropout_disagreement(net: SegmentationNet, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                         params: SegmentParams, rate: float = DROPOUT_RATE,
                         seed: int = DROPOUT_SEED, anisotropy: float = 1.0,
                         smooth: Sigmas3 = NO_SMOOTHING) -> float:
    """1 − F1 at IoU 0.75 between the candidate's ``masks`` of ``images`` and its masks under
    feature dropout: 0 when dropout changes nothing."""
    perturbed = perturbed_masks(net, images, params, rate, seed, anisotropy, smooth)
    return 1.0 - mask_agreement(masks, perturbed, iou=0.75)
