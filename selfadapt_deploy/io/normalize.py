"""Per-channel percentile normalisation, as cellpose 4.2's ``normalize_img`` (defaults)."""

from __future__ import annotations

import numpy as np

DOWNSAMPLE_ABOVE = 224**3  # cellpose computes percentiles on a strided subsample above this size


def normalize_channel(x: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """``(x − p_lower)/(p_upper − p_lower)``; 0 where the channel is flat (p_upper − p_lower ≤ 1e-3)."""
    x = x.astype(np.float32, copy=True)
    sample = x
    if x.size > DOWNSAMPLE_ABOVE:
        sample = x[tuple(slice(None, None, max(1, n // 224)) for n in x.shape)]
    lo, hi = np.percentile(sample, lower), np.percentile(sample, upper)
    if hi - lo > 1e-3:
        x -= lo
        x /= hi - lo
    else:
        x[:] = 0
    return x


def normalize_image(img: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """C×Y×X image → float32, each channel normalised; constant channels become 0."""
    out = np.zeros(img.shape, np.float32)
    for c in range(img.shape[0]):
        if np.ptp(img[c]) > 0:
            out[c] = normalize_channel(img[c], lower, upper)
    return out
