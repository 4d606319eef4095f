"""Batch jobs over files: segment many images, evaluate many prediction/ground-truth pairs.

Each image is its own unit of work: a bad image is reported and skipped, the others go on, and
every output is written atomically, so an interrupted run is resumed by running it again.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tifffile
import torch

from selfadapt_deploy.errors import ImageReadError, SaDeployError
from selfadapt_deploy.io.readers import Image, image_stem, read_images, select_channels
from selfadapt_deploy.io.writers import write_flows, write_masks
from selfadapt_deploy.metrics import DEFAULT_THRESHOLDS, APResult, average_precision
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.runtime.base import Runner
from selfadapt_deploy.runtime.torch_runner import TorchRunner
from selfadapt_deploy.segment import SegmentParams, segment_image, segment_images

MASKS_SUFFIX, FLOWS_SUFFIX = "_masks.tif", "_flows.tif"


@dataclass(frozen=True)
class ImageResult:
    """Outcome for one image (one series of a multi-series file)."""

    source: Path
    name: str
    status: str  # "done", "skipped" (outputs exist), "failed"
    count: int = 0  # what the work reports: masks for segment
    error: str = ""
    last_in_file: bool = True  # False while more series of the same file follow


@dataclass(frozen=True)
class SegmentJob:
    """Everything that stays fixed across the images of one ``segment`` run."""

    runner: Runner  # inactive or active; segment_files activates an inactive one for the run
    out_dir: Path
    params: SegmentParams
    device: torch.device
    channels: Sequence[int] | None = None
    save_flows: bool = False
    overwrite: bool = False


#: the work done on one image: (image, its data with the network's channels) → the count to report
#: (masks for segment), having written the image's outputs atomically
Work = Callable[[Image, np.ndarray], int]


def process_files(paths: Sequence[Path], runner: Runner, output: Callable[[str], Path], work: Work,
                  channels: Sequence[int] | None = None, overwrite: bool = False,
                  channel_axis: int | None = None, series: int | None = None) -> Iterator[ImageResult]:
    """Run ``work`` on every image in ``paths`` (each series of multi-series files) with ``runner``
    active; yield one result per image as it finishes. ``output(name)`` is the file whose presence
    means the image is done: it is skipped (resume) unless ``overwrite``."""
    written: set[str] = set()
    with contextlib.nullcontext() if runner.is_active else runner:  # the caller's, or ours
        for path, read in read_ahead(paths, channel_axis, series):
            try:
                images = read.result()
            except ImageReadError as exc:
                yield ImageResult(Path(path), image_stem(Path(path)), "failed", error=str(exc))
                continue
            for k, image in enumerate(images):
                result = _process_one(image, runner, output(image.name), work, channels, overwrite,
                                      written)
                yield replace(result, last_in_file=k == len(images) - 1)


READ_AHEAD = 2  # files read (decoded) in a background thread while the current one is processed


def read_ahead(paths: Sequence[Path], channel_axis: int | None, series: int | None,
               depth: int = READ_AHEAD) -> Iterator[tuple[Path, Future]]:
    """(path, future of its images) in order, the next ``depth`` files read by a reader thread
    meanwhile, so decoding TIFFs overlaps the network and post-processing (which release the
    GIL). A read error surfaces from ``future.result()`` when that file's turn comes."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sa-deploy-reader") as pool:
        pending: deque[tuple[Path, Future]] = deque()
        upcoming = iter(paths)

        def submit_next() -> None:
            path = next(upcoming, None)
            if path is not None:
                pending.append((path, pool.submit(read_images, path, channel_axis=channel_axis,
                                                  series=series)))

        for _ in range(depth):
            submit_next()
        while pending:
            item = pending.popleft()
            submit_next()
            yield item


def _process_one(image: Image, runner: Runner, target: Path, work: Work,
                 channels: Sequence[int] | None, overwrite: bool, written: set[str]) -> ImageResult:
    """One image: skip when done, refuse a name clash, turn a bad image into a failed result."""
    if image.name in written:
        return ImageResult(image.source, image.name, "failed", error=(
            f"{image.source}: output name {target.name} was already written in this run by "
            "another input; rename one of the inputs"))
    if target.exists() and not overwrite:
        return ImageResult(image.source, image.name, "skipped")
    try:
        spec = runner.spec  # Cellpose 3 nets take exactly nchan channels: pad with zeros
        data = select_channels(image.data, channels, spec.nchan, str(image.source),
                               pad=not spec.fewer_channels_ok)
        count = work(image, data)
    except SaDeployError as exc:
        error = str(exc) if str(image.source) in str(exc) else f"{image.source} ({image.name}): {exc}"
        return ImageResult(image.source, image.name, "failed", error=error)
    written.add(image.name)
    return ImageResult(image.source, image.name, "done", count)


def segment_files(paths: Sequence[Path], job: SegmentJob, channel_axis: int | None = None,
                  series: int | None = None) -> Iterator[ImageResult]:
    """Segment every image in ``paths``; yield one result per image as it finishes."""

    def masks_path(name: str) -> Path:
        return job.out_dir / f"{name}{MASKS_SUFFIX}"

    def segment(image: Image, data: np.ndarray) -> int:
        seg = segment_image(job.runner, data, job.params, job.device)
        if job.save_flows:
            write_flows(job.out_dir / f"{image.name}{FLOWS_SUFFIX}", seg.flows, seg.cellprob)
        write_masks(masks_path(image.name), seg.masks)
        return int(seg.masks.max())

    return process_files(paths, job.runner, masks_path, segment, job.channels, job.overwrite,
                         channel_axis, series)


def read_label_image(path: Path) -> np.ndarray:
    """A 2-D integer label image (squeezing singleton axes)."""
    if not Path(path).is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        arr = np.squeeze(tifffile.imread(path))
    except Exception as exc:  # tifffile raises several types for unreadable files
        raise ImageReadError(f"{path}: not a readable TIFF label image ({exc})") from exc
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0:
        raise ImageReadError(f"{path}: expected a 2-D non-negative integer label image, got "
                             f"{arr.dtype} {arr.shape}")
    return arr


def segment_arrays(net: SegmentationNet, images: Sequence[np.ndarray],
                   params: SegmentParams) -> list[np.ndarray]:
    """Label images of in-memory C×Y×X images, with ``net`` on its own device (post-processing
    batched over images of one size)."""
    with TorchRunner(net, net.device) as runner:
        return [seg.masks for seg in segment_images(runner, list(images), params, net.device)]


def evaluate_files(preds: Sequence[Path], gts: Sequence[Path],
                   thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> list[APResult]:
    """AP per (prediction, ground truth) pair, in order."""
    if len(preds) != len(gts):
        raise SaDeployError(f"--pred has {len(preds)} files but --gt has {len(gts)}; pass them in "
                            "matching pairs")
    results = []
    for pred_path, gt_path in zip(preds, gts, strict=True):
        pred, gt = read_label_image(pred_path), read_label_image(gt_path)
        if pred.shape != gt.shape:
            raise SaDeployError(f"{pred_path} {pred.shape} and {gt_path} {gt.shape} differ in shape")
        results.append(average_precision(gt, pred, thresholds))
    return results


def pooled(results: Sequence[APResult]) -> APResult:
    """Totals over images: AP from summed TP/FP/FN (cellpose reports per-image; this adds them)."""
    def total(counts: list[tuple[int, ...]]) -> list[int]:
        return [sum(c) for c in zip(*counts, strict=True)]

    return APResult.from_counts(results[0].thresholds, total([r.tp for r in results]),
                                total([r.fp for r in results]), total([r.fn for r in results]))
