"""GPU kernel (Triton): fused flow integration, one launch for all pixels of a batch.

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
