"""Tiles with taper blending (as cellpose's ``run_net``) and the D4 test-time views.

Flow outputs are vectors: rotating/flipping an image rotates/flips its flow field, so (dY, dX)
are permuted/negated as well as moved. rot90 k=1 on dims (-2, -1): (dY, dX) → (−dX, dY);
flip X negates dX.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

PAD_DIV = 16  # networks downsample 4× by 2 (CPnet) or patchify by 8 (CPSAM)
MIN_OVERLAP, MAX_OVERLAP = 0.05, 0.5


def pad_amounts(ly: int, lx: int, min_size: int | None = None) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): pad to a multiple of 16 plus 8 each side, or up to one tile."""

    def one_axis(n: int) -> tuple[int, int]:
        if min_size is None or n >= min_size:
            extra = int(PAD_DIV * np.ceil(n / PAD_DIV) - n)
        else:
            extra = max(0, min_size - n - PAD_DIV)
        return PAD_DIV // 2 + extra // 2, PAD_DIV // 2 + extra - extra // 2

    return (*one_axis(ly), *one_axis(lx))


def tile_starts(length: int, tile: int, overlap: float) -> np.ndarray:
    """Start offsets of tiles along one axis: ``ceil((1+2·overlap)·L/tile)`` evenly spaced tiles."""
    if length <= tile:
        return np.zeros(1, int)
    n = int(np.ceil((1.0 + 2 * overlap) * length / tile))
    return np.linspace(0, length - tile, n).astype(int)


def count_tiles(ly: int, lx: int, tile: int, overlap: float, fixed_tile: bool) -> int:
    """How many tiles :func:`predict_tiled` runs for a Y×X image."""
    top, bottom, left, right = pad_amounts(ly, lx, tile if fixed_tile else None)
    ny = len(tile_starts(ly + top + bottom, tile, overlap))
    return ny * len(tile_starts(lx + left + right, tile, overlap))


def taper_mask(ly: int, lx: int, sig: float = 7.5) -> np.ndarray:
    """Separable weight ``1/(1+exp((|x−c| − (bsize/2−20))/sig))``, centre crop of a ≥224 window."""
    bsize = max(224, ly, lx)
    d = np.abs(np.arange(bsize) - (bsize - 1) / 2)
    w = 1 / (1 + np.exp((d - (bsize / 2 - 20)) / sig))
    mask = w[:, None] * w[None, :]
    y0, x0 = bsize // 2 - ly // 2, bsize // 2 - lx // 2
    return mask[y0 : y0 + ly, x0 : x0 + lx]


Predict = Callable[[torch.Tensor], torch.Tensor]  # B×C×h×w float32 → B×K×h×w float32, same device


@dataclass
class _Blend:
    """One image's tiling: padded image, tile corners and size, taper weight, blended sums."""

    padded: torch.Tensor
    pads: tuple[int, int, int, int]
    corners: list[tuple[int, int]]
    th: int
    tw: int
    weight: torch.Tensor
    out: torch.Tensor | None = None
    norm: torch.Tensor | None = None

    def add(self, corner: tuple[int, int], pred: torch.Tensor) -> None:
        y, x = corner
        if self.out is None:
            py, px = self.padded.shape[1:]
            self.out = torch.zeros((pred.shape[0], py, px), dtype=torch.float32, device=pred.device)
            self.norm = torch.zeros((py, px), dtype=torch.float64, device=pred.device)
        region = self.out[:, y : y + self.th, x : x + self.tw]
        region.copy_(region.double() + pred.double() * self.weight)
        self.norm[y : y + self.th, x : x + self.tw] += self.weight

    def result(self) -> torch.Tensor:
        top, bottom, left, right = self.pads
        py, px = self.padded.shape[1:]
        out = (self.out.double() / self.norm).float()
        return out[:, top : py - bottom, left : px - right]


def _plan(img: torch.Tensor, tile: int, overlap: float, fixed_tile: bool) -> _Blend:
    _, ly, lx = img.shape
    pads = pad_amounts(ly, lx, tile if fixed_tile else None)
    top, bottom, left, right = pads
    padded = torch.nn.functional.pad(img.float(), (left, right, top, bottom))
    py, px = padded.shape[1:]
    th, tw = min(tile, py), min(tile, px)
    corners = [(y, x) for y in tile_starts(py, tile, overlap) for x in tile_starts(px, tile, overlap)]
    return _Blend(padded, pads, corners, th, tw, torch.from_numpy(taper_mask(th, tw)).to(img.device))


def predict_tiled_many(predict: Predict, imgs: list[torch.Tensor], tile: int, overlap: float = 0.1,
                       batch_size: int = 8, fixed_tile: bool = True) -> list[torch.Tensor]:
    """:func:`predict_tiled` for several C×Y×X tensors: the tiles of all images (of one tile size)
    share network batches — small images fill a batch together instead of one call each. Each
    image's result is what :func:`predict_tiled` gives for it alone (same tiles, same blending
    order; in eval mode the network sees each tile independently), up to the last-bit rounding a
    convolution backend may change with the batch size."""
    if not MIN_OVERLAP <= overlap <= MAX_OVERLAP:
        raise ValueError(f"tile overlap must be in [{MIN_OVERLAP}, {MAX_OVERLAP}], got {overlap}")
    plans = [_plan(img, tile, overlap, fixed_tile) for img in imgs]
    by_shape: dict[tuple[int, int], list[tuple[_Blend, tuple[int, int]]]] = {}
    for plan in plans:
        by_shape.setdefault((plan.th, plan.tw), []).extend((plan, c) for c in plan.corners)
    for (th, tw), queue in by_shape.items():
        for b in range(0, len(queue), batch_size):
            batch = queue[b : b + batch_size]
            preds = predict(torch.stack([p.padded[:, y : y + th, x : x + tw] for p, (y, x) in batch]))
            for (plan, corner), pred in zip(batch, preds, strict=True):
                plan.add(corner, pred)
    return [plan.result() for plan in plans]


def predict_tiled(predict: Predict, img: torch.Tensor, tile: int, overlap: float = 0.1,
                  batch_size: int = 8, fixed_tile: bool = True) -> torch.Tensor:
    """Run ``predict`` over overlapping tiles of a C×Y×X tensor; blend with the taper mask → K×Y×X
    on the image's device (K: the predictor's channels). The arithmetic is cellpose's (float32
    output, float64 weights and normaliser), so results equal its ``run_net``.

    With ``fixed_tile=False`` (CPnet) an image smaller than a tile runs as one smaller tile, as in
    cellpose 3; with ``fixed_tile=True`` (CPSAM) it is padded up to a full tile, as in cellpose 4.
    """
    return predict_tiled_many(predict, [img], tile, overlap, batch_size, fixed_tile)[0]


# ---- D4 test-time views ------------------------------------------------------------------------
D4 = [(k, flip) for flip in (False, True) for k in range(4)]  # identity first


def _rotate_vectors(y: torch.Tensor, k: int) -> torch.Tensor:
    """Apply the (dY, dX) → (−dX, dY) rule k times to channels 0, 1."""
    for _ in range(k % 4):
        y = torch.cat([-y[:, 1:2], y[:, 0:1], y[:, 2:]], dim=1)
    return y


def d4_transform(x: torch.Tensor, k: int, flip: bool, vector: bool = False) -> torch.Tensor:
    """rot90 by k (dims -2, -1) then optional flip of X; ``vector`` treats channels 0, 1 as (dY, dX)."""
    x = torch.rot90(x, k, dims=(-2, -1))
    if vector:
        x = _rotate_vectors(x, k)
    if flip:
        x = torch.flip(x, dims=(-1,))
        if vector:
            x = torch.cat([x[:, 0:1], -x[:, 1:2], x[:, 2:]], dim=1)
    return x


def d4_inverse(y: torch.Tensor, k: int, flip: bool, vector: bool = True) -> torch.Tensor:
    """Undo :func:`d4_transform` (flip first, then rotate back)."""
    if flip:
        y = d4_transform(y, 0, True, vector)
    return d4_transform(y, (4 - k) % 4, False, vector)


def d4_views(x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W → 8B×C×H×W stacked view-major (view v is rows v·B … v·B+B−1). Needs H == W."""
    return torch.cat([d4_transform(x, k, flip) for k, flip in D4])


def d4_merge(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8B×3×H×W network outputs of :func:`d4_views` → (mean, std) over views in the original frame."""
    views = y.unflatten(0, (len(D4), -1))  # not chunk(): keeps the batch size symbolic in exports
    back = torch.stack([d4_inverse(views[v], k, flip) for v, (k, flip) in enumerate(D4)])
    return back.mean(0), back.std(0, unbiased=False)


def d4_ensemble(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """8B×3×H×W outputs of :func:`d4_views` → the teacher's ensemble in the input frame:
    (flows B×2, cell probability B×1, flows std B×2, probability std B×1), float32. Probabilities
    (sigmoid of the logit), not logits, are averaged."""
    y = y.float()
    mean, std = d4_merge(torch.cat([y[:, :2], torch.sigmoid(y[:, 2:3])], dim=1))
    return mean[:, :2], mean[:, 2:], std[:, :2], std[:, 2:]
