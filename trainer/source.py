"""Supervised training with the cellpose loss: builds the *source* model of the offline demo.

Cellpose's loss (``cellpose.train._loss_fn_seg``): MSE between the predicted flows and 5× the unit
flows of the labels, halved, plus BCE between the cell-probability logit and the foreground.
Tiles are random crops with a random D4 transform (the flow vectors turned with them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from selfadapt_deploy.metrics import relabel_sequential
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.postprocess.flow_qc import masks_to_flows
from selfadapt_deploy.tiling import d4_transform
from selfadapt_deploy.trainer.augment import random_d4
from selfadapt_deploy.trainer.data import TileSampler, keeps_global_rng, prepare_image
from selfadapt_deploy.trainer.schedule import lr_at


def cellpose_targets(labels: np.ndarray) -> np.ndarray:
    """3×Y×X training target of a label image: 5 × unit flows (dY, dX) and the foreground."""
    labels = relabel_sequential(labels)
    return np.concatenate([5.0 * masks_to_flows(labels), (labels > 0)[None]]).astype(np.float32)


def cellpose_loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cellpose's segmentation loss: MSE(flows, 5·unit flows) / 2 + BCE(cellprob logit, foreground)."""
    return F.mse_loss(y[:, :2], target[:, :2]) / 2 + F.binary_cross_entropy_with_logits(y[:, 2], target[:, 2])


class LabelledTiles:
    """Random tiles of labelled images with their cellpose targets, under one random D4 transform
    per batch (flow vectors turned with it): images C×Y×X normalised at the network's scale,
    labels at the same size. Image and target are stacked so one crop samples both in place."""

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], tile: int):
        self.sampler = TileSampler([np.concatenate([im, cellpose_targets(lab)])
                                    for im, lab in zip(images, labels, strict=True)], tile)

    def __len__(self) -> int:
        return len(self.sampler.images)

    def sample(self, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(tiles B×C×t×t, targets B×3×t×t: 5 × unit flows, foreground)."""
        batch = self.sampler.sample(batch_size, g)
        k, flip = random_d4(g)
        x = d4_transform(batch[:, :-3], k, flip)
        flows = d4_transform(batch[:, -3:-1], k, flip, vector=True)
        return x, torch.cat([flows, d4_transform(batch[:, -1:], k, flip)], dim=1)


@dataclass(frozen=True)
class SourceConfig:
    """Settings of supervised source training (cellpose's optimiser: AdamW, warm-up + decay)."""

    iterations: int = 300
    batch_size: int = 8
    tile: int = 112
    lr: float = 5e-3
    weight_decay: float = 1e-5
    seed: int = 0


@keeps_global_rng
def train_source(net: SegmentationNet, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                 config: SourceConfig = SourceConfig(),
                 progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``net`` in place on C×Y×X images with label images; returns the loss per step."""
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    tiles = LabelledTiles([prepare_image(im, 1.0) for im in images], labels, config.tile)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.iterations // 10)
    losses = []
    net.train()
    for step in range(config.iterations):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.lr, warmup, config.iterations)
        x, target = tiles.sample(config.batch_size, g)
        loss = cellpose_loss(net(x.to(net.device)), target.to(net.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
    net.eval()
    return losses
