"""Lazy access to a slide's pixels: regions of level 0 of a (Big)TIFF / OME-TIFF (tifffile's zarr
store) or of an OME-Zarr image, as C×h×w arrays — the slide itself is never read whole."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from selfadapt_deploy.errors import ImageReadError
from selfadapt_deploy.io.readers import (
    CHANNEL_LETTERS,
    STACK_MODES_HINT,
    TIFF_SUFFIXES,
    image_stem,
    is_ome_zarr,
    open_ome_zarr,
)
from selfadapt_deploy.wsi.memory import StreamChoice


@dataclass
class Slide:
    """One 2-D (multi-channel) image of a file, read region by region.

    ``array`` is a zarr array (or anything sliceable the same way) whose ``axes`` are tifffile's
    letters (Y, X, C/S, and singleton others); ``read`` returns C×h×w in the file's dtype."""

    source: Path
    name: str
    array: Any
    axes: str
    store: Any = None  # closed by close()

    @property
    def height(self) -> int:
        return int(self.array.shape[self.axes.index("Y")])

    @property
    def width(self) -> int:
        return int(self.array.shape[self.axes.index("X")])

    @property
    def channels(self) -> int:
        c = next((a for a in self.axes if a in CHANNEL_LETTERS), None)
        return int(self.array.shape[self.axes.index(c)]) if c else 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0, y1) × [x0, x1) of every channel, C×h×w."""
        index = []
        for axis in self.axes:
            if axis == "Y":
                index.append(slice(y0, y1))
            elif axis == "X":
                index.append(slice(x0, x1))
            elif axis in CHANNEL_LETTERS:
                index.append(slice(None))
            else:
                index.append(0)  # singleton (checked in open_slide)
        try:
            region = np.asarray(self.array[tuple(index)])
        except Exception as exc:  # truncated files: tifffile / zarr / codecs raise many types
            raise ImageReadError(f"{self.source}: cannot read pixels [{y0}:{y1}, {x0}:{x1}] "
                                 f"({type(exc).__name__}: {exc}); the file is damaged or "
                                 "truncated — re-export or re-copy it") from exc
        kept = [a for a in self.axes if a in "YX" or a in CHANNEL_LETTERS]
        order = [kept.index(a) for a in kept if a in CHANNEL_LETTERS] + [kept.index("Y"), kept.index("X")]
        region = region.transpose(order)
        return region if region.ndim == 3 else region[None]

    def close(self) -> None:
        if self.store is not None and hasattr(self.store, "close"):
            self.store.close()


def open_slide(path: str | Path, series: int | None = None) -> Slide:
    """Level 0 of series ``series`` (default 0) of a TIFF, or the first multiscale level of an
    OME-Zarr image. Anything that is not a 2-D image with optional channels is refused."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or directory")
    if is_ome_zarr(path):
        slide = _open_ome_zarr(path)
    elif path.name.lower().endswith(TIFF_SUFFIXES):
        slide = _open_tiff(path, series)
    else:
        raise ImageReadError(f"{path}: streaming reads TIFF / OME-TIFF files and OME-Zarr folders")
    extra = [(a, n) for a, n in zip(slide.axes, slide.array.shape, strict=True)
             if a not in "YX" and a not in CHANNEL_LETTERS and n > 1]
    if extra or "Y" not in slide.axes or "X" not in slide.axes:
        slide.close()
        if any(axis == "Z" for axis, _ in extra):
            raise ImageReadError(f"{path}: has a Z axis (axes {slide.axes}, shape "
                                 f"{tuple(slide.array.shape)}); {STACK_MODES_HINT}")
        raise ImageReadError(f"{path}: expected a 2-D image with optional channels, got axes "
                             f"{slide.axes} of shape {tuple(slide.array.shape)}; extract a 2-D plane")
    return slide


def _open_tiff(path: Path, series: int | None) -> Slide:
    import zarr

    try:
        with tifffile.TiffFile(path) as tif:
            n_series = len(tif.series)
            index = series or 0
            if not 0 <= index < n_series:
                raise ImageReadError(f"{path}: --series {series} does not exist (file has {n_series} "
                                     f"series, 0..{n_series - 1})")
            axes = tif.series[index].axes
        store = tifffile.imread(path, aszarr=True, series=index, level=0)
        array = zarr.open(store, mode="r")
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable TIFF ({exc})") from exc
    name = f"{image_stem(path)}_s{index}" if n_series > 1 and series is not None else image_stem(path)
    return Slide(path, name, array, axes, store)


def _open_ome_zarr(path: Path) -> Slide:
    image = open_ome_zarr(path)
    return Slide(path, image_stem(path), image.array, image.axes)


def slide_info(slide: Slide) -> dict:
    """What identifies the slide's pixels for a resumed run (shape, dtype, file size and time)."""
    stat = slide.source.stat()
    return {"source": str(slide.source.resolve()), "height": slide.height, "width": slide.width,
            "channels": slide.channels, "dtype": str(slide.dtype),
            "size": stat.st_size if slide.source.is_file() else None,
            "mtime_ns": stat.st_mtime_ns}


def streamable(path: Path) -> bool:
    """Whether ``path`` can stream block by block: a (Big)TIFF / OME-TIFF file or an OME-Zarr folder."""
    return path.is_dir() or path.name.lower().endswith(TIFF_SUFFIXES)


def split_inputs(paths: list[Path], series: int | None, decide: Callable[[int, int], StreamChoice]
                 ) -> tuple[list[Path], list[tuple[Path, int | None]], list[tuple[Path, StreamChoice]]]:
    """(files for the in-memory pipeline, (file, series) pairs to stream, (file, choice) for the
    choices worth saying): OME-Zarr folders always stream; a TIFF streams when ``decide(height,
    width)`` says so for its largest series to segment (every series of it then streams);
    unreadable files go the in-memory way, which reports them."""
    in_memory, streamed, said = [], [], []
    for path in paths:
        if not streamable(path):
            in_memory.append(path)
            continue
        if path.is_dir():
            streamed.append((path, None))
            continue
        try:
            with tifffile.TiffFile(path) as tif:
                picked = [series] if series is not None else list(range(len(tif.series)))
                sizes = [(s.shape[s.axes.index("Y")], s.shape[s.axes.index("X")])
                         for s in (tif.series[i] for i in picked if 0 <= i < len(tif.series))
                         if "Y" in s.axes and "X" in s.axes]
                multi = len(tif.series) > 1
        except Exception:  # the in-memory reader says what is wrong with it
            in_memory.append(path)
            continue
        if not sizes:
            in_memory.append(path)
            continue
        choice = decide(*max(sizes, key=lambda yx: yx[0] * yx[1]))
        if choice.say:
            said.append((path, choice))
        if choice.stream:
            streamed.extend((path, i if multi or series is not None else None) for i in picked)
        else:
            in_memory.append(path)
    return in_memory, streamed, said
