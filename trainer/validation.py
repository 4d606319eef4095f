"""The held-out images of a run and what every evaluation measures on them (label-free signals,
and AP when labelled images are held out too)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from selfadapt_deploy.metrics import average_precision, pooled
from selfadapt_deploy.models.base import SegmentationNet, evaluating
from selfadapt_deploy.segment import Segmentation, SegmentParams, segment_arrays
from selfadapt_deploy.trainer.data import TileSampler, as_planes, prepare_image
from selfadapt_deploy.trainer.perturb import dropout_disagreement
from selfadapt_deploy.trainer.stopping import (
    embedding_distance,
    flow_error,
    fn_rate,
    mask_agreement,
    tta_spread,
)
from selfadapt_deploy.volume import NO_SMOOTHING, Sigmas3, segment_with_net


@dataclass
class Validation:
    """Held-out images: unlabeled raw C×Y×X for masks — Z×C×Y×X stacks segmented in 3-D at
    ``anisotropy``, as a run on volumes will be used — fixed tiles for embeddings; optionally
    labelled (image, labels) pairs, scored by AP at every evaluation."""

    images: list[np.ndarray]
    tiles: torch.Tensor
    params: SegmentParams
    reference_masks: list[np.ndarray] = field(default_factory=list)
    reference_embedding: torch.Tensor | None = None
    previous_masks: list[np.ndarray] = field(default_factory=list)  # at the last evaluation
    labelled: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    anisotropy: float = 1.0
    smooth: Sigmas3 = NO_SMOOTHING  # stacks: --flow3d-smooth (Z, Y, X sigmas)

    @classmethod
    def from_images(cls, images: list[np.ndarray], rescale: float, tile: int,
                    diameter: float | None, anisotropy: float = 1.0,
                    smooth: Sigmas3 = NO_SMOOTHING) -> Validation:
        """One fixed, seeded tile per image — per plane of a stack (:func:`as_planes`) — at the
        network's scale, for the embedding distance."""
        tiles = torch.cat([TileSampler([prepare_image(im, rescale)], tile).sample(
            1, torch.Generator().manual_seed(i)) for i, im in enumerate(as_planes(images, anisotropy))])
        return cls(images=images, tiles=tiles, params=SegmentParams(diameter=diameter),
                   anisotropy=anisotropy, smooth=smooth)

    def segment(self, net: SegmentationNet) -> list[Segmentation]:
        """``net``'s segmentations of the held-out images (stacks in 3-D)."""
        return segment_with_net(net, self.images, self.params, self.anisotropy, smooth=self.smooth)


@torch.no_grad()
def embed(net: SegmentationNet, tiles: torch.Tensor) -> torch.Tensor:
    with evaluating(net):
        return net.embed(tiles.to(net.device)).float().cpu()


def evaluate_drift(net: SegmentationNet, val: Validation, snapshot: bool = True,
                   dropout: bool = False) -> tuple[dict[str, float], list[Segmentation]]:
    """The label-free signals on the validation images — FN rate of θ0's instances, embedding
    distance to θ0, flow self-consistency, TTA spread, agreement with the previous snapshot's
    masks (``snapshot``: this is the run's next snapshot, not a weight average), with ``dropout``
    the disagreement under feature dropout — and, with held-out labelled images, their pooled
    AP@0.5 / AP@0.75; plus the segmentations the signals were measured on."""
    segs = val.segment(net)
    masks = [seg.masks for seg in segs]
    row = {"fn_rate": fn_rate(val.reference_masks, masks),
           "d_emb": embedding_distance(embed(net, val.tiles), val.reference_embedding),
           # cellpose's flow check is 2-D only (it has none in 3-D): NaN on volumes alone
           "flow_err": flow_error([s for s in segs if s.masks.ndim == 2], net.spec, val.params),
           "tta_spread": tta_spread(net, val.tiles)}
    if snapshot:
        if val.previous_masks:
            row["agree_prev"] = mask_agreement(val.previous_masks, masks)
        val.previous_masks = masks
    if dropout:
        row["dropout_err"] = dropout_disagreement(net, val.images, masks, val.params,
                                                 anisotropy=val.anisotropy, smooth=val.smooth)
    if val.labelled:
        masks = segment_arrays(net, [im for im, _ in val.labelled], val.params)
        ap = pooled([average_precision(gt, m) for (_, gt), m in zip(val.labelled, masks, strict=True)]).ap
        row.update(ap50_labelled=float(ap[0]), ap75_labelled=float(ap[1]))
    return row, segs
