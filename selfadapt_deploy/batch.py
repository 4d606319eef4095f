"""Batch jobs over files: segment many images, evaluate many prediction/ground-truth pairs.

Each image is its own unit of work: a bad image is reported and skipped, the others go on, and
every output is written atomically, so an interrupted run is resumed by running it again.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfadapt_deploy.errors import ImageReadError, SaDeployError
from selfadapt_deploy.io.readers import Image, image_stem, read_images, read_label_image, select_channels
from selfadapt_deploy.io.writers import OUT_FORMATS, write_flows, write_labels
from selfadapt_deploy.metrics import DEFAULT_THRESHOLDS, APResult, average_precision
from selfadapt_deploy.runtime.base import Runner
from selfadapt_deploy.segment import (
    Segmentation,
    SegmentParams,
    masks_on_host,
    predict_on_host,
    segment_image,
    segment_images,
    tiles_per_image,
    use_device_pipeline,
)
from selfadapt_deploy.volume import NO_SMOOTHING, Sigmas3, segment_3d, segment_stitched

FLOWS_SUFFIX = "_flows.tif"


@dataclass(frozen=True)
class ImageResult:
    """Outcome for one image (one series of a multi-series file)."""

    source: Path
    name: str
    status: str  # "done", "skipped" (outputs exist), "failed"
    count: int = 0  # what the work reports: masks for segment
    error: str = ""
    last_in_file: bool = True  # False while more series of the same file follow
    note: str = ""  # how an ambiguous file was read (Image.note)


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
    stitch_threshold: float | None = None  # Z-stacks: planes linked at this IoU (volume.py)
    z_axis: int | None = None
    planes: bool = False  # Z-stacks: each plane its own 2-D image
    do_3d: bool = False  # Z-stacks: 3-D segmentation (volume.segment_3d)
    anisotropy: float = 1.0
    smooth: Sigmas3 = NO_SMOOTHING
    out_format: str = "tiff"  # label images as TIFF or OME-Zarr (io.writers.OUT_FORMATS)

    @property
    def stack_mode(self) -> str:
        """How files with a Z axis are read (:data:`io.readers.STACK_MODES`)."""
        return "volume" if self.stitch_threshold or self.do_3d else "planes" if self.planes else "refuse"


#: the work done on one image: (image, its data with the network's channels) → the count to report
#: (masks for segment), having written the image's outputs atomically — or a future of it, when
#: the work's last part goes on in the background while the next image starts
Work = Callable[[Image, np.ndarray], "int | Future[int]"]


@dataclass(frozen=True)
class Grouping:
    """How small images share one call: ``work_many`` does a group (counts in order, outputs
    written), ``size(data)`` is what an image fills (its tiles) of a group's ``capacity`` (a
    network batch). An image that fills it alone runs alone."""

    work_many: Callable[[list[tuple[Image, np.ndarray]]], list[int]]
    size: Callable[[np.ndarray], int]
    capacity: int


def process_files(paths: Sequence[Path], runner: Runner, output: Callable[[str], Path], work: Work,
                  channels: Sequence[int] | None = None, overwrite: bool = False,
                  channel_axis: int | None = None, series: int | None = None,
                  grouping: Grouping | None = None, z_axis: int | None = None,
                  stack: str = "refuse") -> Iterator[ImageResult]:
    """Run ``work`` on every image in ``paths`` (each series of multi-series files) with ``runner``
    active; yield one result per image, in input order, as it finishes. ``output(name)`` is the
    file whose presence means the image is done: it is skipped (resume) unless ``overwrite``.
    With ``grouping``, consecutive small images go through ``grouping.work_many`` together.
    ``z_axis``, ``stack``: how files with a Z axis are read (:func:`io.readers.read_images`); a
    Z-stack's data is Z×C×Y×X and always runs alone."""
    claimed: set[str] = set()
    pending: list[tuple[Image, np.ndarray, bool]] = []
    background: deque[tuple[Image, bool, Future]] = deque()  # at most one image, finishing

    def settle() -> Iterator[ImageResult]:
        """The image finishing in the background, waited for: results stay in input order."""
        while background:
            image, last, future = background.popleft()
            yield _run_one(image, last, future.result, claimed)

    def run_one(image: Image, data: np.ndarray, last: bool) -> Iterator[ImageResult]:
        result = _run_one(image, last, lambda: work(image, data), claimed)  # the next image's
        yield from settle()  # network ran while the previous one finished
        if isinstance(result, Future):
            background.append((image, last, result))
        else:
            yield result

    def flush() -> Iterator[ImageResult]:
        group, pending[:] = list(pending), []
        if len(group) > 1:
            try:
                counts = grouping.work_many([(image, data) for image, data, _ in group])
            except SaDeployError:  # one bad image: run them one by one to say which
                pass
            else:
                yield from settle()
                for (image, _, last), count in zip(group, counts, strict=True):
                    yield ImageResult(image.source, image.name, "done", count, last_in_file=last,
                                      note=image.note)
                return
        for image, data, last in group:
            yield from run_one(image, data, last)

    with contextlib.nullcontext() if runner.is_active else runner:  # the caller's, or ours
        for item in _todo(paths, runner, output, channels, overwrite, (channel_axis, series, z_axis, stack),
                          claimed):
            if isinstance(item, ImageResult):
                yield from flush()
                yield from settle()
                yield item
                continue
            if grouping is None or item[1].ndim == 4 or grouping.size(item[1]) >= grouping.capacity:
                yield from flush()
                yield from run_one(*item)
                continue
            pending.append(item)
            if sum(grouping.size(data) for _, data, _ in pending) >= grouping.capacity:
                yield from flush()
        yield from flush()
        yield from settle()


def _todo(paths: Sequence[Path], runner: Runner, output: Callable[[str], Path],
          channels: Sequence[int] | None, overwrite: bool, reading: tuple, claimed: set[str]
          ) -> Iterator[ImageResult | tuple[Image, np.ndarray, bool]]:
    """Each image in turn: a finished result (unreadable, skipped, name clash, bad channels), or
    (image, its data with the network's channels, last series of its file) to work on.
    ``reading``: :func:`read_ahead`'s (channel_axis, series, z_axis, stack)."""
    for path, read in read_ahead(paths, *reading):
        try:
            images = read.result()
        except ImageReadError as exc:
            yield ImageResult(Path(path), image_stem(Path(path)), "failed", error=str(exc))
            continue
        for k, image in enumerate(images):
            last = k == len(images) - 1
            target = output(image.name)
            if image.name in claimed:
                yield ImageResult(image.source, image.name, "failed", last_in_file=last, error=(
                    f"{image.source}: output name {target.name} was already written in this run by "
                    "another input; rename one of the inputs"))
            elif target.exists() and not overwrite:
                yield ImageResult(image.source, image.name, "skipped", last_in_file=last)
            else:
                try:
                    data = network_channels(image.data, runner, channels, str(image.source))
                except SaDeployError as exc:
                    yield _failed(image, exc, last)
                    continue
                claimed.add(image.name)
                yield image, data, last


def network_channels(data: np.ndarray, runner: Runner, channels: Sequence[int] | None,
                     where: str) -> np.ndarray:
    """An image's (C×Y×X) or a stack's (Z×C×Y×X, each plane) channels as the network takes them:
    Cellpose 3 nets take exactly nchan channels, missing ones zero-padded."""
    spec = runner.spec
    return select_channels(data, channels, spec.nchan, where, pad=not spec.fewer_channels_ok)


def _failed(image: Image, exc: SaDeployError, last: bool) -> ImageResult:
    error = str(exc) if str(image.source) in str(exc) else f"{image.source} ({image.name}): {exc}"
    return ImageResult(image.source, image.name, "failed", error=error, last_in_file=last)


def _run_one(image: Image, last: bool, work: Callable[[], int | Future], claimed: set[str]
             ) -> ImageResult | Future:
    """``work()`` for one image: its result (a bad image becomes a failed result and frees its
    output name), or the future of the part still running in the background."""
    try:
        count = work()
    except SaDeployError as exc:
        claimed.discard(image.name)
        return _failed(image, exc, last)
    if isinstance(count, Future):
        return count
    return ImageResult(image.source, image.name, "done", count, last_in_file=last, note=image.note)


READ_AHEAD = 2  # files read (decoded) in a background thread while the current one is processed


def read_ahead(paths: Sequence[Path], channel_axis: int | None, series: int | None,
               z_axis: int | None = None, stack: str = "refuse",
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
                                                  series=series, z_axis=z_axis, stack=stack)))

        for _ in range(depth):
            submit_next()
        while pending:
            item = pending.popleft()
            submit_next()
            yield item


def segment_files(paths: Sequence[Path], job: SegmentJob, channel_axis: int | None = None,
                  series: int | None = None,
                  stack_progress: Callable[[Path, int, int], None] | None = None) -> Iterator[ImageResult]:
    """Segment every image in ``paths``; yield one result per image as it finishes. On the host
    pipeline an image's flows → masks and writing run on a thread of their own while the network
    runs on the next image (same masks; at most one image in flight). A Z-stack (with
    ``job.stitch_threshold``) is segmented plane by plane and linked, ``stack_progress(path, planes
    done, planes)`` told as its planes finish."""

    def masks_path(name: str) -> Path:
        return job.out_dir / f"{name}{OUT_FORMATS[job.out_format]}"

    def write(image: Image, seg: Segmentation) -> int:
        if job.save_flows:
            write_flows(job.out_dir / f"{image.name}{FLOWS_SUFFIX}", seg.flows, seg.cellprob)
        write_labels(masks_path(image.name), seg.masks, job.out_format)
        return int(seg.masks.max())

    def segment(image: Image, data: np.ndarray) -> int | Future[int]:
        if data.ndim == 4 and job.do_3d:  # a Z-stack in 3-D (--do-3d)
            masks, output = segment_3d(job.runner, data, job.params, job.anisotropy, job.smooth)
            if job.save_flows:
                write_flows(job.out_dir / f"{image.name}{FLOWS_SUFFIX}", output[:3], output[3])
            write_labels(masks_path(image.name), masks, job.out_format, image.physical)
            return int(masks.max())
        if data.ndim == 4:  # a Z-stack, planes linked (--stitch-threshold)
            def progress(done: int, total: int) -> None:
                if stack_progress is not None:
                    stack_progress(image.source, done, total)

            flows = np.zeros((3, data.shape[0], *data.shape[2:]), np.float32) if job.save_flows else None

            def keep_flows(k: int, seg: Segmentation) -> None:
                flows[:2, k], flows[2, k] = seg.flows, seg.cellprob

            masks = segment_stitched(job.runner, data, job.params, job.stitch_threshold, job.device,
                                     progress, keep_flows if flows is not None else None)
            if flows is not None:
                write_flows(job.out_dir / f"{image.name}{FLOWS_SUFFIX}", flows[:2], flows[2])
            write_labels(masks_path(image.name), masks, job.out_format, image.physical)
            return int(masks.max())
        if use_device_pipeline(job.params, job.runner.device):
            return write(image, segment_image(job.runner, data, job.params, job.device))
        predicted = predict_on_host(job.runner, [data], job.params)
        return finisher.submit(lambda: write(image, masks_on_host(predicted, job.params, job.device)[0]))

    def segment_many(items: list[tuple[Image, np.ndarray]]) -> list[int]:
        segs = segment_images(job.runner, [data for _, data in items], job.params, job.device)
        return [write(image, seg) for (image, _), seg in zip(items, segs, strict=True)]

    # small images (fewer tiles than a network batch) share batches with their neighbours
    def tiles(data: np.ndarray) -> int:
        return tiles_per_image(job.runner.spec, data.shape[1:], job.params)

    grouping = Grouping(segment_many, tiles, job.params.batch_size)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sa-deploy-masks") as finisher:
        yield from process_files(paths, job.runner, masks_path, segment, job.channels, job.overwrite,
                                 channel_axis, series, grouping, job.z_axis, job.stack_mode)


def evaluate_files(preds: Sequence[Path], gts: Sequence[Path],
                   thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> list[APResult]:
    """AP per (prediction, ground truth) pair, in order; Z×Y×X label stacks are matched by 3-D IoU
    (as cellpose's ``average_precision`` does for volumes)."""
    if len(preds) != len(gts):
        raise SaDeployError(f"--pred has {len(preds)} files but --gt has {len(gts)}; pass them in "
                            "matching pairs")
    results = []
    for pred_path, gt_path in zip(preds, gts, strict=True):
        pred, gt = read_label_image(pred_path, stacks=True), read_label_image(gt_path, stacks=True)
        if pred.shape != gt.shape:
            raise SaDeployError(f"{pred_path} {pred.shape} and {gt_path} {gt.shape} differ in shape")
        results.append(average_precision(gt, pred, thresholds))
    return results
