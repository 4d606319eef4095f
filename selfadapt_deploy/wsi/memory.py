"""Whole or streamed: an image is segmented whole while the estimate of its working set (at the
network's scale: image, network outputs and their blending, flows back at the image's size, the
dynamics, labels) stays under a share of the memory this machine has available; above it, it
streams block by block, whose memory is bounded by the block size instead."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Fitted, rounded up, to the peak RSS beyond the model's, measured with the real Cellpose 3 weights
# on a 4000² slide of real phase-contrast frames at network scales 0.29, 0.57 and 1.15 (run to run
# the peak varies by ~0.1 GiB; the estimate stays at or above it): ``benchmarks/whole_image_memory.py``
#: bytes per pixel of the image at its own size: raw and normalised copies (per channel), flows
#: and cell probability resized back, the dynamics' coordinates, its label images
BYTES_PER_PIXEL, BYTES_PER_PIXEL_CHANNEL = 47, 5
#: bytes per pixel at the network's scale: the resized image (per channel), the tiles' outputs,
#: their blending weights and sums
BYTES_PER_NETWORK_PIXEL, BYTES_PER_NETWORK_PIXEL_CHANNEL = 42, 5
WHOLE_SHARE = 0.5  # an image is read whole while its estimate stays under this share of the memory
SAY_ABOVE = 1 << 30  # the choice is said on the console for images whose estimate passes 1 GiB
MODES = ("auto", "stream", "whole")


@dataclass(frozen=True)
class StreamChoice:
    """How one image is segmented, the line that says why, and whether that line is worth saying
    (a streamed or large image; a forced choice only where it overrules the estimate)."""

    stream: bool
    estimate: int  # bytes the whole image would need
    why: str
    say: bool = False


def whole_image_bytes(ly: int, lx: int, nchan: int, rescale: float) -> int:
    """Estimated peak memory (bytes) of segmenting a ``ly``×``lx`` image whole, beyond the model."""
    pixels = ly * lx
    network_pixels = max(1, int(ly * rescale)) * max(1, int(lx * rescale))
    return (pixels * (BYTES_PER_PIXEL + BYTES_PER_PIXEL_CHANNEL * nchan)
            + network_pixels * (BYTES_PER_NETWORK_PIXEL + BYTES_PER_NETWORK_PIXEL_CHANNEL * nchan))


STACK_LABEL_BYTES = 8  # per voxel: the uint32 labels and the 3-D clean-up's uint32 copy


def stitched_stack_bytes(planes: int, ly: int, lx: int, stored_bytes: int, nchan: int,
                         rescale: float, flows: bool = False) -> int:
    """Estimated peak memory of ``segment --stitch-threshold`` on a stack: the stack as read
    (``stored_bytes``), its labels, one plane's whole-image working set (planes are segmented
    a batch at a time; a group of several planes is of small ones) and, with ``flows``
    (``--save-flows``), every plane's dY, dX and cell probability (float32)."""
    return (stored_bytes + planes * ly * lx * (STACK_LABEL_BYTES + 12 * flows)
            + 2 * whole_image_bytes(ly, lx, nchan, rescale))


def volume_3d_bytes(planes: int, ly: int, lx: int, stored_bytes: int, nchan: int, rescale: float,
                    anisotropy: float) -> int:
    """Estimated peak memory of ``segment --do-3d``: the stack as read; at the network's scale the
    resized float stack, the summed network outputs (4 per voxel) and one orientation's outputs
    (3 per voxel); at the stack's size its flows and cell probability (4 per voxel), the padded
    histogram of final positions, the labels and the clean-up's copy."""
    voxels = planes * ly * lx
    net = max(1, int(planes * anisotropy * rescale)) * max(1, int(ly * rescale)) * max(1, int(lx * rescale))
    histogram = (planes + 40) * (ly + 40) * (lx + 40) * 8
    return stored_bytes + net * 4 * (nchan + 4 + 3) + voxels * (16 + 12 + STACK_LABEL_BYTES) + histogram


def check_stack_fits(path: Path, planes: int, ly: int, lx: int, stored_bytes: int, nchan: int,
                     rescale: float, anisotropy: float | None = None, available: int | None = None,
                     flows: bool = False, instead: str | None = None) -> None:
    """One clear error, before anything is read, for a stack whose stitching (or, with an
    ``anisotropy``, 3-D segmentation) would not fit; ``flows``: the stitched planes' flows are kept
    for ``--save-flows``; ``instead``: what the caller's user can do (else segment's options)."""
    from selfadapt_deploy.errors import SaDeployError

    in_3d = anisotropy is not None
    need = (volume_3d_bytes(planes, ly, lx, stored_bytes, nchan, rescale, anisotropy) if in_3d
            else stitched_stack_bytes(planes, ly, lx, stored_bytes, nchan, rescale, flows))
    available = available_memory() if available is None else available
    if need > available:
        what = "segmenting" if in_3d else "stitching"
        held = ("the stack as read, its flows in 3-D at the network's scale and its own"
                if in_3d else "the stack as read, its labels, one plane's working set")
        instead = instead or ("a smaller --anisotropy, --stitch-threshold (planes one at a time), or a crop"
                              if in_3d else "a crop, or --planes (one plane at a time)")
        raise SaDeployError(f"{path}: {what} this {planes}-plane {ly}×{lx} stack needs about "
                            f"{gib(need)} ({held}) but {gib(available)} is available; free memory, "
                            f"or use {instead}")


CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: a container's memory limit and usage


def available_memory(cgroup: Path = CGROUP, meminfo: Path = Path("/proc/meminfo")) -> int:
    """Bytes this process could still use: Linux's ``MemAvailable`` (free plus reclaimable cache),
    else the free physical pages — and no more than its cgroup's limit less its usage, so a
    container sees its own limit, not the host's memory."""
    available = None
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, available)


def gib(n: int) -> str:
    """Bytes for a message: GiB with one decimal, MiB under 1 GiB (never "0.0 GiB")."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def choose(ly: int, lx: int, nchan: int, rescale: float, mode: str = "auto",
           available: int | None = None, block: int = 2048) -> StreamChoice:
    """Whole or streamed for one image: ``mode`` ``stream``/``whole`` forces it (``--stream`` /
    ``--no-stream``); ``auto`` compares the estimate with :data:`WHOLE_SHARE` of ``available``
    (default: :func:`available_memory`). An image no larger than one ``block`` is read whole
    unless forced: streaming it would hold the same pixels."""
    estimate = whole_image_bytes(ly, lx, nchan, rescale)
    size = f"{ly}×{lx}, {int(ly * rescale)}×{int(lx * rescale)} at the network's scale"
    if mode == "stream":
        return StreamChoice(True, estimate, f"streamed ({size}): --stream")
    if mode == "auto" and max(ly, lx) <= block:
        return StreamChoice(False, estimate, f"read whole ({size}): it fits in one {block}² block")
    available = available_memory() if available is None else available
    over = estimate > WHOLE_SHARE * available
    against = (f"about {gib(estimate)} whole, {'more' if over else 'less'} than {WHOLE_SHARE:.0%} of "
               f"the {gib(available)} available")
    if mode == "whole":
        return StreamChoice(False, estimate, f"read whole although {size} needs {against}: --no-stream",
                            say=over)
    return StreamChoice(over, estimate, f"{'streamed block by block' if over else 'read whole'}: "
                        f"{size} needs {against} (--stream / --no-stream force either)",
                        say=over or estimate > SAY_ABOVE)
