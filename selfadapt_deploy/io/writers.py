"""Atomic outputs: write to a temporary name in the target directory, then rename. Label images
as TIFF or OME-Zarr (:data:`OUT_FORMATS`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from selfadapt_deploy.errors import OutputWriteError
from selfadapt_deploy.io.readers import OME_UNITS

#: label image formats (``--out-format``) → the suffix after the image's name
OUT_FORMATS = {"tiff": "_masks.tif", "zarr": "_masks.ome.zarr"}
PYRAMID_TILE = 256  # OME-Zarr levels halve in Y and X until one fits this


@contextlib.contextmanager
def atomic_path(target: Path, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success.
    ``option``: the one that chose ``target``, named when it cannot be written."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputWriteError(f"{target.parent}: cannot write outputs here ({exc.strerror}); "
                               f"choose another {option}") from exc
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; outputs get normal permissions
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_new_dir(target: Path, option: str, if_used: str = "") -> Path:
    """``target`` if it can become a new output directory (absent, or an empty directory).
    ``if_used``: what to add when it is a used directory (e.g. how to continue what is there)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputWriteError(f"{target} is a file, not a directory; choose a new {option}")
    if target.exists() and any(target.iterdir()):
        raise OutputWriteError(f"{target} exists and is not an empty directory; choose a new "
                               f"{option}{if_used}")
    return target


@contextlib.contextmanager
def atomic_dir(target: Path, option: str) -> Iterator[Path]:
    """Yield a staging directory next to ``target`` (new, or an empty directory); it becomes
    ``target`` only when the block succeeds, and nothing is left behind when it fails."""
    target = check_new_dir(target, option)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    except OSError as exc:
        raise OutputWriteError(f"{target.parent}: cannot write here ({exc.strerror})") from exc
    try:
        yield staging
        for folder in (staging, *(p for p in staging.rglob("*") if p.is_dir())):
            os.chmod(folder, 0o777 & ~umask())  # mkdtemp made the top private
        with contextlib.suppress(FileNotFoundError):
            target.rmdir()  # an empty directory the user made is replaced
        os.replace(staging, target)
    except OSError as exc:
        raise OutputWriteError(f"{target}: writing failed ({exc}); nothing was kept") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove we can write there, before any work is done."""
    with atomic_path(Path(path) / ".sa-deploy-write-test"):
        pass
    (Path(path) / ".sa-deploy-write-test").unlink(missing_ok=True)
    return Path(path)


def label_dtype(masks: np.ndarray | int) -> np.dtype:
    """The type of a label image (``masks``, or its highest label): uint16, or uint32 when there
    are more than 65 535 objects. The one rule for every label image sa-deploy makes or writes."""
    top = masks if isinstance(masks, int) else int(masks.max(initial=0))
    return np.dtype(np.uint16) if top <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def write_masks(path: Path, masks: np.ndarray, physical: dict[str, float | str] | None = None) -> None:
    """Label image as TIFF (0 = background, 1..N = objects); Z×Y×X labels as a ZYX OME-TIFF stack
    (napari and Fiji open it as a volume) with the input's voxel size (``physical``: OME
    PhysicalSize{Z,Y,X}[Unit]) when it had one."""
    volume = {"metadata": {"axes": "ZYX", **(physical or {})}, "ome": True} if masks.ndim == 3 else {}
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, masks.astype(label_dtype(masks)), compression="zlib", **volume)


def write_labels(path: Path, masks: np.ndarray, out_format: str = "tiff",
                 physical: dict[str, float | str] | None = None) -> None:
    """A label image or stack in ``out_format`` (:data:`OUT_FORMATS`) at ``path``."""
    (write_masks_zarr if out_format == "zarr" else write_masks)(path, masks, physical)


def write_flows(path: Path, flows: np.ndarray, cellprob: np.ndarray) -> None:
    """Float32 OME-TIFF of the network's output: dY, dX (network units, ≈5× unit vectors) and the
    cellprob logit as CYX; for a volume in 3-D dZ, dY, dX and cellprob as CZYX, for a stitched
    stack each plane's dY, dX and cellprob as CZYX."""
    stack = np.concatenate([flows, cellprob[None]], axis=0).astype(np.float32)
    names = [*("dZ", "dY", "dX")[-len(flows):], "cellprob"]
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, stack, metadata={"axes": "CZYX" if stack.ndim == 4 else "CYX",
                                               "Channel": {"Name": names}}, ome=True, compression="zlib")


def write_masks_zarr(path: Path, masks: np.ndarray, physical: dict[str, float | str] | None = None
                     ) -> None:
    """Y×X labels or a Z×Y×X label stack as an OME-Zarr (NGFF 0.4 multiscales, zarr v2 format,
    which napari opens): level 0, then each level the previous one subsampled by 2 in Y and X
    (nearest: labels stay labels) until one fits a tile; ``physical`` (OME PhysicalSize…) scales
    the axes."""
    import zarr

    axes = "ZYX"[-masks.ndim:]
    masks = masks.astype(label_dtype(masks))
    with staged(path, "free space or choose another --out, then run again") as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        level, k = masks, 0
        while True:
            chunks = (*(1,) * (masks.ndim - 2), *(min(PYRAMID_TILE * 4, n) for n in level.shape[-2:]))
            root.create_array(str(k), data=level, chunks=chunks, fill_value=0)
            if max(level.shape[-2:]) <= PYRAMID_TILE:
                break
            level, k = level[..., ::2, ::2], k + 1
        root.attrs["multiscales"] = multiscales(path.name.removesuffix(".zarr"), axes, k + 1, physical)


def multiscales(name: str, axes: str, levels: int, physical: dict[str, float | str] | None = None
                ) -> list[dict]:
    """NGFF 0.4 ``multiscales`` metadata of a label pyramid: level k is level 0 subsampled by 2^k in
    Y and X; spatial axes scaled by ``physical`` (OME PhysicalSize{Z,Y,X}[Unit]) when given."""
    physical = physical or {}
    base = [float(physical.get(f"PhysicalSize{a}", 1.0)) for a in axes]
    meta = []
    for a in axes:
        unit = OME_UNITS.get(str(physical.get(f"PhysicalSize{a}Unit", "µm" if physical else "")))
        meta.append({"name": a.lower(), "type": "space", **({"unit": unit} if unit else {})})
    return [{"version": "0.4", "name": name, "type": "nearest", "axes": meta, "datasets": [
        {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [
            s * 2.0**k if a in "YX" else s for a, s in zip(axes, base, strict=True)]}]}
        for k in range(levels)]}]


@contextlib.contextmanager
def staged(target: Path, advice: str) -> Iterator[Path]:
    """A temporary path next to ``target`` (file or folder), renamed onto it on success (replacing
    what was there); a full disk or another OS error is one clear error (with ``advice``) and
    leaves nothing behind."""
    tmp = target.with_name(f".{target.name}.part")
    _remove(tmp)
    try:
        yield tmp
        _remove(target)
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputWriteError(f"{target}: cannot write the label image ({exc.strerror or exc}); "
                               f"{advice}") from exc
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
