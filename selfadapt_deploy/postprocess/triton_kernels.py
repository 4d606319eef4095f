"""GPU kernels (Triton): fused flow integration, one launch for all pixels of a batch (2-D) or
all voxels of a volume (3-D, :func:`integrate_field_3d`).

Each program takes ``BLOCK`` pixels and walks them through all ``niter`` Euler steps with the
bilinear read of ``grid_sample(align_corners=False, padding_mode="zeros")`` — positions stay in
registers, the field is read through the cache — where cellpose launches one ``grid_sample`` per
step.

The arithmetic is the CPU reference's, operation for operation (``numba_kernels.integrate_field``,
i.e. ATen's CPU grid sampler): source index ``fma(g + 1, L/2, −0.5)``, weights ``w = i − floor(i)``
and ``1 − w``, corners accumulated nw, ne, sw, se with explicit FMAs, and the compiler's own
mul+add contraction switched off (``enable_fp_fusion=False``) so that no other operation is fused.
Every remaining operation (add, mul, fma, floor, min, max) is correctly rounded in IEEE float32 on
the GPU, so this targets the CPU positions bit for bit, where ATen's CUDA sampler (cellpose's GPU
path) contracts differently and drifts from them (``../shared/GPU_FACTS.md``: up to 0.65 px after
200 steps). Whatever the compiler does, the tests hold it to what the method guarantees (positions
within 1e-3 px for nearly all pixels, masks equal in AP terms).

Runs on CUDA, and on CPU under Triton's interpreter (``TRITON_INTERPRET=1``) for tests; the
interpreter evaluates ``fma`` unfused, so there it matches the reference to rounding only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _integrate_kernel(field_ptr, start_ptr, image_ptr, out_ptr, n, H, W, half_w, half_h, niter,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    gx = tl.load(start_ptr + 2 * offs, mask=valid, other=0.0)
    gy = tl.load(start_ptr + 2 * offs + 1, mask=valid, other=0.0)
    b = tl.load(image_ptr + offs, mask=valid, other=0).to(tl.int64)
    plane = H * W
    base_x = field_ptr + b * 2 * plane  # channel 0: x displacement; channel 1 (+plane): y
    for _ in range(niter):
        ix = tl.fma(gx + 1.0, half_w, -0.5)
        iy = tl.fma(gy + 1.0, half_h, -0.5)
        x0f = tl.floor(ix)
        y0f = tl.floor(iy)
        wx = ix - x0f  # east / south weights
        wy = iy - y0f
        ex = 1.0 - wx  # west / north weights
        ny = 1.0 - wy
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        nw = ny * ex
        ne = ny * wx
        sw = wy * ex
        se = wy * wx
        in_x0 = (x0 >= 0) & (x0 < W)
        in_x1 = (x0 + 1 >= 0) & (x0 + 1 < W)
        in_y0 = (y0 >= 0) & (y0 < H)
        in_y1 = (y0 + 1 >= 0) & (y0 + 1 < H)
        off = (y0 * W + x0).to(tl.int64)
        m_nw = valid & in_y0 & in_x0
        m_ne = valid & in_y0 & in_x1
        m_sw = valid & in_y1 & in_x0
        m_se = valid & in_y1 & in_x1
        # a corner outside the image reads 0: fma(0, w, acc) == acc, as the reference's zero border
        dx = tl.load(base_x + off, mask=m_nw, other=0.0) * nw
        dx = tl.fma(tl.load(base_x + off + 1, mask=m_ne, other=0.0), ne, dx)
        dx = tl.fma(tl.load(base_x + off + W, mask=m_sw, other=0.0), sw, dx)
        dx = tl.fma(tl.load(base_x + off + W + 1, mask=m_se, other=0.0), se, dx)
        dy = tl.load(base_x + plane + off, mask=m_nw, other=0.0) * nw
        dy = tl.fma(tl.load(base_x + plane + off + 1, mask=m_ne, other=0.0), ne, dy)
        dy = tl.fma(tl.load(base_x + plane + off + W, mask=m_sw, other=0.0), sw, dy)
        dy = tl.fma(tl.load(base_x + plane + off + W + 1, mask=m_se, other=0.0), se, dy)
        gx = tl.minimum(tl.maximum(gx + dx, -1.0), 1.0)
        gy = tl.minimum(tl.maximum(gy + dy, -1.0), 1.0)
    tl.store(out_ptr + 2 * offs, gx, mask=valid)
    tl.store(out_ptr + 2 * offs + 1, gy, mask=valid)


def integrate_field(field: torch.Tensor, start: torch.Tensor, image: torch.Tensor, niter: int,
                    block: int = 256) -> torch.Tensor:
    """Final normalised positions (N×2, x then y) of ``start`` (N×2) moved by ``field``
    (B×2×H×W float32, (x, y) grid units per step) on image ``image[i]`` (N, int32)."""
    field, start, image = field.contiguous(), start.contiguous(), image.contiguous()
    n = start.shape[0]
    out = torch.empty_like(start)
    if n == 0:
        return out
    h, w = field.shape[-2:]
    grid = (triton.cdiv(n, block),)
    # L/2 rounded to float32 once, as the reference's np.float32(w / 2)
    _integrate_kernel[grid](field, start, image, out, n, h, w, float(w) / 2, float(h) / 2, niter,
                            BLOCK=block, enable_fp_fusion=False)
    return out


@triton.jit
def _trilinear(base, row, plane, m_tnw, m_tne, m_tsw, m_tse, m_bnw, m_bne, m_bsw, m_bse,
               w_tnw, w_tne, w_tsw, w_tse, w_bnw, w_bne, w_bsw, w_bse):
    """One channel's trilinear read: corners tnw, tne, tsw, tse, bnw, bne, bsw, bse summed in that
    order; a corner outside the volume reads 0 and adds 0·w = 0, as the reference's zero border."""
    acc = tl.load(base, mask=m_tnw, other=0.0) * w_tnw
    acc = acc + tl.load(base + 1, mask=m_tne, other=0.0) * w_tne
    acc = acc + tl.load(base + row, mask=m_tsw, other=0.0) * w_tsw
    acc = acc + tl.load(base + row + 1, mask=m_tse, other=0.0) * w_tse
    acc = acc + tl.load(base + plane, mask=m_bnw, other=0.0) * w_bnw
    acc = acc + tl.load(base + plane + 1, mask=m_bne, other=0.0) * w_bne
    acc = acc + tl.load(base + plane + row, mask=m_bsw, other=0.0) * w_bsw
    acc = acc + tl.load(base + plane + row + 1, mask=m_bse, other=0.0) * w_bse
    return acc


@triton.jit
def _integrate_kernel_3d(field_ptr, start_ptr, out_ptr, n, D, H, W, row, plane, volume,
                         size_x, size_y, size_z, niter, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    gx = tl.load(start_ptr + 3 * offs, mask=valid, other=0.0)
    gy = tl.load(start_ptr + 3 * offs + 1, mask=valid, other=0.0)
    gz = tl.load(start_ptr + 3 * offs + 2, mask=valid, other=0.0)
    for _ in range(niter):
        # ((g + 1)·L − 1) / 2, the halving as an exact product
        ix = ((gx + 1.0) * size_x - 1.0) * 0.5
        iy = ((gy + 1.0) * size_y - 1.0) * 0.5
        iz = ((gz + 1.0) * size_z - 1.0) * 0.5
        x0f = tl.floor(ix)
        y0f = tl.floor(iy)
        z0f = tl.floor(iz)
        west = (x0f + 1.0) - ix
        east = ix - x0f
        north = (y0f + 1.0) - iy
        south = iy - y0f
        top = (z0f + 1.0) - iz
        bottom = iz - z0f
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        z0 = z0f.to(tl.int32)
        in_x0 = (x0 >= 0) & (x0 < W)
        in_x1 = (x0 + 1 >= 0) & (x0 + 1 < W)
        in_y0 = (y0 >= 0) & (y0 < H)
        in_y1 = (y0 + 1 >= 0) & (y0 + 1 < H)
        in_z0 = valid & (z0 >= 0) & (z0 < D)
        in_z1 = valid & (z0 + 1 >= 0) & (z0 + 1 < D)
        m_tnw = in_z0 & in_y0 & in_x0
        m_tne = in_z0 & in_y0 & in_x1
        m_tsw = in_z0 & in_y1 & in_x0
        m_tse = in_z0 & in_y1 & in_x1
        m_bnw = in_z1 & in_y0 & in_x0
        m_bne = in_z1 & in_y0 & in_x1
        m_bsw = in_z1 & in_y1 & in_x0
        m_bse = in_z1 & in_y1 & in_x1
        # weights (x·y)·z, as the reference's products
        w_tnw = west * north * top
        w_tne = east * north * top
        w_tsw = west * south * top
        w_tse = east * south * top
        w_bnw = west * north * bottom
        w_bne = east * north * bottom
        w_bsw = west * south * bottom
        w_bse = east * south * bottom
        k = field_ptr + z0.to(tl.int64) * plane + y0.to(tl.int64) * row + x0.to(tl.int64)
        dx = _trilinear(k, row, plane, m_tnw, m_tne, m_tsw, m_tse, m_bnw, m_bne, m_bsw, m_bse,
                        w_tnw, w_tne, w_tsw, w_tse, w_bnw, w_bne, w_bsw, w_bse)
        dy = _trilinear(k + volume, row, plane, m_tnw, m_tne, m_tsw, m_tse, m_bnw, m_bne, m_bsw,
                        m_bse, w_tnw, w_tne, w_tsw, w_tse, w_bnw, w_bne, w_bsw, w_bse)
        dz = _trilinear(k + 2 * volume, row, plane, m_tnw, m_tne, m_tsw, m_tse, m_bnw, m_bne, m_bsw,
                        m_bse, w_tnw, w_tne, w_tsw, w_tse, w_bnw, w_bne, w_bsw, w_bse)
        gx = tl.minimum(tl.maximum(gx + dx, -1.0), 1.0)
        gy = tl.minimum(tl.maximum(gy + dy, -1.0), 1.0)
        gz = tl.minimum(tl.maximum(gz + dz, -1.0), 1.0)
    tl.store(out_ptr + 3 * offs, gx, mask=valid)
    tl.store(out_ptr + 3 * offs + 1, gy, mask=valid)
    tl.store(out_ptr + 3 * offs + 2, gz, mask=valid)


def integrate_field_3d(field: torch.Tensor, start: torch.Tensor, niter: int,
                       block: int = 256) -> torch.Tensor:
    """Final normalised positions (N×3, x, y, z) of ``start`` (N×3) moved by ``field`` (3×Z×Y×X
    float32, the (x, y, z) displacement per step in normalised units), walked all ``niter`` steps
    in one launch. The arithmetic of ATen's CPU ``grid_sampler_3d`` (align_corners=False, zero
    padding) as ``numba_kernels.integrate_field_3d`` does it — source index ((g + 1)·L − 1)/2,
    weights as (x·y)·z products, corners summed in one order, no FMAs — so on the CPU reference's
    numbers it targets the same positions."""
    field, start = field.contiguous(), start.contiguous()
    n = start.shape[0]
    out = torch.empty_like(start)
    if n == 0:
        return out
    d, h, w = field.shape[-3:]
    grid = (triton.cdiv(n, block),)
    _integrate_kernel_3d[grid](field, start, out, n, d, h, w, w, h * w, d * h * w, float(w), float(h),
                               float(d), niter, BLOCK=block, enable_fp_fusion=False)
    return out
