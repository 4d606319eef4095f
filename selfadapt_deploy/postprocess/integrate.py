"""Flow integration: move every foreground pixel along the predicted flow for ``niter`` Euler steps.

This is the torch reference integrator. It reproduces cellpose 4.2's ``steps_interp`` arithmetic
on purpose — positions normalised by (L−1), sampled by ``grid_sample(align_corners=False)`` with
zero padding, i.e. bilinear reads at ``p·L/(L−1) − 0.5`` — because mask parity with cellpose is
the contract; faster kernels must reproduce the same arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def foreground(cellprob: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) indices of pixels whose cellprob logit exceeds ``threshold``, row-major."""
    return np.nonzero(cellprob > threshold)


@torch.no_grad()
def integrate(flows: np.ndarray, cellprob: np.ndarray, threshold: float, niter: int,
              device: torch.device | str = "cpu") -> tuple[tuple[np.ndarray, np.ndarray], torch.Tensor]:
    """Final positions of foreground pixels.

    Args: flows 2×Y×X in network units (≈5 × unit vectors); cellprob Y×X logits.
    Returns: ``(inds, positions)``: the foreground (y, x) indices and a 2×N float32 tensor of
    final (y, x) positions on ``device``.
    """
    inds = foreground(cellprob, threshold)
    # (x, y) extents L−1; grid units are 2/(L−1) per pixel. Operation order follows cellpose's
    # so that float32 rounding, and therefore the final integer positions, match exactly.
    extent = torch.tensor([cellprob.shape[1] - 1, cellprob.shape[0] - 1], dtype=torch.float32,
                          device=device)
    # flows are zeroed outside the foreground and divided by 5, as cellpose does
    fg = torch.from_numpy(cellprob > threshold).to(device)
    field = torch.from_numpy(np.ascontiguousarray(flows[::-1])).to(device, torch.float32)
    field = (field * fg / 5.0 * (2.0 / extent[:, None, None]))[None]  # 1×2(x, y)×Y×X grid units
    pts = torch.stack([torch.from_numpy(inds[1]), torch.from_numpy(inds[0])], dim=-1)
    pts = (pts.to(device, torch.float32) / extent * 2 - 1)[None, None]  # 1×1×N×2 in [-1, 1]
    for _ in range(niter):
        step = F.grid_sample(field, pts, align_corners=False)  # 1×2×1×N
        pts = torch.clamp(pts + step[0].permute(1, 2, 0)[None], -1.0, 1.0)
    pos = (pts[0, 0] + 1) * 0.5 * extent  # N×2 (x, y) in pixels
    return inds, pos.flip(-1).T.contiguous()
