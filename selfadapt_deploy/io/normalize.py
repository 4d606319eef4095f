"""Per-channel percentile normalisation, as cellpose 4.2's ``normalize_img`` (defaults), of
images and of whole stacks."""

from __future__ import annotations

import numpy as np
import torch

DOWNSAMPLE_ABOVE = 224**3  # cellpose computes percentiles on a strided subsample above this size


def subsample_steps(shape: tuple[int, ...]) -> tuple[int, ...]:
    """cellpose's strided subsample for percentiles: above 224³ pixels every (n // 224)-th element
    per axis — along Z of a Z×Y×X channel every (Z // 50)-th plane —, every element below."""
    if int(np.prod(shape)) <= DOWNSAMPLE_ABOVE:
        return tuple(1 for _ in shape)
    steps = [max(1, n // 224) for n in shape]
    if len(shape) == 3:
        steps[0] = max(1, shape[0] // 50)
    return tuple(steps)


def percentiles(sample: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> tuple[float, float]:
    """(p_lower, p_upper) of a float32 sample, as numpy computes them (float32 results)."""
    return np.percentile(sample, lower), np.percentile(sample, upper)


def apply_percentiles(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(x − lo)/(hi − lo)`` in place on float32 ``x`` (cellpose's arithmetic); 0 where the
    channel is flat (hi − lo ≤ 1e-3)."""
    if hi - lo > 1e-3:
        x -= lo
        x /= hi - lo
    else:
        x[:] = 0
    return x


def normalize_channel(x: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """``(x − p_lower)/(p_upper − p_lower)``; 0 where the channel is flat (p_upper − p_lower ≤ 1e-3)."""
    x = x.astype(np.float32, copy=True)
    sample = x[tuple(slice(None, None, step) for step in subsample_steps(x.shape))]
    return apply_percentiles(x, *percentiles(sample, lower, upper))


def normalize_image(img: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """C×Y×X image → float32, each channel normalised; constant channels become 0."""
    out = np.zeros(img.shape, np.float32)
    for c in range(img.shape[0]):
        if np.ptp(img[c]) > 0:
            out[c] = normalize_channel(img[c], lower, upper)
    return out


def stack_percentiles(volume: np.ndarray, lower: float = 1.0, upper: float = 99.0
                      ) -> list[tuple[float, float] | None]:
    """Per channel of a Z×C×Y×X stack, the (p_lower, p_upper) of the whole stack (cellpose's
    ``norm3D``, its default for stitched and 3-D segmentation), None for a constant channel."""
    out: list[tuple[float, float] | None] = []
    for c in range(volume.shape[1]):
        channel = volume[:, c]
        if np.ptp(channel) > 0:
            sample = channel[tuple(slice(None, None, step) for step in subsample_steps(channel.shape))]
            out.append(percentiles(sample.astype(np.float32), lower, upper))
        else:
            out.append(None)
    return out


def normalize_plane(plane: np.ndarray, bounds: list[tuple[float, float] | None]) -> np.ndarray:
    """One C×Y×X plane of a stack normalised by :func:`stack_percentiles` — the same float32
    arithmetic as normalising the stack at once, without a float copy of the stack."""
    out = np.zeros(plane.shape, np.float32)
    for c, bound in enumerate(bounds):
        if bound is not None:
            out[c] = apply_percentiles(plane[c].astype(np.float32), *bound)
    return out


def normalize_volume(volume: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Z×C×Y×X stack → float32, each channel normalised by percentiles of the whole stack."""
    bounds = stack_percentiles(volume, lower, upper)
    return np.stack([normalize_plane(plane, bounds) for plane in volume])


def _percentile_torch(sample: torch.Tensor, q: float) -> torch.Tensor:
    """``np.percentile(sample, q)`` (linear method) of a float32 tensor, on its device, as a 0-d
    tensor: the two order statistics around (n−1)·q/100, blended in float32 as numpy's ``_lerp``."""
    n = sample.numel()
    virtual = (n - 1) * (q / 100)
    below = int(np.floor(virtual))
    a = torch.kthvalue(sample, below + 1).values
    b = torch.kthvalue(sample, min(below + 2, n)).values
    t = float(np.float32(virtual - below))
    diff = b - a
    return b - diff * float(np.float32(1 - t)) if t >= 0.5 else a + diff * t


def normalize_tensor(img: torch.Tensor, lower: float = 1.0, upper: float = 99.0) -> torch.Tensor:
    """:func:`normalize_image` on a C×Y×X tensor of any dtype, on its device (no host transfer):
    the same percentiles (same subsample above 224³ pixels) and the same float32 arithmetic."""
    x = img.float()
    out = torch.zeros_like(x)
    for c in range(x.shape[0]):
        xc = x[c]
        sample = xc[tuple(slice(None, None, step) for step in subsample_steps(tuple(xc.shape)))].flatten()
        lo, hi = _percentile_torch(sample, lower), _percentile_torch(sample, upper)
        scale = hi - lo  # a device tensor: true division, as numpy's (a CPU scalar would not be)
        normalised = (xc - lo) / scale
        ok = (scale > 1e-3) & (xc.amax() > xc.amin())
        out[c] = torch.where(ok, normalised, 0.0)
    return out
