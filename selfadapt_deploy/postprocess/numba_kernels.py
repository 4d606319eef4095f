"""CPU kernels (numba, parallel): flow integration and the flow QC (flows from masks, errors).

They reproduce the reference arithmetic rather than approximate it:

* ``integrate_field`` walks every foreground pixel through all ``niter`` Euler steps with the
  bilinear read of ``grid_sample(align_corners=False, padding_mode="zeros")`` in float32 — the
  same formulas as ATen's CPU grid sampler, with its FMAs written out, so positions are
  bit-identical to the torch reference and to cellpose's ``follow_flows``. It has no branches:
  LLVM vectorises the points of a thread with gather loads.
* ``mask_heat`` runs cellpose's heat diffusion (Jacobi sweeps of the 3×3 mean over pixels of the
  same mask, +1 at the centre before each sweep, float64) per mask inside its bounding box, masks
  in parallel, instead of sweeping the whole image; pixel results are identical because a pixel's
  heat depends only on pixels of its own mask. ``mask_centres`` and ``mask_flow_errors`` are the
  rest of cellpose's ``flow_error`` per mask, with no image-sized temporaries.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_NUMBA_OPTS = dict(nogil=True, cache=True)  # no fast-math: every operation rounds as written

LANES = 16  # points one thread walks together: the lane loop vectorises (gathers), chains overlap


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once (``llvm.fma``): where ATen's compiled grid sampler contracts."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, args)

    return sig, codegen


@numba.njit(parallel=True, **_NUMBA_OPTS)
def integrate_field(field: np.ndarray, start: np.ndarray, image: np.ndarray, niter: int) -> np.ndarray:
    """Final normalised positions (N×2, x then y, in [-1, 1]) of points ``start`` (N×2, same units).

    ``field`` is B×(H+2)×(W+2)×2 float32: the (x, y) displacement per step in normalised grid
    units, channels last, with a border of zeros — a corner outside the image then reads 0 and
    adds nothing, as ``grid_sample``'s zero padding, with no branch. Point ``i`` moves on image
    ``image[i]``. The bilinear read is ATen's CPU ``grid_sample`` (bilinear, zeros,
    align_corners=False): source index ``(g + 1)·(L/2) − 0.5``, weights ``w = i − floor(i)`` and
    ``1 − w``, corners accumulated nw, ne, sw, se with the same FMAs.
    """
    n = start.shape[0]
    h, w = field.shape[1] - 2, field.shape[2] - 2
    half_w, half_h = np.float32(w / 2), np.float32(h / 2)
    one, half = np.float32(1), np.float32(0.5)
    flat = field.ravel()
    row = 2 * (w + 2)
    out = np.empty_like(start)
    for chunk in numba.prange((n + LANES - 1) // LANES):
        lo = chunk * LANES
        gx = np.empty(LANES, np.float32)
        gy = np.empty(LANES, np.float32)
        base = np.empty(LANES, np.int64)
        for j in range(LANES):
            i = min(lo + j, n - 1)  # the last chunk repeats its last point
            gx[j], gy[j] = start[i, 0], start[i, 1]
            base[j] = image[i] * row * (h + 2) + row + 2  # pixel (0, 0) inside the border
        for _ in range(niter):
            for j in range(LANES):
                ix = _fma(gx[j] + one, half_w, -half)
                iy = _fma(gy[j] + one, half_h, -half)
                x0f, y0f = np.floor(ix), np.floor(iy)
                wx, wy = ix - x0f, iy - y0f  # east / south weights
                ex, ny = one - wx, one - wy  # west / north weights
                # clamped positions give x0 in [-1, w-1]; the clamp also keeps NaN in bounds
                x0 = min(max(np.int64(x0f), -1), w - 1)
                y0 = min(max(np.int64(y0f), -1), h - 1)
                k = base[j] + y0 * row + 2 * x0  # north-west corner, x component
                nw, ne, sw, se = ny * ex, ny * wx, wy * ex, wy * wx
                dx = _fma(flat[k + row + 2], se, _fma(flat[k + row], sw,
                                                      _fma(flat[k + 2], ne, flat[k] * nw)))
                dy = _fma(flat[k + row + 3], se, _fma(flat[k + row + 1], sw,
                                                      _fma(flat[k + 3], ne, flat[k + 1] * nw)))
                gx[j] = min(max(gx[j] + dx, -one), one)
                gy[j] = min(max(gy[j] + dy, -one), one)
        for j in range(min(LANES, n - lo)):
            out[lo + j, 0], out[lo + j, 1] = gx[j], gy[j]
    return out


@numba.njit(parallel=True, **_NUMBA_OPTS)
def mask_centres(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """K×2 (y, x) diffusion source per label 1..K, as cellpose's ``center_of_mass``.

    The mean pixel position in bounding-box coordinates rounded half to even; if that pixel is not
    in the mask, the mask pixel nearest to it (first in row-major order on ties).
    """
    centres = np.empty((boxes.shape[0], 2), np.int64)
    for k in numba.prange(boxes.shape[0]):
        label = k + 1
        y0, y1, x0, x1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
        n, sy, sx = 0, 0, 0
        for y in range(y0, y1):
            for x in range(x0, x1):
                if masks[y, x] == label:
                    n += 1
                    sy += y - y0
                    sx += x - x0
        cy, cx = y0 + round(sy / n), x0 + round(sx / n)
        if masks[cy, cx] != label:
            best = -1
            for y in range(y0, y1):
                for x in range(x0, x1):
                    d2 = (y - cy) ** 2 + (x - cx) ** 2
                    if masks[y, x] == label and (best < 0 or d2 < best):
                        best, by, bx = d2, y, x
            cy, cx = by, bx
        centres[k, 0], centres[k, 1] = cy, cx
    return centres


@numba.njit(parallel=True, **_NUMBA_OPTS)
def mask_heat(masks: np.ndarray, boxes: np.ndarray, centres: np.ndarray, niter: int) -> np.ndarray:
    """Heat map after ``niter`` diffusion sweeps from every mask's centre, (Y+2)×(X+2) float64
    with a zero border (cellpose's padded image).

    ``masks`` labels 1..K; ``boxes`` K×4 (y0, y1, x0, x1), ``centres`` K×2 (y, x). Each sweep sets
    a pixel of a mask to the sum of its 3×3 neighbours in the same mask (itself included) / 9.
    Pixels outside the mask stay 0 in its box, so the sweep is a plain 3×3 stencil times the
    mask's indicator: adding their zeros leaves every sum unchanged, and the loop vectorises.
    """
    heat = np.zeros((masks.shape[0] + 2, masks.shape[1] + 2), np.float64)
    for k in numba.prange(boxes.shape[0]):
        label = k + 1
        y0, y1, x0, x1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
        hy, hx = y1 - y0 + 2, x1 - x0 + 2  # one pixel of margin, like the padded image
        inside = np.zeros((hy, hx), np.float64)
        for y in range(y0, y1):
            for x in range(x0, x1):
                if masks[y, x] == label:
                    inside[y - y0 + 1, x - x0 + 1] = 1.0
        a = np.zeros((hy, hx), np.float64)
        b = np.zeros((hy, hx), np.float64)
        cy, cx = centres[k, 0] - y0 + 1, centres[k, 1] - x0 + 1
        for _ in range(niter):
            a[cy, cx] += 1.0
            for y in range(1, hy - 1):
                up, mid, down, out, ins = a[y - 1], a[y], a[y + 1], b[y], inside[y]
                for x in range(1, hx - 1):
                    # summed in cellpose's neighbour order (flow_qc.NEIGHBOURS): same rounding
                    s = (mid[x] + up[x] + down[x] + mid[x - 1] + mid[x + 1]
                         + up[x - 1] + up[x + 1] + down[x - 1] + down[x + 1])
                    out[x] = s / 9.0 * ins[x]
            a, b = b, a
        for y in range(y0, y1):
            for x in range(x0, x1):
                if inside[y - y0 + 1, x - x0 + 1] != 0.0:
                    heat[y + 1, x + 1] = a[y - y0 + 1, x - x0 + 1]
    return heat


@numba.njit(parallel=True, **_NUMBA_OPTS)
def mask_flow_errors(masks: np.ndarray, heat: np.ndarray, flows: np.ndarray, boxes: np.ndarray,
                     five) -> np.ndarray:
    """Per-mask mean of |flows from heat − flows / five|² (cellpose's ``flow_error``).

    ``heat`` is :func:`mask_heat`'s padded map; a pixel's flow is its central difference (any
    neighbour's heat, also another mask's, as in cellpose), normalised to unit length. ``five``
    has the flows' dtype so the division rounds as numpy's ``flows / 5.`` does.
    """
    errors = np.zeros(boxes.shape[0], np.float64)
    for k in numba.prange(boxes.shape[0]):
        label = k + 1
        total, n = 0.0, 0
        for y in range(boxes[k, 0], boxes[k, 1]):
            for x in range(boxes[k, 2], boxes[k, 3]):
                if masks[y, x] == label:
                    dy = heat[y + 2, x + 1] - heat[y, x + 1]
                    dx = heat[y + 1, x + 2] - heat[y + 1, x]
                    norm = 1e-60 + np.sqrt(dy * dy + dx * dx)
                    ey = dy / norm - np.float64(flows[0, y, x] / five)
                    ex = dx / norm - np.float64(flows[1, y, x] / five)
                    total += ey * ey + ex * ex
                    n += 1
        errors[k] = total / n
    return errors


@numba.njit(**_NUMBA_OPTS)
def fill_holes(masks: np.ndarray, boxes: np.ndarray) -> None:
    """Give each mask the holes inside its bounding box, in place, masks in label order.

    A hole is a pixel of the box, not in the mask, that the box border cannot reach through
    4-connected pixels outside the mask (``fill_voids.fill`` on the box, as cellpose). Sequential
    on purpose: a mask filled over an enclosed one changes what later masks see, as in cellpose's
    loop.
    """
    for k in range(boxes.shape[0]):
        label = k + 1
        y0, y1, x0, x1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
        hy, hx = y1 - y0, x1 - x0
        reached = np.zeros((hy, hx), np.bool_)
        stack = np.empty(hy * hx, np.int64)
        top = 0
        for y in range(hy):  # seeds: border pixels outside the mask
            for x in range(hx):
                border = y == 0 or y == hy - 1 or x == 0 or x == hx - 1
                if border and masks[y0 + y, x0 + x] != label:
                    reached[y, x] = True
                    stack[top] = y * hx + x
                    top += 1
        while top > 0:
            top -= 1
            y, x = stack[top] // hx, stack[top] % hx
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if (0 <= yy < hy and 0 <= xx < hx and not reached[yy, xx]
                        and masks[y0 + yy, x0 + xx] != label):
                    reached[yy, xx] = True
                    stack[top] = yy * hx + xx
                    top += 1
        for y in range(hy):
            for x in range(hx):
                if not reached[y, x]:
                    masks[y0 + y, x0 + x] = label


@numba.njit(**_NUMBA_OPTS)
def _seed_face_run(masks, label, z, y, x, reached, stack, top, placed, oz, oy, ox):
    """fill_voids' face scan step: push the voxel when it starts a run of background in scan order
    (``placed`` says the previous scanned voxel was background — across row ends too)."""
    if masks[oz + z, oy + y, ox + x] != label:
        if not placed and not reached[z, y, x]:
            reached[z, y, x] = True
            stack[top] = (z * reached.shape[1] + y) * reached.shape[2] + x
            top += 1
        return top, True
    return top, False


@numba.njit(**_NUMBA_OPTS)
def fill_holes_3d(masks: np.ndarray, boxes: np.ndarray) -> None:
    """:func:`fill_holes` for Z×Y×X labels, exactly as ``fill_voids.fill`` on each mask's box (what
    cellpose calls): the box's faces are scanned in fill_voids' order (it sees the box in Fortran
    order: Z fastest) and a background voxel seeds the 6-connected flood only when it starts a run
    of background in that scan — a run that continues across a row end seeds no new point, so a
    face voxel shut off inside the box there counts as a hole, as in fill_voids. What the flood
    cannot reach is given to the mask."""
    for k in range(boxes.shape[0]):
        label = k + 1
        oz, oy, ox = boxes[k, 0], boxes[k, 2], boxes[k, 4]
        a, b, c = boxes[k, 1] - oz, boxes[k, 3] - oy, boxes[k, 5] - ox  # fill_voids' sx, sy, sz
        reached = np.zeros((a, b, c), np.bool_)
        stack = np.empty(a * b * c + 1, np.int64)
        top = 0
        front, back = False, False
        for j in range(b):  # faces c = 0 and c = C−1, x (= Z) fastest
            for i in range(a):
                top, front = _seed_face_run(masks, label, i, j, 0, reached, stack, top, front, oz, oy, ox)
                top, back = _seed_face_run(masks, label, i, j, c - 1, reached, stack, top, back, oz, oy, ox)
        front, back = False, False
        for m in range(c):  # faces b = 0 and b = B−1
            for i in range(a):
                top, front = _seed_face_run(masks, label, i, 0, m, reached, stack, top, front, oz, oy, ox)
                top, back = _seed_face_run(masks, label, i, b - 1, m, reached, stack, top, back, oz, oy, ox)
        front, back = False, False
        for m in range(c):  # faces a = 0 and a = A−1
            for j in range(b):
                top, front = _seed_face_run(masks, label, 0, j, m, reached, stack, top, front, oz, oy, ox)
                top, back = _seed_face_run(masks, label, a - 1, j, m, reached, stack, top, back, oz, oy, ox)
        while top > 0:
            top -= 1
            i = stack[top]
            z, y, x = i // (b * c), (i // c) % b, i % c
            for dz, dy, dx in ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)):
                zz, yy, xx = z + dz, y + dy, x + dx
                if (0 <= zz < a and 0 <= yy < b and 0 <= xx < c and not reached[zz, yy, xx]
                        and masks[oz + zz, oy + yy, ox + xx] != label):
                    reached[zz, yy, xx] = True
                    stack[top] = (zz * b + yy) * c + xx
                    top += 1
        for z in range(a):
            for y in range(b):
                for x in range(c):
                    if not reached[z, y, x]:
                        masks[oz + z, oy + y, ox + x] = label


@numba.njit(parallel=True, **_NUMBA_OPTS)
def integrate_field_3d(field: np.ndarray, start: np.ndarray, niter: int) -> np.ndarray:
    """Final normalised positions (N×3, x, y, z, in [-1, 1]) of points ``start`` (N×3, same units).

    ``field`` is (Z+2)×(Y+2)×(X+2)×3 float32, the (x, y, z) displacement per step in normalised
    units, channels last, with a border of zeros (a corner outside the volume adds 0, as
    ``grid_sample``'s zero padding skips it). The trilinear read is ATen's scalar CPU
    ``grid_sampler_3d`` (align_corners=False), operation for operation: source index
    ``((g + 1)·L − 1) / 2``, corner weights as products of the three axis distances (x, then y,
    then z), the eight corners summed tnw, tne, tsw, tse, bnw, bne, bsw, bse, no FMAs — so the
    positions are bit-identical to the torch reference; points in parallel, ``LANES`` per thread
    walked together so that their dependency chains overlap (torch's 3-D sampler runs one thread
    for a single volume).
    """
    n = start.shape[0]
    d, h, w = field.shape[0] - 2, field.shape[1] - 2, field.shape[2] - 2
    size_x, size_y, size_z = np.float32(w), np.float32(h), np.float32(d)
    one, two = np.float32(1), np.float32(2)
    flat = field.ravel()
    row, plane = 3 * (w + 2), 3 * (w + 2) * (h + 2)
    out = np.empty_like(start)
    for chunk in numba.prange((n + LANES - 1) // LANES):  # LANES points a thread walks together
        lo = chunk * LANES
        g = np.empty((3, LANES), np.float32)
        for j in range(LANES):
            i = min(lo + j, n - 1)  # the last chunk repeats its last point
            g[0, j], g[1, j], g[2, j] = start[i, 0], start[i, 1], start[i, 2]
        for _ in range(niter):
            for j in range(LANES):
                ix = ((g[0, j] + one) * size_x - one) / two
                iy = ((g[1, j] + one) * size_y - one) / two
                iz = ((g[2, j] + one) * size_z - one) / two
                x0f, y0f, z0f = np.floor(ix), np.floor(iy), np.floor(iz)
                west, east = (x0f + one) - ix, ix - x0f
                north, south = (y0f + one) - iy, iy - y0f
                top, bottom = (z0f + one) - iz, iz - z0f
                # clamped positions give corners in [-1, L-1]; inside the border after the +1 shift
                x0 = min(max(np.int64(x0f), -1), w - 1) + 1
                y0 = min(max(np.int64(y0f), -1), h - 1) + 1
                z0 = min(max(np.int64(z0f), -1), d - 1) + 1
                weights = (west * north * top, east * north * top, west * south * top,
                           east * south * top, west * north * bottom, east * north * bottom,
                           west * south * bottom, east * south * bottom)
                k = z0 * plane + y0 * row + 3 * x0
                corners = (k, k + 3, k + row, k + row + 3, k + plane, k + plane + 3,
                           k + plane + row, k + plane + row + 3)
                dx, dy, dz = flat[k] * weights[0], flat[k + 1] * weights[0], flat[k + 2] * weights[0]
                for c in range(1, 8):
                    dx += flat[corners[c]] * weights[c]
                    dy += flat[corners[c] + 1] * weights[c]
                    dz += flat[corners[c] + 2] * weights[c]
                g[0, j] = min(max(g[0, j] + dx, -one), one)
                g[1, j] = min(max(g[1, j] + dy, -one), one)
                g[2, j] = min(max(g[2, j] + dz, -one), one)
        for j in range(min(LANES, n - lo)):
            out[lo + j, 0], out[lo + j, 1], out[lo + j, 2] = g[0, j], g[1, j], g[2, j]
    return out


@numba.njit(**_NUMBA_OPTS)
def first_of_equal(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``keys`` (N×K uint32) grouped by exact equality: (the first row of each group, in
    order of first appearance; the group of every row). One pass through an open-addressing hash
    table — linear time, where sorting the rows costs seconds for millions of points."""
    n, k = keys.shape
    size = 1
    while size < 2 * n:
        size *= 2
    mask = np.uint64(size - 1)
    table = np.full(size, -1, np.int64)
    first = np.empty(n, np.int64)
    group = np.empty(n, np.int64)
    groups = 0
    for i in range(n):
        h = np.uint64(14695981039346656037)
        for c in range(k):
            h = (h ^ np.uint64(keys[i, c])) * np.uint64(1099511628211)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x9E3779B97F4A7C15)
        slot = (h >> np.uint64(17)) & mask
        while True:
            g = table[slot]
            if g < 0:
                table[slot] = groups
                first[groups] = i
                group[i] = groups
                groups += 1
                break
            j = first[g]
            same = True
            for c in range(k):
                if keys[j, c] != keys[i, c]:
                    same = False
                    break
            if same:
                group[i] = g
                break
            slot = (slot + np.uint64(1)) & mask
    return first[:groups].copy(), group
