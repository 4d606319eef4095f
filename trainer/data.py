"""Unlabeled training data: normalised images at the model's scale, sampled as random square tiles."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

import numpy as np
import torch

from selfadapt_deploy.segment import prepare_image
from selfadapt_deploy.volume import orthogonal_planes

__all__ = ["TileSampler", "as_planes", "keeps_global_rng", "prepare_image"]

P, R = ParamSpec("P"), TypeVar("R")


def keeps_global_rng(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` on a fork of torch's global RNG (CPU, and the current CUDA device's once CUDA is
    in use): training seeds it for the draws we cannot hand a generator (cellpose's own ViT
    layer drop), and the caller's random state is exactly as it was afterwards."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper


def as_planes(images: Sequence[np.ndarray], anisotropy: float) -> list[np.ndarray]:
    """2-D images as they are; each Z-stack (Z×C×Y×X) as its YX, ZX and ZY planes
    (``volume.orthogonal_planes``), how cellpose trains its 2-D network for 3-D."""
    out: list[np.ndarray] = []
    for image in images:
        out += orthogonal_planes(image, anisotropy) if image.ndim == 4 else [image]
    return out


class TileSampler:
    """Random ``tile``×``tile`` crops from a list of C×Y×X images; smaller images are zero-padded
    (as the network's own tiling pads them)."""

    def __init__(self, images: Sequence[np.ndarray], tile: int):
        if not images:
            raise ValueError("no images to sample tiles from")
        self.tile = tile
        self.images = [self._pad(im) for im in images]
        # sample images in proportion to their area, so big slides are not under-represented
        areas = np.array([im.shape[1] * im.shape[2] for im in self.images], float)
        self.weights = torch.from_numpy(areas / areas.sum())

    def _pad(self, im: np.ndarray) -> np.ndarray:
        py, px = max(0, self.tile - im.shape[1]), max(0, self.tile - im.shape[2])
        return np.pad(im, ((0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2)))

    def sample(self, batch_size: int, g: torch.Generator) -> torch.Tensor:
        """B×C×tile×tile float32."""
        picks = torch.multinomial(self.weights, batch_size, replacement=True, generator=g)
        tiles = []
        for i in picks.tolist():
            im = self.images[i]
            y = int(torch.randint(im.shape[1] - self.tile + 1, (1,), generator=g))
            x = int(torch.randint(im.shape[2] - self.tile + 1, (1,), generator=g))
            tiles.append(torch.from_numpy(np.ascontiguousarray(im[:, y : y + self.tile, x : x + self.tile])))
        return torch.stack(tiles).float()
