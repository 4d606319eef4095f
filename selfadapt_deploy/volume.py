"""Z-stacks segmented plane by plane and linked in 3-D (cellpose's ``stitch_threshold`` mode).

cellpose 4.2's ``eval(stitch_threshold=T)`` on a Z×C×Y×X stack, step for step: the stack is
normalised as a whole (``norm3D``), every plane goes through the 2-D pipeline with the size filter
off (holes are still filled per plane), the planes' labels are linked by IoU ≥ T
(``postprocess.stitch``), then holes are filled and masks under ``min_size`` voxels dropped in 3-D.
Planes are normalised (by the stack's percentiles) and go through the network in groups that fill
one batch, so only one group's float planes and network outputs are held at a time: the stack as
read and its labels are the only volume-sized arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.normalize import normalize_plane, stack_percentiles
from selfadapt_deploy.postprocess.cleanup import fill_holes_and_remove_small
from selfadapt_deploy.postprocess.stitch import PlaneStitcher
from selfadapt_deploy.runtime.base import Runner
from selfadapt_deploy.segment import SegmentParams, segment_images, tiles_per_image

STITCH_THRESHOLD_RULE = "a number in (0, 1]: the IoU at which masks of adjacent planes are linked"


def check_stitch_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise SaDeployError(f"--stitch-threshold must be {STITCH_THRESHOLD_RULE}, got {threshold:g}")


def planes_per_group(runner: Runner, shape: tuple[int, int], params: SegmentParams) -> int:
    """How many planes of a Y×X stack fill one network batch (at least one)."""
    return max(1, params.batch_size // tiles_per_image(runner.spec, shape, params))


def segment_stitched(runner: Runner, volume: np.ndarray, params: SegmentParams, threshold: float,
                     device: torch.device | str = "cpu",
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Z×C×Y×X stack (the network's channels) → Z×Y×X labels (uint16, or uint32 above 65 535
    masks), as cellpose's ``eval(stitch_threshold=threshold)``. ``progress(planes_done, total)``."""
    check_stitch_threshold(threshold)
    if volume.ndim != 4:
        raise SaDeployError(f"a stack for stitching is Z×C×Y×X, got shape {volume.shape}")
    z = volume.shape[0]
    bounds = stack_percentiles(volume) if params.normalize else None

    def plane(k: int) -> np.ndarray:  # normalised one at a time: no float copy of the stack
        return normalize_plane(volume[k], bounds) if bounds is not None else volume[k].astype(np.float32)

    if z == 1:  # one plane: cellpose segments it as a 2-D image (nothing to link)
        return segment_images(runner, [plane(0)], replace(params, normalize=False), device)[0].masks[None]
    plane_params = replace(params, normalize=False, min_size=0)  # cellpose: min_size −1 per plane
    stitcher = PlaneStitcher(threshold)
    labels = np.zeros((z, *volume.shape[2:]), np.uint32)
    group = planes_per_group(runner, volume.shape[2:], params)
    for start in range(0, z, group):
        planes = [plane(k) for k in range(start, min(start + group, z))]
        for k, seg in enumerate(segment_images(runner, planes, plane_params, device)):
            labels[start + k] = stitcher.add(seg.masks)
        if progress is not None:
            progress(min(start + group, z), z)
    masks = fill_holes_and_remove_small(labels, params.min_size)
    return masks.astype(np.uint16 if masks.max(initial=0) < 2**16 else np.uint32)
