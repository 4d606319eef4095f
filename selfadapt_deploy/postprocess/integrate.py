"""Flow integration: move every foreground pixel along the predicted flow for ``niter`` Euler steps.

One contract, three integrators (``--integrator``):

* ``torch``  — the reference: cellpose 4.2's ``steps_interp`` (one ``grid_sample`` per step);
* ``numba``  — CPU kernel, parallel over pixels (``numba_kernels.integrate_field``), walking
  each set of bit-identical positions once (:func:`walk_merging`);
* ``triton`` — fused GPU kernel, one launch walks all pixels through all steps
  (``triton_kernels.integrate_field``).

All three reproduce cellpose 4.2's arithmetic on purpose — positions normalised by (L−1), sampled
like ``grid_sample(align_corners=False)`` with zero padding, i.e. bilinear reads at
``p·L/(L−1) − 0.5`` — because mask parity with cellpose is the contract. ``auto`` picks triton on
CUDA (when Triton is importable), numba on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from selfadapt_deploy.errors import SaDeployError

INTEGRATORS = ("auto", "torch", "numba", "triton")
MERGE_AT = (20, 30, 50, 100)  # steps after which points at bit-identical positions are merged
MIN_MERGE_GAIN = 0.9  # merge only when fewer than this fraction of the points would remain


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_interpreter() -> bool:
    """Triton's CPU interpreter (``TRITON_INTERPRET=1``), used to test the kernel without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_block(n: int) -> int:
    """Points per Triton program for ``n`` points: 256 on a GPU; under the interpreter, which runs
    programs one after another at a fixed cost per operation, one program for them all."""
    return max(256, 1 << max(0, n - 1).bit_length()) if _triton_interpreter() else 256


def resolve_integrator(name: str, device: torch.device | str) -> str:
    """The integrator ``name`` means on ``device``; an unusable explicit choice is an error."""
    device = torch.device(device)
    if name not in INTEGRATORS:
        raise SaDeployError(f"unknown integrator '{name}'; choose one of {', '.join(INTEGRATORS)}")
    if name == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() else "torch"
        return "numba" if device.type == "cpu" else "torch"
    if name == "numba" and device.type != "cpu":
        raise SaDeployError(f"--integrator numba runs on the CPU, but the device is {device}; use "
                            "--integrator triton or torch, or --device cpu")
    if name == "triton" and device.type != "cuda" and not _triton_interpreter():
        raise SaDeployError(f"--integrator triton needs a CUDA device (got {device}); use numba on "
                            "the CPU")
    if name == "triton" and not triton_available():
        raise SaDeployError("--integrator triton: the 'triton' package is not installed "
                            "(it ships with CUDA builds of torch on Linux)")
    return name


@dataclass
class Problem:
    """A batch prepared for the kernels: B×2×Y×X field (x, y) in grid units per step, start
    points N×2 (x, y) in [-1, 1], the image of each point, and the foreground (y, x) of all images
    (row-major, image after image) with each image's count."""

    field: torch.Tensor
    start: torch.Tensor
    image: torch.Tensor
    fg_y: torch.Tensor
    fg_x: torch.Tensor
    counts: list[int]
    extent: torch.Tensor  # (x, y) = (L−1) per axis

    def inds(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, the (y, x) foreground index tensors."""
        return list(zip(torch.split(self.fg_y, self.counts), torch.split(self.fg_x, self.counts),
                        strict=True))

    def positions(self, final: torch.Tensor) -> list[torch.Tensor]:
        """Per image 2×N (y, x) pixel positions from final normalised N×2 (x, y) points."""
        pos = ((final + 1) * 0.5 * self.extent).flip(-1).T
        return [p.contiguous() for p in torch.split(pos, self.counts, dim=1)]


def prepare(flows: torch.Tensor, cellprob: torch.Tensor, threshold: float) -> Problem:
    """flows B×2×Y×X (network units), cellprob B×Y×X, on any device → :class:`Problem` there.

    Operation order follows cellpose's so that float32 rounding, and therefore the final integer
    positions, match exactly: flows zeroed outside the foreground, divided by 5, scaled to grid
    units 2/(L−1); start points p/(L−1)·2 − 1.
    """
    device = flows.device
    ly, lx = cellprob.shape[-2:]
    extent = torch.tensor([lx - 1, ly - 1], dtype=torch.float32, device=device)
    fg = cellprob > threshold
    field = torch.where(fg[:, None], flows.flip(1).float(), 0.0)
    if not torch.isfinite(field).all():
        raise SaDeployError("the network's flows contain NaN or infinite values inside cells; the "
                            "model or the input image is broken (check the weights and the image's "
                            "intensities), or reduced precision overflowed (try --precision fp32)")
    field = (field / 5.0 * (2.0 / extent[:, None, None])).contiguous()
    image, y, x = torch.nonzero(fg, as_tuple=True)  # row-major, image after image
    pts = torch.stack([x, y], dim=-1).float()
    counts = fg.flatten(1).sum(1).tolist()
    return Problem(field, (pts / extent * 2 - 1).contiguous(), image.int(), y, x, counts, extent)


def _run_torch(p: Problem, niter: int) -> torch.Tensor:
    out = torch.empty_like(p.start)
    for b in range(p.field.shape[0]):
        sel = p.image == b
        pts = p.start[sel][None, None]  # 1×1×N×2
        for _ in range(niter):
            step = F.grid_sample(p.field[b : b + 1], pts, align_corners=False)  # 1×2×1×N
            pts = torch.clamp(pts + step[0].permute(1, 2, 0)[None], -1.0, 1.0)
        out[sel] = pts[0, 0]
    return out


def walk_merging(walk: Callable[[np.ndarray, np.ndarray | None, int], np.ndarray], start: np.ndarray,
                 niter: int, image: np.ndarray | None = None) -> np.ndarray:
    """Final positions of ``start`` (N×D float32; ``image``: N int32, the image each point walks
    on, None for one image) after ``niter`` steps of ``walk(points, image, steps)``, walking each
    group of points at bit-identical positions once.

    A step is a fixed function of (position, image), so points that meet at the same bits walk the
    same path from then on: merging them is exact. Flows converge, so most points of a cell meet
    within a few dozen steps (on cellpose-like flows only 10–25 % of the positions are distinct
    after 30–50 steps); the groups are found at ``MERGE_AT`` steps.
    """
    from selfadapt_deploy.postprocess.numba_kernels import first_of_equal

    points, images, group, done = start, image, None, 0
    for stop in (*(s for s in MERGE_AT if s < niter), niter):
        points, done = walk(points, images, stop - done), stop
        if done == niter:
            break
        keys = points.view(np.uint32)
        if images is not None:
            keys = np.concatenate([keys, images.view(np.uint32)[:, None]], axis=1)
        first, inverse = first_of_equal(np.ascontiguousarray(keys))
        if len(first) < MIN_MERGE_GAIN * len(points):
            points = points[first]
            images = None if images is None else images[first]
            group = inverse if group is None else inverse[group]
    return points if group is None else points[group]


def _run_numba(p: Problem, niter: int) -> torch.Tensor:
    from selfadapt_deploy.postprocess.numba_kernels import integrate_field

    b, _, h, w = p.field.shape
    field = np.zeros((b, h + 2, w + 2, 2), np.float32)  # channels last, border of zeros
    field[:, 1:-1, 1:-1] = p.field.numpy().transpose(0, 2, 3, 1)
    final = walk_merging(lambda pts, img, n: integrate_field(field, pts, img, n), p.start.numpy(),
                         niter, p.image.numpy())
    return torch.from_numpy(final)


def _run_triton(p: Problem, niter: int) -> torch.Tensor:
    from selfadapt_deploy.postprocess.triton_kernels import integrate_field

    return integrate_field(p.field, p.start, p.image, niter, triton_block(len(p.start)))


_RUN = {"torch": _run_torch, "numba": _run_numba, "triton": _run_triton}


@torch.no_grad()
def integrate_tensors(flows: torch.Tensor, cellprob: torch.Tensor, threshold: float, niter: int,
                      method: str = "auto") -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Per image of a batch on one device (flows B×2×Y×X, cellprob B×Y×X): foreground (y, x)
    index tensors and a 2×N float32 tensor of final (y, x) positions, all on that device. One
    kernel call for the batch."""
    method = resolve_integrator(method, flows.device)
    problem = prepare(flows, cellprob, threshold)
    if len(problem.start) == 0:
        return [(i, torch.zeros(2, 0, device=flows.device)) for i in problem.inds()]
    final = _RUN[method](problem, niter).to(flows.device)
    return list(zip(problem.inds(), problem.positions(final), strict=True))


def integrate_batch(flows: np.ndarray, cellprob: np.ndarray, threshold: float, niter: int,
                    device: torch.device | str = "cpu", method: str = "auto",
                    ) -> list[tuple[tuple[np.ndarray, np.ndarray], torch.Tensor]]:
    """:func:`integrate_tensors` for host arrays, run on ``device``: foreground indices as numpy
    arrays, positions as tensors on ``device``."""
    out = integrate_tensors(torch.from_numpy(flows).to(device), torch.from_numpy(cellprob).to(device),
                            threshold, niter, method)
    return [((y.cpu().numpy(), x.cpu().numpy()), pos) for (y, x), pos in out]


def integrate(flows: np.ndarray, cellprob: np.ndarray, threshold: float, niter: int,
              device: torch.device | str = "cpu", method: str = "auto",
              ) -> tuple[tuple[np.ndarray, np.ndarray], torch.Tensor]:
    """One image: flows 2×Y×X (network units), cellprob Y×X logits → ``(inds, positions)``."""
    return integrate_batch(flows[None], cellprob[None], threshold, niter, device, method)[0]
