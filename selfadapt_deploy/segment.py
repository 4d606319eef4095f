"""The segmentation pipeline, in data-flow order (matches cellpose 4.2's ``CellposeModel.eval``):

normalise → resize by diam_mean/diameter → tiles → runner (optionally 8 D4 views) → taper blend →
resize back → integrate → assemble → flow QC → fill holes / min size.

Two pipelines compute it (``SegmentParams.pipeline``): ``host`` — numpy/OpenCV around the network,
numba kernels after it (the CPU default, exact); ``device`` — the image goes to the runner's
device once as read, and normalisation, resizing, tiles, TTA, integration, assembly and flow QC
stay there; only the label image comes back (the default on CUDA).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.normalize import normalize_image, normalize_tensor
from selfadapt_deploy.models.base import ModelSpec, SegmentationNet
from selfadapt_deploy.postprocess import MaskParams, flows_to_masks_batch, flows_to_masks_on_device
from selfadapt_deploy.rules import check_fields, count, one_of, real
from selfadapt_deploy.runtime.base import Runner
from selfadapt_deploy.tiling import (
    D4,
    MAX_OVERLAP,
    MIN_OVERLAP,
    Predict,
    count_tiles,
    d4_inverse,
    d4_transform,
    predict_tiled_many,
)

DEFAULT_NITER = 200  # cellpose scales it by 1/rescale when niter is not given
MAX_NITER = 100_000  # flow integration steps; cellpose's default is 200 / rescale
PIPELINES = ("auto", "host", "device")
#: the largest image the in-memory pipeline makes at the network's scale (16384² pixels); a
#: diameter that would rescale an image past it is refused, naming the size it would need
MAX_RESCALED_PIXELS = 2**28

#: the rule of every SegmentParams field (``rules.check_fields``)
SEGMENT_RULES = {
    "diameter": (lambda v: v is None or real(v, 0), "a number ≥ 0 in pixels (0: the model's default)"),
    "flow_threshold": (lambda v: real(v, 0), "a number ≥ 0 (0 turns flow QC off)"),
    "cellprob_threshold": (real, "a finite number (a logit)"),
    "min_size": (lambda v: count(v, 0), "an integer ≥ 0 in pixels (0 keeps every mask)"),
    "max_size_fraction": (lambda v: real(v, 0, open_lo=True), "a number > 0"),
    "niter": (lambda v: v is None or (count(v, 0) and v <= MAX_NITER),
              f"an integer in 0..{MAX_NITER} (0: 200 / rescale, as cellpose)"),
    "tile_overlap": (lambda v: real(v, MIN_OVERLAP, MAX_OVERLAP, open_hi=False),
                     f"between {MIN_OVERLAP} and {MAX_OVERLAP}"),
    "batch_size": (count, "an integer ≥ 1"),
    "pipeline": one_of(PIPELINES),
}


@dataclass(frozen=True)
class SegmentParams:
    """User-facing settings of ``sa-deploy segment``; defaults are cellpose's."""

    diameter: float | None = None  # cell diameter in pixels; None/0 → the model's default
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    max_size_fraction: float = 0.4
    niter: int | None = None  # None/0 → int(200 / rescale)
    tile_overlap: float = 0.1
    batch_size: int = 8
    tta: bool = False  # average the 8 D4 views of every tile
    normalize: bool = True
    integrator: str = "auto"  # flow integration kernel: auto | torch | numba | triton
    pipeline: str = "auto"  # auto (device on CUDA, host elsewhere) | host | device

    def __post_init__(self) -> None:
        """Every setting checked against its rule (:data:`SEGMENT_RULES`): one error naming the
        option, what it must be and the value. max_size_fraction above 1 keeps every mask."""
        check_fields(self, SEGMENT_RULES)


@dataclass
class Segmentation:
    """Masks plus the network output they were computed from: 3×Y×X (dY, dX in network units,
    cellprob logit) at the image's size — a device tensor in the device pipeline, brought to the
    host only when ``flows`` or ``cellprob`` is read; for a volume segmented in 3-D, 4×Z×Y×X
    (dZ, dY, dX, cellprob)."""

    masks: np.ndarray
    output: np.ndarray | torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)

    def _host(self) -> np.ndarray:
        if isinstance(self.output, torch.Tensor):
            self.output = self.output.cpu().numpy()
        return self.output

    @property
    def flows(self) -> np.ndarray:  # 2×Y×X (3×Z×Y×X for a volume)
        return self._host()[:-1]

    @property
    def cellprob(self) -> np.ndarray:  # Y×X (Z×Y×X)
        return self._host()[-1]


Image = np.ndarray | torch.Tensor  # C×Y×X: numpy on the host pipeline, a tensor on the device one


def resize_chw(img: Image, ly: int, lx: int) -> Image:
    """Bilinear resize of a C×Y×X float array: OpenCV for numpy (as cellpose's ``resize_image``),
    ``interpolate`` (bilinear, half-pixel centres, no antialiasing: OpenCV's rule) for a tensor."""
    if isinstance(img, torch.Tensor):
        return F.interpolate(img[None], size=(ly, lx), mode="bilinear", align_corners=False)[0]
    out = cv2.resize(np.ascontiguousarray(img.transpose(1, 2, 0)), (lx, ly),
                     interpolation=cv2.INTER_LINEAR)
    return (out[..., None] if out.ndim == 2 else out).transpose(2, 0, 1)


def prepare_image(img: np.ndarray, rescale: float) -> np.ndarray:
    """C×Y×X raw image → normalised float32 at the network's scale (resized by ``rescale``)."""
    x = normalize_image(img)
    if rescale != 1.0:
        x = resize_chw(x, max(1, int(x.shape[1] * rescale)), max(1, int(x.shape[2] * rescale)))
    return x


def rescale_factor(spec: ModelSpec, diameter: float | None) -> float:
    """diam_mean / diameter; without a diameter, the model's default diameter (cellpose's rule)."""
    return spec.diam_mean / (diameter or spec.default_diameter)


def rescaled_size(ly: int, lx: int, rescale: float, diameter: float | None) -> tuple[int, int]:
    """A Y×X image's size at the network's scale; a diameter that would shrink it below a pixel
    or grow it past :data:`MAX_RESCALED_PIXELS` is one error naming the size it would need."""
    ry, rx = int(ly * rescale), int(lx * rescale)
    if min(ry, rx) < 1:
        raise SaDeployError(f"--diameter {diameter:g} is too large for a {ly}×{lx} image "
                            f"(it would shrink to {ry}×{rx}); pass the cells' diameter in pixels")
    if ry * rx > MAX_RESCALED_PIXELS:
        raise SaDeployError(f"--diameter {diameter:g} would rescale a {ly}×{lx} image {rescale:.3g}× to "
                            f"{ry}×{rx} pixels, above the {MAX_RESCALED_PIXELS} (16384²) the "
                            "pipeline makes at the network's scale; pass the cells' diameter in pixels")
    return ry, rx


def tiles_per_image(spec: ModelSpec, shape: tuple[int, int], params: SegmentParams) -> int:
    """How many network tiles a Y×X image takes at these settings (after the rescale)."""
    rescale = rescale_factor(spec, params.diameter)
    # a count only (grouping, never raises): a size the pipeline refuses is refused per image
    ly, lx = (max(1, int(n * rescale)) for n in shape) if rescale != 1.0 else shape
    return count_tiles(ly, lx, spec.tile_size, params.tile_overlap, spec.fixed_tile)


def batch_chunks(spec: ModelSpec, imgs: list[np.ndarray], params: SegmentParams) -> list[list[np.ndarray]]:
    """Consecutive images grouped until their tiles fill a network batch: small images share
    batches, and only one chunk's blending buffers are on the device at a time."""
    chunks: list[list[np.ndarray]] = []
    filled = params.batch_size
    for img in imgs:
        if filled >= params.batch_size:
            chunks.append([])
            filled = 0
        chunks[-1].append(img)
        filled += tiles_per_image(spec, img.shape[1:], params)
    return chunks


def tta_predict(runner: Runner):
    """A predict function averaging the runner's outputs over the 8 D4 views (flows as vectors)."""

    def predict(tiles: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((tiles.shape[0], 3, *tiles.shape[2:]), device=runner.device)
        for k, flip in D4:  # views separately: non-square CPnet tiles change shape under rot90
            total += d4_inverse(runner.infer(d4_transform(tiles, k, flip).contiguous()), k, flip)
        return total / len(D4)

    return predict


def predict_images(predict: Predict, spec: ModelSpec, imgs: list[Image], diameter: float | None,
                   tile_overlap: float, batch_size: int, device: torch.device,
                   fixed_tile: bool) -> tuple[list[Image], float]:
    """Normalised C×Y×X images → (K×Y×X predictions at each original size, rescale): resized by
    diam_mean / diameter, tiled, predicted and blended on ``device`` (the tiles of all images
    share network batches), resized back. Numpy images give numpy (resized by OpenCV on the
    host); tensors stay tensors on their device."""
    rescale = rescale_factor(spec, diameter)
    resized = []
    for img in imgs:
        ly, lx = img.shape[1:]
        if rescale != 1.0:
            img = resize_chw(img, *rescaled_size(ly, lx, rescale, diameter))
        # each image goes to the runner's device once; tiles, network and blending stay there
        resized.append(torch.from_numpy(img).to(device) if isinstance(img, np.ndarray) else img.to(device))
    ys = predict_tiled_many(predict, resized, spec.tile_size, tile_overlap, batch_size, fixed_tile)
    out = []
    for img, y in zip(imgs, ys, strict=True):
        if isinstance(img, np.ndarray):
            y = y.cpu().numpy()
        out.append(resize_chw(y, *img.shape[1:]) if rescale != 1.0 else y)
    return out, rescale


def predict_image(predict: Predict, spec: ModelSpec, img: Image, diameter: float | None,
                  tile_overlap: float, batch_size: int, device: torch.device,
                  fixed_tile: bool) -> tuple[Image, float]:
    """:func:`predict_images` for one image."""
    ys, rescale = predict_images(predict, spec, [img], diameter, tile_overlap, batch_size, device,
                                 fixed_tile)
    return ys[0], rescale


def predict_flows_many(runner: Runner, imgs: list[Image],
                       params: SegmentParams) -> tuple[list[Image], float]:
    """Normalised C×Y×X images → (3×Y×X network outputs at the original sizes, rescale)."""
    predict = tta_predict(runner) if params.tta else runner.infer
    return predict_images(predict, runner.spec, imgs, params.diameter, params.tile_overlap,
                          params.batch_size, runner.device, runner.spec.fixed_tile)


def predict_flows(runner: Runner, img: Image, params: SegmentParams) -> tuple[Image, float]:
    """Normalised C×Y×X image → (3×Y×X network output at the original size, rescale)."""
    ys, rescale = predict_flows_many(runner, [img], params)
    return ys[0], rescale


def mask_params(params: SegmentParams, rescale: float) -> MaskParams:
    """Post-processing settings for an image predicted at ``rescale`` (niter scales with it)."""
    return MaskParams(niter=params.niter or int(DEFAULT_NITER / rescale),
                      cellprob_threshold=params.cellprob_threshold,
                      flow_threshold=params.flow_threshold, min_size=params.min_size,
                      max_size_fraction=params.max_size_fraction, integrator=params.integrator)


def use_device_pipeline(params: SegmentParams, device: torch.device) -> bool:
    """Whether ``params.pipeline`` means the device-resident pipeline on ``device``."""
    return params.pipeline == "device" or (params.pipeline == "auto" and device.type == "cuda")


def _sync(device: torch.device) -> float:
    """The time once ``device`` has finished its queued work (stage timings of the device pipeline)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def segment_on_device(runner: Runner, imgs: list[np.ndarray], params: SegmentParams) -> list[Segmentation]:
    """The device-resident pipeline for C×Y×X images: each uploaded once in its own dtype; every
    stage up to the label image runs on the runner's device (:mod:`postprocess` on tensors), and
    the tiles of all the images share network batches. Normalisation and network time are shared
    equally among the images in ``timings``."""
    device = runner.device
    t0 = time.perf_counter()
    xs = []
    for img in imgs:
        native = np.ascontiguousarray(img, dtype=img.dtype.newbyteorder("="))  # torch needs native order
        x = torch.from_numpy(native).to(device, non_blocking=True)
        xs.append(normalize_tensor(x) if params.normalize else x.float())
    t1 = _sync(device)
    ys, rescale = predict_flows_many(runner, xs, params)
    t2 = _sync(device)
    out = []
    for y in ys:
        t = time.perf_counter()
        masks = flows_to_masks_on_device(y[None, :2], y[None, 2], mask_params(params, rescale))[0]
        out.append(Segmentation(masks=masks, output=y, timings={
            "normalize": (t1 - t0) / len(imgs), "network": (t2 - t1) / len(imgs),
            "masks": time.perf_counter() - t}))
    return out


def segment_images(runner: Runner, imgs: list[np.ndarray], params: SegmentParams = SegmentParams(),
                   device: torch.device | str = "cpu") -> list[Segmentation]:
    """Segment C×Y×X images whose channels are already those the network expects.

    Consecutive small images share network batches (:func:`batch_chunks`). With the device
    pipeline (:func:`use_device_pipeline` on the runner's device) everything runs in
    :func:`segment_on_device`, and each result's network output stays on the device until read.
    Otherwise :func:`predict_on_host` then :func:`masks_on_host` (which a caller may run on
    another thread, overlapping the next image's network).
    """
    if use_device_pipeline(params, runner.device):
        return [seg for chunk in batch_chunks(runner.spec, imgs, params)
                for seg in segment_on_device(runner, chunk, params)]
    return masks_on_host(predict_on_host(runner, imgs, params), params, device)


#: one image's network output (3×Y×X on the host), its mask settings and its stage times
Predicted = tuple[np.ndarray, MaskParams, dict]


def predict_on_host(runner: Runner, imgs: list[np.ndarray], params: SegmentParams) -> list[Predicted]:
    """Normalisation and the network, images batched as :func:`segment_images` says."""
    predicted = []
    for chunk in batch_chunks(runner.spec, imgs, params):
        t0 = time.perf_counter()
        xs = [normalize_image(img) if params.normalize else img.astype(np.float32) for img in chunk]
        t1 = time.perf_counter()
        ys, rescale = predict_flows_many(runner, xs, params)  # the chunk's tiles share batches
        t2 = time.perf_counter()
        shared = {"normalize": (t1 - t0) / len(chunk), "network": (t2 - t1) / len(chunk)}
        predicted += [(y, mask_params(params, rescale), dict(shared)) for y in ys]
    return predicted


def masks_on_host(predicted: list[Predicted], params: SegmentParams,
                  device: torch.device | str = "cpu") -> list[Segmentation]:
    """Flows → masks of predicted images, the images of one size as one batch on ``device`` — one
    integrator call. Stage times of shared work are split equally among the images."""
    groups: dict[tuple, list[int]] = {}
    for k, (y, settings, _) in enumerate(predicted):
        groups.setdefault((y.shape, settings), []).append(k)
    masks: dict[int, np.ndarray] = {}
    for (_, settings), members in groups.items():
        t0 = time.perf_counter()
        outputs = [predicted[k][0] for k in members]
        batch = outputs[0][None] if len(outputs) == 1 else np.stack(outputs)  # no copy for one
        masks.update(zip(members, flows_to_masks_batch(batch[:, :2], batch[:, 2], settings, device),
                         strict=True))
        share = (time.perf_counter() - t0) / len(members)
        for k in members:
            predicted[k][2]["masks"] = share
    return [Segmentation(masks=masks[k], output=y, timings=timings)
            for k, (y, _, timings) in enumerate(predicted)]


def segment_image(runner: Runner, img: np.ndarray, params: SegmentParams = SegmentParams(),
                  device: torch.device | str = "cpu") -> Segmentation:
    """Segment one C×Y×X image whose channels are already those the network expects."""
    return segment_images(runner, [img], params, device)[0]


def segment_results(net: SegmentationNet, images: Sequence[np.ndarray], params: SegmentParams,
                    attention: str = "auto") -> list[Segmentation]:
    """Segmentations (masks and network output) of in-memory C×Y×X images, with ``net`` on its own
    device (post-processing batched over images of one size); ``attention`` as for TorchRunner."""
    from selfadapt_deploy.runtime.torch_runner import TorchRunner  # the torch backend, on demand

    with TorchRunner(net, net.device, attention=attention) as runner:
        return segment_images(runner, list(images), params, net.device)


def segment_arrays(net: SegmentationNet, images: Sequence[np.ndarray], params: SegmentParams,
                   attention: str = "auto") -> list[np.ndarray]:
    """Label images of in-memory C×Y×X images (:func:`segment_results`' masks)."""
    return [seg.masks for seg in segment_results(net, images, params, attention)]
