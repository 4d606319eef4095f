"""CPU kernels (numba, parallel): flow integration and flows-from-masks for flow QC.

Both reproduce the torch reference's arithmetic rather than approximate it:

* ``integrate_field`` walks every foreground pixel through all ``niter`` Euler steps with the
  bilinear read of ``grid_sample(align_corners=False, padding_mode="zeros")`` in float32 — the
  same formulas as ATen's CPU grid sampler, with the same FMA contraction, so positions are
  bit-identical to the torch reference and to cellpose's ``follow_flows``.
* ``mask_heat`` runs cellpose's heat diffusion (Jacobi sweeps of the 3×3 mean over pixels of the
  same mask, +1 at the centre before each sweep, float64) per mask inside its bounding box, masks
  in parallel, instead of sweeping the whole image; pixel results are identical because a pixel's
  heat depends only on pixels of its own mask.
"""

from __future__ import annotations

import numba
import numpy as np

from selfadapt_deploy.postprocess.flow_qc import NEIGHBOURS

_NUMBA_OPTS = dict(nogil=True, cache=True, fastmath={"contract"})
# 3×3 neighbourhood in cellpose's order (flow_qc.NEIGHBOURS), so sums round the same way
_NY = np.array([dy for dy, _ in NEIGHBOURS])
_NX = np.array([dx for _, dx in NEIGHBOURS])


LANES = 16  # points walked together by one thread: independent chains overlap in the pipeline


@numba.njit(inline="always")
def _step(f: np.ndarray, base: int, h: int, w: int, gx: np.float32, gy: np.float32,
          half_w: np.float32, half_h: np.float32):
    """One Euler step of one point: bilinear read of the flat field ``f`` (image at ``base``,
    H×W×2 channels last) at (gx, gy), move, clamp."""
    one, half, zero = np.float32(1), np.float32(0.5), np.float32(0)
    ix = (gx + one) * half_w - half
    iy = (gy + one) * half_h - half
    x0f, y0f = np.floor(ix), np.floor(iy)
    x0, y0 = int(x0f), int(y0f)
    wx, wy = ix - x0f, iy - y0f  # east / south weights
    ex, ny = one - wx, one - wy  # west / north weights
    # zero padding: a corner outside the image contributes nothing
    inx0, inx1 = 0 <= x0 < w, 0 <= x0 + 1 < w
    iny0, iny1 = 0 <= y0 < h, 0 <= y0 + 1 < h
    dx = zero
    dy = zero
    k = base + 2 * (y0 * w + x0)  # north-west corner, x component
    row = 2 * w
    if iny0 and inx0:
        dx += f[k] * (ny * ex)
        dy += f[k + 1] * (ny * ex)
    if iny0 and inx1:
        dx += f[k + 2] * (ny * wx)
        dy += f[k + 3] * (ny * wx)
    if iny1 and inx0:
        dx += f[k + row] * (wy * ex)
        dy += f[k + row + 1] * (wy * ex)
    if iny1 and inx1:
        dx += f[k + row + 2] * (wy * wx)
        dy += f[k + row + 3] * (wy * wx)
    return min(max(gx + dx, -one), one), min(max(gy + dy, -one), one)


@numba.njit(parallel=True, **_NUMBA_OPTS)
def integrate_field(field: np.ndarray, start: np.ndarray, image: np.ndarray, niter: int) -> np.ndarray:
    """Final normalised positions (N×2, x then y, in [-1, 1]) of points ``start`` (N×2, same units).

    ``field`` is B×H×W×2 float32: the (x, y) displacement per step in normalised grid units,
    channels last so that one corner read brings both components. Point ``i`` moves on image
    ``image[i]``. The bilinear read is ATen's CPU ``grid_sample`` (bilinear, zeros,
    align_corners=False): source index ``(g + 1)·(L/2) − 0.5``, weights ``w = i − floor(i)``
    and ``1 − w``, corners summed nw, ne, sw, se. Each thread advances ``LANES`` points step by
    step together, so their independent dependency chains overlap.
    """
    n = start.shape[0]
    h, w = field.shape[1], field.shape[2]
    half_w, half_h = np.float32(w / 2), np.float32(h / 2)
    flat = field.ravel()
    out = np.empty_like(start)
    for chunk in numba.prange((n + LANES - 1) // LANES):
        lo = chunk * LANES
        hi = min(lo + LANES, n)
        gx = start[lo:hi, 0].copy()
        gy = start[lo:hi, 1].copy()
        for _ in range(niter):
            for j in range(hi - lo):
                base = image[lo + j] * 2 * h * w
                gx[j], gy[j] = _step(flat, base, h, w, gx[j], gy[j], half_w, half_h)
        out[lo:hi, 0] = gx
        out[lo:hi, 1] = gy
    return out


@numba.njit(parallel=True, **_NUMBA_OPTS)
def mask_heat(masks: np.ndarray, boxes: np.ndarray, centres: np.ndarray, niter: int) -> np.ndarray:
    """Heat map (Y×X float64) of every mask after ``niter`` diffusion sweeps from its centre.

    ``masks`` labels 1..K; ``boxes`` K×4 (y0, y1, x0, x1), ``centres`` K×2 (y, x). Each sweep sets
    a pixel to the sum of its 3×3 neighbours of the same mask (itself included) divided by 9.
    """
    heat = np.zeros(masks.shape, np.float64)
    for k in numba.prange(boxes.shape[0]):
        label = k + 1
        y0, y1, x0, x1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
        hy, hx = y1 - y0 + 2, x1 - x0 + 2  # one pixel of margin, like the padded image
        inside = np.zeros((hy, hx), np.bool_)
        for y in range(y0, y1):
            for x in range(x0, x1):
                inside[y - y0 + 1, x - x0 + 1] = masks[y, x] == label
        a = np.zeros((hy, hx), np.float64)
        b = np.zeros((hy, hx), np.float64)
        cy, cx = centres[k, 0] - y0 + 1, centres[k, 1] - x0 + 1
        for _ in range(niter):
            a[cy, cx] += 1.0
            for y in range(1, hy - 1):
                for x in range(1, hx - 1):
                    if inside[y, x]:
                        s = 0.0
                        for j in range(9):  # cellpose's neighbour order, for the same rounding
                            yy, xx = y + _NY[j], x + _NX[j]
                            if inside[yy, xx]:
                                s += a[yy, xx]
                        b[y, x] = s / 9.0
            a, b = b, a
        for y in range(y0, y1):
            for x in range(x0, x1):
                if inside[y - y0 + 1, x - x0 + 1]:
                    heat[y, x] = a[y - y0 + 1, x - x0 + 1]
    return heat
