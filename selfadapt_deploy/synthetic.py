"""Synthetic cell images with ground truth, for tests, benchmarks and the offline demo.

Cells are random ellipses (ellipsoids in Z-stacks) packed without overlap; images are
fluorescence-like (bright cytoplasm, brighter nucleus, blur, background, noise). Deterministic for
a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def random_labels(shape: tuple[int, int], n_cells: int, radius: tuple[float, float] = (6, 10),
                  seed: int = 0, max_tries: int = 20) -> np.ndarray:
    """Label image of up to ``n_cells`` non-overlapping ellipses (labels 1..N, sequential)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    yy, xx = np.indices(shape)
    n = 0
    for _ in range(n_cells * max_tries):
        if n == n_cells:
            break
        ry, rx = rng.uniform(*radius, size=2)
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        theta = rng.uniform(0, np.pi)
        r = int(np.ceil(max(ry, rx))) + 1
        y0, y1 = max(0, int(cy) - r), min(shape[0], int(cy) + r + 1)
        x0, x1 = max(0, int(cx) - r), min(shape[1], int(cx) + r + 1)
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = dy * np.cos(theta) + dx * np.sin(theta)
        v = -dy * np.sin(theta) + dx * np.cos(theta)
        inside = (u / ry) ** 2 + (v / rx) ** 2 <= 1
        window = labels[y0:y1, x0:x1]
        grown = ndimage.binary_dilation(inside)  # keep a 1-pixel gap so cells stay separate
        if inside.sum() < 10 or (window[grown] > 0).any():
            continue
        n += 1
        window[inside] = n
    return labels


def render(labels: np.ndarray, seed: int = 0, blur: float | tuple[float, ...] = 1.0, noise: float = 0.05,
           background: float = 0.1, gamma: float = 1.0) -> np.ndarray:
    """Fluorescence-like float32 image (or stack) of ``labels`` (cells bright, nuclei brighter);
    ``blur``: one Gaussian sigma, or one per axis."""
    rng = np.random.default_rng(seed)
    n = int(labels.max())
    brightness = np.r_[0.0, rng.uniform(0.5, 1.0, n)]
    img = brightness[labels]
    dist = ndimage.distance_transform_edt(labels > 0)
    img = img + 0.5 * (dist > 3) * brightness[labels]  # a brighter core, like a nucleus
    img = ndimage.gaussian_filter(img, blur) + background
    img = np.clip(img + rng.normal(0, noise, img.shape), 0, None) ** gamma
    return img.astype(np.float32)


def random_volume_labels(shape: tuple[int, int, int], n_cells: int, radius: tuple[float, float] = (6, 10),
                         anisotropy: float = 1.0, seed: int = 0, max_tries: int = 20) -> np.ndarray:
    """Z×Y×X labels of up to ``n_cells`` ellipsoids (radii in Y/X pixels) packed a voxel apart, the
    planes ``anisotropy`` pixels apart (a Z-stack sampled more coarsely along Z than in Y/X)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    n = 0
    for _ in range(n_cells * max_tries):
        if n == n_cells:
            break
        rz, ry, rx = rng.uniform(*radius, size=3)
        rz /= anisotropy
        centre = rng.uniform(0, 1, 3) * shape
        box = [(max(0, int(c - r) - 1), min(size, int(c + r) + 2))
               for c, r, size in zip(centre, (rz, ry, rx), shape, strict=True)]
        grid = np.ogrid[tuple(slice(a, b) for a, b in box)]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, (rz, ry, rx), strict=True)) <= 1
        window = labels[tuple(slice(a, b) for a, b in box)]
        if inside.sum() < 20 or (window[ndimage.binary_dilation(inside)] > 0).any():
            continue
        n += 1
        window[inside] = n
    return labels


def render_volume(labels: np.ndarray, seed: int = 0, blur: float = 1.0, z_blur: float = 1.0,
                  noise: float = 0.05, background: float = 0.1) -> np.ndarray:
    """:func:`render` of Z×Y×X labels, blurred by ``z_blur`` planes along Z (the axial spread of a
    widefield or confocal stack) and ``blur`` in Y/X."""
    return render(labels, seed, (z_blur, blur, blur), noise, background)


@dataclass(frozen=True)
class Domain:
    """An imaging condition: the rendering of label images (see :func:`render`)."""

    name: str
    blur: float = 1.0
    noise: float = 0.05
    background: float = 0.1
    gamma: float = 1.0

    def sample(self, n: int, shape: tuple[int, int] = (192, 192), n_cells: int = 60,
               radius: tuple[float, float] = (6, 10), seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """``n`` (1×Y×X float32 image, label image) pairs; image ``i`` uses seed ``seed + i``."""
        pairs = []
        for i in range(n):
            labels = random_labels(shape, n_cells, radius, seed=seed + i)
            img = render(labels, seed + i, self.blur, self.noise, self.background, self.gamma)
            pairs.append((img[None], labels))
        return pairs


# The demo's domain shift: a model trained on clean images meets 6× the noise (low-light imaging).
SOURCE = Domain("source (clean)", noise=0.05)
TARGET = Domain("target (6× noise)", noise=0.30)
# Further shifts from the same source, for judging label-free model selection
# (benchmarks/selection_rules.py): out-of-focus imaging and a nonlinear detector response.
SHIFTS = {"noise": TARGET, "blur": Domain("target (3 px blur)", blur=3.0, noise=0.10),
          "gamma": Domain("target (gamma 3)", noise=0.10, gamma=3.0)}


def write_slide(path, height: int, width: int, seed: int = 0, patch: int = 1024,
               radius: tuple[float, float] = (6, 9), fill: float = 0.3) -> None:
    """A generated fluorescence slide as a tiled (256²), zlib BigTIFF of uint16, written one row
    of tiles at a time from one rendered ``patch``² field mirrored across the slide (so cells
    continue across the mirror lines) — any size, with memory for one patch and one tile row."""
    import tifffile

    n_cells = int(fill * patch * patch / (np.pi * np.mean(radius) ** 2))
    field = (render(random_labels((patch, patch), n_cells, radius, seed=seed), seed=seed)
             * 1000).astype(np.uint16)
    # one period of the mirrored pattern, 2·patch wide: field | field flipped left-right
    period = np.concatenate([field, field[:, ::-1]], axis=1)
    period = np.concatenate([period, period[::-1]], axis=0)  # and its upside-down copy below
    reps = -(-width // period.shape[1])

    def tiles():
        for y in range(0, height, 256):
            rows = np.tile(period[np.arange(y, min(y + 256, height)) % period.shape[0]], (1, reps))
            for x in range(0, width, 256):
                tile = np.zeros((256, 256), np.uint16)
                part = rows[:, x : min(x + 256, width)]
                tile[: part.shape[0], : part.shape[1]] = part
                yield tile

    tifffile.imwrite(path, tiles(), shape=(height, width), dtype=np.uint16, tile=(256, 256),
                     bigtiff=True, compression="zlib", metadata={"axes": "YX"},
                     ome=str(path).lower().endswith((".ome.tif", ".ome.tiff")))
