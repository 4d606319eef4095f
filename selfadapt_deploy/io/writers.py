"""Atomic outputs: write to a temporary name in the target directory, then rename."""

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


def label_dtype(masks: np.ndarray) -> np.dtype:
    """uint16 label images, or uint32 when there are more than 65 535 objects."""
    return np.dtype(np.uint16) if int(masks.max(initial=0)) <= np.iinfo(np.uint16).max else np.dtype(
        np.uint32)


def write_masks(path: Path, masks: np.ndarray) -> None:
    """Label image as TIFF (0 = background, 1..N = objects); Z×Y×X labels as a ZYX OME-TIFF stack
    (napari and Fiji open it as a volume)."""
    volume = {"metadata": {"axes": "ZYX"}, "ome": True} if masks.ndim == 3 else {}
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, masks.astype(label_dtype(masks)), compression="zlib", **volume)


def write_flows(path: Path, flows: np.ndarray, cellprob: np.ndarray) -> None:
    """Float32 OME-TIFF of the network's output: dY, dX (network units, ≈5× unit vectors) and the
    cellprob logit as CYX; for a volume dZ, dY, dX and cellprob as CZYX."""
    stack = np.concatenate([flows, cellprob[None]], axis=0).astype(np.float32)
    names = ["dZ", "dY", "dX", "cellprob"] if stack.ndim == 4 else ["dY", "dX", "cellprob"]
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, stack, metadata={"axes": "CZYX" if stack.ndim == 4 else "CYX",
                                               "Channel": {"Name": names}}, ome=True, compression="zlib")
