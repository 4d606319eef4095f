"""Z-stacks: plane by plane and linked in 3-D (cellpose's ``stitch_threshold`` mode), or in 3-D
(cellpose's ``do_3D`` mode).

cellpose 4.2's ``eval(stitch_threshold=T)`` on a Z×C×Y×X stack, step for step: the stack is
normalised as a whole (``norm3D``), every plane goes through the 2-D pipeline with the size filter
off (holes are still filled per plane), the planes' labels are linked by IoU ≥ T
(``postprocess.stitch``), then holes are filled and masks under ``min_size`` voxels dropped in 3-D.
Planes are normalised (by the stack's percentiles) and go through the network in groups that fill
one batch, so only one group's float planes and network outputs are held at a time: the stack as
read and its labels are the only volume-sized arrays.

``do_3D`` is cellpose 4.2's ``eval(do_3D=True)``: the stack normalised as a whole, resized by
(anisotropy × rescale, rescale, rescale), the 2-D network run on its YX, ZY and ZX planes (each
orientation's planes sharing network batches, any runtime), the three predictions summed into
(dZ, dY, dX) and a cell probability, resized back, optionally smoothed, then 3-D flows → masks
(``postprocess.volume_masks``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.normalize import normalize_plane, normalize_volume, stack_percentiles
from selfadapt_deploy.io.writers import label_dtype
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.postprocess.cleanup import fill_holes_and_remove_small
from selfadapt_deploy.postprocess.stitch import PlaneStitcher
from selfadapt_deploy.postprocess.volume_masks import flows_to_masks_3d
from selfadapt_deploy.runtime.base import Runner
from selfadapt_deploy.segment import (
    Segmentation,
    SegmentParams,
    mask_params,
    predict_images,
    rescale_factor,
    resize_chw,
    segment_images,
    segment_results,
    tiles_per_image,
    tta_predict,
    use_device_pipeline,
)

Sigmas3 = tuple[float, float, float]  # (Z, Y, X) Gaussian sigmas of --flow3d-smooth, in voxels
NO_SMOOTHING: Sigmas3 = (0.0, 0.0, 0.0)
STITCH_THRESHOLD_RULE = "a number in (0, 1]: the IoU at which masks of adjacent planes are linked"


def check_anisotropy(anisotropy: float) -> None:
    if not anisotropy > 0:
        raise SaDeployError(f"--anisotropy must be > 0 (the Z step ÷ the Y/X pixel size), got {anisotropy:g}")


def check_flow3d_smooth(sigmas: Sequence[float]) -> Sigmas3:
    """``--flow3d-smooth`` (one sigma, or Z,Y,X) → the (Z, Y, X) Gaussian sigmas in voxels."""
    smooth = tuple(float(v) for v in sigmas)
    if len(smooth) == 1:
        smooth = smooth * 3
    if len(smooth) != 3 or any(not v >= 0 for v in smooth):
        raise SaDeployError(f"--flow3d-smooth takes one sigma or three (Z,Y,X), each ≥ 0 voxels; got "
                            f"{','.join(map(str, sigmas))}")
    return smooth


def check_stitch_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise SaDeployError(f"--stitch-threshold must be {STITCH_THRESHOLD_RULE}, got {threshold:g}")


def planes_per_group(runner: Runner, shape: tuple[int, int], params: SegmentParams) -> int:
    """How many planes of a Y×X stack fill one network batch (at least one)."""
    return max(1, params.batch_size // tiles_per_image(runner.spec, shape, params))


def segment_stitched(runner: Runner, volume: np.ndarray, params: SegmentParams, threshold: float,
                     device: torch.device | str = "cpu",
                     progress: Callable[[int, int], None] | None = None,
                     on_plane: Callable[[int, Segmentation], None] | None = None) -> np.ndarray:
    """Z×C×Y×X stack (the network's channels) → Z×Y×X labels (uint16, or uint32 above 65 535
    masks), as cellpose's ``eval(stitch_threshold=threshold)``. ``progress(planes_done, total)``;
    ``on_plane(k, plane k's 2-D segmentation)`` as each is made (its flows, e.g.)."""
    check_stitch_threshold(threshold)
    if volume.ndim != 4:
        raise SaDeployError(f"a stack for stitching is Z×C×Y×X, got shape {volume.shape}")
    z = volume.shape[0]
    bounds = stack_percentiles(volume) if params.normalize else None

    def plane(k: int) -> np.ndarray:  # normalised one at a time: no float copy of the stack
        return normalize_plane(volume[k], bounds) if bounds is not None else volume[k].astype(np.float32)

    if z == 1:  # one plane: cellpose segments it as a 2-D image (nothing to link)
        seg = segment_images(runner, [plane(0)], replace(params, normalize=False), device)[0]
        if on_plane is not None:
            on_plane(0, seg)
        return seg.masks[None]
    plane_params = replace(params, normalize=False, min_size=0)  # cellpose: min_size −1 per plane
    stitcher = PlaneStitcher(threshold)
    labels = np.zeros((z, *volume.shape[2:]), np.uint32)
    group = planes_per_group(runner, volume.shape[2:], params)
    for start in range(0, z, group):
        planes = [plane(k) for k in range(start, min(start + group, z))]
        for k, seg in enumerate(segment_images(runner, planes, plane_params, device)):
            labels[start + k] = stitcher.add(seg.masks)
            if on_plane is not None:
                on_plane(start + k, seg)
        if progress is not None:
            progress(min(start + group, z), z)
    masks = fill_holes_and_remove_small(labels, params.min_size)
    return masks.astype(label_dtype(masks), copy=False)


def resize_volume(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Bilinear resize of a Z×C×Y×X float array to (Z', Y', X'), as cellpose's ``resize_image_3d``:
    each plane in Y/X, then each Y row's Z×X slice in Z (OpenCV, linear)."""
    lz, ly, lx = shape
    if volume.shape[2:] != (ly, lx):
        volume = np.stack([resize_chw(plane, ly, lx) for plane in volume])
    if volume.shape[0] != lz:
        rows = [resize_chw(np.ascontiguousarray(volume[:, :, y].transpose(1, 0, 2)), lz, lx)
                for y in range(volume.shape[2])]  # each C×Z×X → C×Z'×X
        volume = np.stack(rows, axis=2).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(volume)


#: the planes of each orientation: (axes of the Z×Y×X volume that make a plane's rows and columns,
#: the volume axis the planes run along), and which of dZ, dY, dX a plane's two flows feed
ORIENTATIONS = (("YX", 0, (1, 2)), ("ZX", 1, (0, 2)), ("ZY", 2, (0, 1)))


def predict_3d(runner: Runner, volume: np.ndarray, params: SegmentParams) -> np.ndarray:
    """Normalised Z×C×Y×X volume at the network's scale → 4×Z×Y×X (dZ, dY, dX, cellprob): the 2-D
    network on every YX, ZX and ZY plane (cellpose's ``run_3D``), predictions summed per axis."""
    spec = runner.spec
    predict = tta_predict(runner) if params.tta else runner.infer
    out = np.zeros((4, volume.shape[0], *volume.shape[2:]), np.float32)
    for _, along, flow_axes in ORIENTATIONS:
        planes = np.moveaxis(volume, {0: 0, 1: 2, 2: 3}[along], 0)  # P×…: the plane axis first
        if along:
            planes = planes.transpose(0, 2, 1, 3)  # P×C×rows×cols
        ys, _ = predict_images(predict, spec, [np.ascontiguousarray(p) for p in planes], spec.diam_mean,
                               params.tile_overlap, params.batch_size, runner.device, spec.fixed_tile)
        stacked = np.moveaxis(np.stack(ys), 0, along + 1)  # 3×Z×Y×X in volume order
        out[flow_axes[0] + 0] += stacked[0]
        out[flow_axes[1] + 0] += stacked[1]
        out[3] += stacked[2]
    return out


def segment_3d(runner: Runner, volume: np.ndarray, params: SegmentParams, anisotropy: float = 1.0,
               smooth: Sigmas3 = NO_SMOOTHING) -> tuple[np.ndarray, np.ndarray]:
    """Z×C×Y×X stack (the network's channels) → (Z×Y×X labels, 4×Z×Y×X dZ, dY, dX, cellprob), as
    cellpose 4.2's ``eval(do_3D=True, anisotropy=…, flow3D_smooth=…)``. No flow QC in 3-D."""
    if volume.ndim != 4:
        raise SaDeployError(f"a stack for 3-D segmentation is Z×C×Y×X, got shape {volume.shape}")
    check_anisotropy(anisotropy)
    lz, ly, lx = volume.shape[0], *volume.shape[2:]
    x = normalize_volume(volume) if params.normalize else volume.astype(np.float32)
    rescale = rescale_factor(runner.spec, params.diameter)
    if rescale != 1.0 or anisotropy != 1.0:
        x = resize_volume(x, (int(lz * anisotropy * rescale), int(ly * rescale), int(lx * rescale)))
        if min(x.shape[0], *x.shape[2:]) < 1:
            raise SaDeployError(f"--anisotropy {anisotropy:g} and the rescale {rescale:.3g} shrink the "
                                f"{lz}×{ly}×{lx} stack to nothing; check them")
    y = predict_3d(runner, x, params)
    if y.shape[1:] != (lz, ly, lx):
        y = resize_volume(y.transpose(1, 0, 2, 3), (lz, ly, lx)).transpose(1, 0, 2, 3)
    flows, cellprob = y[:3], y[3]
    if any(s > 0 for s in smooth):
        from scipy.ndimage import gaussian_filter

        flows = gaussian_filter(flows, [0, *smooth])
    # flows → masks on the runner's GPU in the device pipeline (``--pipeline``), else the host
    device = runner.device if use_device_pipeline(params, runner.device) else "cpu"
    masks = flows_to_masks_3d(flows, cellprob, mask_params(params, rescale), device)
    return masks, np.concatenate([flows, cellprob[None]])


def segment_with_net(net: SegmentationNet, images: Sequence[np.ndarray], params: SegmentParams,
                     anisotropy: float = 1.0, attention: str = "auto",
                     smooth: Sigmas3 = NO_SMOOTHING) -> list[Segmentation]:
    """Segmentations by ``net`` of in-memory images in order: C×Y×X images by the 2-D pipeline
    (sharing batches, :func:`segment.segment_results`), Z×C×Y×X stacks in 3-D (:func:`segment_3d`
    at ``anisotropy``, flows smoothed by ``smooth``) — so adaptation scores its candidates on
    volumes as they will be segmented."""
    from selfadapt_deploy.runtime.torch_runner import TorchRunner  # the torch backend, on demand

    stacks, flat = [], []
    for k, image in enumerate(images):
        (stacks if image.ndim == 4 else flat).append(k)
    out = dict(zip(flat, segment_results(net, [images[k] for k in flat], params, attention), strict=True)
               if flat else ())
    if stacks:
        with TorchRunner(net, net.device, attention=attention) as runner:
            out |= {k: Segmentation(*segment_3d(runner, images[k], params, anisotropy, smooth))
                    for k in stacks}
    return [out[k] for k in range(len(images))]


def orthogonal_planes(stack: np.ndarray, anisotropy: float = 1.0) -> list[np.ndarray]:
    """A Z×C×Y×X stack as 2-D C×rows×cols training images, as cellpose trains its 2-D network for
    3-D: every YX plane, then — the stack resized along Z by ``anisotropy`` — ZX and ZY planes,
    every k-th so that each orientation gives about as many planes as YX (float32, unnormalised)."""
    check_anisotropy(anisotropy)
    x = stack.astype(np.float32)
    planes = list(x)
    lz = max(1, round(x.shape[0] * anisotropy))
    if lz > 1:
        x = resize_volume(x, (lz, *x.shape[2:])) if lz != x.shape[0] else x
        z = len(planes)
        for axis in (2, 3):  # ZX planes (along Y), then ZY planes (along X)
            step = max(1, round(x.shape[axis] / z))
            planes += [np.ascontiguousarray(np.take(x, k, axis=axis).transpose(1, 0, 2))
                       for k in range(0, x.shape[axis], step)]
    return planes
