"""Strong student augmentation (DESIGN.md §2 step 3).

Intensity changes act on the image only; the random D4 transform acts identically on the image,
the pseudo-labels and the masks, with flows treated as vectors. Without augmentation the student
just copies the teacher (the paper's ablation collapses), so every sample is perturbed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfadapt_deploy.tiling import D4, d4_transform


def _uniform(lo: float, hi: float, n: int, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of C×H×W (reflect padding)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.device)
    c = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


@dataclass(frozen=True)
class StrongAugment:
    """Per-sample intensity augmentation of a normalised B×C×H×W batch (ranges are uniform).

    It runs on the batch's device. The per-sample settings always come from the CPU generator
    ``g``; on the CPU the noise does too, and on another device it comes from a generator there,
    seeded from ``g`` (one draw), so a GPU step never copies its batch to the host and back."""

    scale: tuple[float, float] = (0.6, 1.4)  # multiplicative intensity
    shift: tuple[float, float] = (-0.15, 0.15)  # additive intensity
    gamma: tuple[float, float] = (0.6, 1.6)  # contrast: sign(x)·|x|^γ
    blur_sigma: tuple[float, float] = (0.0, 2.0)
    blur_p: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.15)  # Gaussian noise
    poisson_p: float = 0.3  # shot noise at a random photon count
    photons: tuple[float, float] = (5.0, 50.0)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        out = x.clone()
        noise_g = g
        if x.device.type != "cpu":
            seed = int(torch.randint(2**62, (1,), generator=g))
            noise_g = torch.Generator(device=x.device).manual_seed(seed)
        scale, shift = _uniform(*self.scale, n, g), _uniform(*self.shift, n, g)
        gamma, sigma = _uniform(*self.gamma, n, g), _uniform(*self.blur_sigma, n, g)
        blur, noise = torch.rand(n, generator=g) < self.blur_p, _uniform(*self.noise_std, n, g)
        poisson, photons = torch.rand(n, generator=g) < self.poisson_p, _uniform(*self.photons, n, g)
        for i in range(n):
            xi = out[i].sign() * out[i].abs() ** float(gamma[i])
            xi = xi * float(scale[i]) + float(shift[i])
            if blur[i]:
                xi = gaussian_blur(xi, float(sigma[i]))
            if poisson[i]:
                lam = float(photons[i])
                xi = torch.poisson(xi.clamp_min(0) * lam, generator=noise_g) / lam
            xi = xi + float(noise[i]) * torch.randn(xi.shape, generator=noise_g, device=xi.device)
            out[i] = xi
        return out


def random_d4(g: torch.Generator) -> tuple[int, bool]:
    """One of the 8 dihedral transforms, uniformly."""
    return D4[int(torch.randint(len(D4), (1,), generator=g))]


def move_map(m: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """D4 transform of a per-pixel map B×H×W (labels, probability masks)."""
    return d4_transform(m[:, None], k, flip)[:, 0]


def move_flow_mask(mask_flows: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Per-component flow masks (B×2×H×W) move like flows but are never negated: an odd rot90
    turns the Y component into the X component, so the two masks swap."""
    moved = d4_transform(mask_flows, k, flip)
    return moved.flip(1) if k % 2 else moved
