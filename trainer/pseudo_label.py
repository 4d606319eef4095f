"""``sa-deploy pseudo-label``: the SelfAdapt teacher's ensemble for whole images, in any runtime.

Per image, the teacher-TTA graph (8 flip/rot90 views, mapped back and averaged) runs over
full square tiles of the normalised image at the network's scale, blended with cellpose's taper
and resized back; then the confidence masks of ``trainer/confidence.py`` are computed with
thresholds from that image alone (the trainer's EMA across batches has nothing to average here).
Near tile seams the std maps are the taper-weighted mean of the overlapping tiles' stds.

One compressed ``<stem>_pseudo.npz`` per image (2-D maps Y×X, flows 2×Y×X as dY, dX):
``flows`` (float32, network units ≈ 5 × unit vectors), ``prob`` (cell probability),
``flows_std``, ``prob_std`` (std across the 8 views), ``cell`` (uint8, prob > 0.5),
``mask_prob`` (uint8, M_p), ``mask_flows`` (uint8 2×Y×X, M_f), ``thresholds`` (JSON: the
confidence thresholds used) and ``rescale``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.normalize import normalize_image
from selfadapt_deploy.io.writers import atomic_path
from selfadapt_deploy.rules import check_fields
from selfadapt_deploy.runtime.base import TEACHER_GRAPH, Runner
from selfadapt_deploy.segment import SEGMENT_RULES, predict_image
from selfadapt_deploy.trainer.confidence import ConfidenceMasks

PSEUDO_SUFFIX = "_pseudo.npz"


@dataclass(frozen=True)
class PseudoLabelParams:
    """``sa-deploy pseudo-label``'s settings, checked by segment's rules for the same options."""

    diameter: float | None = None  # None → the model's default, as in segment
    tile_overlap: float = 0.1
    batch_size: int = 8  # tiles per teacher call (each tile is 8 views inside the graph)

    def __post_init__(self) -> None:
        check_fields(self, {name: SEGMENT_RULES[name] for name in ("diameter", "tile_overlap", "batch_size")})


def pseudo_label_image(runner: Runner, img: np.ndarray,
                       params: PseudoLabelParams = PseudoLabelParams()) -> dict[str, np.ndarray]:
    """C×Y×X image (the network's channels) → the arrays written to ``<stem>_pseudo.npz``."""
    if runner.graph is not TEACHER_GRAPH:
        raise SaDeployError(f"{runner.name} runs the {runner.graph.name} graph; pseudo-labels need "
                            "the teacher_tta graph")

    def predict(tiles: torch.Tensor) -> torch.Tensor:
        outputs = runner.run(tiles)
        return torch.cat([outputs[name] for name in TEACHER_GRAPH.output_names], dim=1)

    y, rescale = predict_image(predict, runner.spec, normalize_image(img), params.diameter,
                               params.tile_overlap, params.batch_size, runner.device, fixed_tile=True)
    flows, prob, flows_std, prob_std = y[0:2], y[2], y[3:5], y[5]
    masks = ConfidenceMasks()
    labels = masks(torch.from_numpy(prob)[None], torch.from_numpy(flows_std)[None])
    return {"flows": flows, "prob": prob, "flows_std": flows_std, "prob_std": prob_std,
            "cell": labels.cell[0].numpy().astype(np.uint8),
            "mask_prob": labels.mask_prob[0].numpy().astype(np.uint8),
            "mask_flows": labels.mask_flows[0].numpy().astype(np.uint8),
            "thresholds": np.array(json.dumps(masks.state_dict())), "rescale": np.array(rescale)}


def write_pseudo_labels(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
