"""The slide's label image, written band by band from the blocks' local labels and the final
numbering: a tiled, zlib-compressed BigTIFF or an OME-Zarr (NGFF 0.4 multiscales, zarr v2 format,
which napari and other viewers open). Written under a temporary name, renamed when complete."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

from selfadapt_deploy.io.writers import multiscales, staged
from selfadapt_deploy.wsi.plan import TILE, Block

RESUME_ADVICE = "free space or choose another --out, then run again with --resume"

#: labels of rows [y0, y1) × all columns, final numbering applied (uint32)
Band = Callable[[int, int], np.ndarray]


def final_band(local, blocks: list[Block], mappings: list[np.ndarray]) -> Band:
    """Rows of the final label image from the local-label store and each block's lookup."""

    def band(y0: int, y1: int) -> np.ndarray:
        out = np.asarray(local[y0:y1, :]).astype(np.uint32)
        for block, mapping in zip(blocks, mappings, strict=True):
            if block.y1 <= y0 or block.y0 >= y1:
                continue
            ys = slice(max(y0, block.y0) - y0, min(y1, block.y1) - y0)
            xs = slice(block.x0, block.x1)
            out[ys, xs] = mapping[out[ys, xs]]
        return out

    return band


def write_bigtiff(target: Path, band: Band, height: int, width: int) -> None:
    """Tiled (256²) zlib BigTIFF, uint32, tiles produced one row of tiles at a time."""

    def tiles() -> Iterator[np.ndarray]:
        for y in range(0, height, TILE):
            rows = band(y, min(y + TILE, height))
            for x in range(0, width, TILE):
                tile = np.zeros((TILE, TILE), np.uint32)
                part = rows[:, x : x + TILE]
                tile[: part.shape[0], : part.shape[1]] = part
                yield tile

    with staged(target, RESUME_ADVICE) as tmp:
        tifffile.imwrite(tmp, tiles(), shape=(height, width), dtype=np.uint32, tile=(TILE, TILE),
                         bigtiff=True, compression="zlib", metadata={"axes": "YX"})


def write_ome_zarr(target: Path, band: Band, height: int, width: int, name: str,
                   chunk: int = 4 * TILE) -> None:
    """OME-Zarr multiscale labels: level 0 from the bands, each further level the previous one
    subsampled by 2 (nearest: labels stay labels) until it fits one tile."""
    import zarr

    with staged(target, RESUME_ADVICE) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        level = root.create_array("0", shape=(height, width), chunks=(chunk, chunk), dtype=np.uint32,
                                  fill_value=0)
        for y in range(0, height, chunk):
            level[y : min(y + chunk, height), :] = band(y, min(y + chunk, height))
        paths = ["0"]
        while max(level.shape) > TILE:
            h, w = (level.shape[0] + 1) // 2, (level.shape[1] + 1) // 2
            nxt = root.create_array(str(len(paths)), shape=(h, w), chunks=(min(chunk, h), min(chunk, w)),
                                    dtype=np.uint32, fill_value=0)
            for y in range(0, h, chunk):
                rows = slice(2 * y, min(2 * (y + chunk), level.shape[0]), 2)
                nxt[y : min(y + chunk, h), :] = np.asarray(level[rows, ::2])
            level = nxt
            paths.append(str(len(paths)))
        root.attrs["multiscales"] = multiscales(name, "YX", len(paths))
