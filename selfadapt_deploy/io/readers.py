"""Read images (TIFF / OME-TIFF incl. multi-series, OME-Zarr, PNG/JPEG) into C×Y×X arrays, and
Z-stacks into Z×C×Y×X arrays (or their planes) when a stack mode asks for them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from selfadapt_deploy.errors import ImageReadError, SaDeployError

TIFF_SUFFIXES = (".tif", ".tiff")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CHANNEL_LETTERS = "CS"  # tifffile's axes: C = channel, S = sample (RGB)
STACK_LETTERS = "ZT"  # axes that make an image 3-D / a time series
MAX_GUESSED_CHANNELS = 8
#: what a file with a Z axis becomes: refused (no stack mode given), its planes as 2-D images
#: (``--planes``), or one Z×C×Y×X stack (``--stitch-threshold``)
STACK_MODES = ("refuse", "planes", "volume")
ZARR_SUFFIX = ".zarr"
NGFF_AXES = {"c": "C", "y": "Y", "x": "X", "z": "Z", "t": "T"}  # OME-Zarr axis names → letters
#: OME's length units ↔ OME-Zarr's (NGFF) names for them
OME_UNITS = {"µm": "micrometer", "nm": "nanometer", "mm": "millimeter", "m": "meter"}
STACK_MODES_HINT = ("segment it as a volume with --stitch-threshold T (every plane in 2-D, masks "
                    "of adjacent planes linked at IoU ≥ T, as cellpose's stitch_threshold) or "
                    "--do-3d (in 3-D, as cellpose's do_3D), or each plane as its own image with "
                    "--planes")


@dataclass(frozen=True)
class Image:
    """One 2-D image (``data`` C×Y×X) or Z-stack (Z×C×Y×X) in the file's dtype; ``name`` is the
    output stem."""

    name: str
    source: Path
    data: np.ndarray
    series: int | None = None
    note: str = ""  # how an ambiguous file was read (said on the console), e.g. a guessed channel axis
    physical: dict[str, float | str] | None = None  # a stack's OME PhysicalSize{Z,Y,X}[Unit]


@dataclass(frozen=True)
class ZarrImage:
    """Level 0 of an OME-Zarr image: the (lazy) array, its axes as letters, its voxel scale."""

    array: Any
    axes: str
    scale: tuple[float, ...] | None  # per axis, from the first dataset's coordinateTransformations
    units: dict[str, str]  # axis letter → NGFF unit name, where the metadata gives one


def is_ome_zarr(path: Path) -> bool:
    return path.is_dir() and path.name.lower().endswith(ZARR_SUFFIX)


def open_ome_zarr(path: Path) -> ZarrImage:
    """The first multiscale level of the OME-Zarr image at ``path`` (NGFF 0.4 or 0.5 metadata)."""
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        first = multiscales[0]["datasets"][0]
        array = group[first["path"]]
        meta = multiscales[0].get("axes") or [{"name": n} for n in "tczyx"[-array.ndim:]]
        meta = [a if isinstance(a, dict) else {"name": a} for a in meta]
        scale = next((t["scale"] for t in first.get("coordinateTransformations", [])
                      if t.get("type") == "scale"), None)
    except Exception as exc:
        raise ImageReadError(f"{path}: not a readable OME-Zarr image ({exc})") from exc
    axes = "".join(NGFF_AXES.get(a["name"].lower(), "Q") for a in meta)
    units = {letter: a["unit"] for letter, a in zip(axes, meta, strict=True) if a.get("unit")}
    scale = tuple(map(float, scale)) if scale is not None and len(scale) == array.ndim else None
    return ZarrImage(array, axes, scale, units)


def zarr_physical(image: ZarrImage) -> dict[str, float | str] | None:
    """An OME-Zarr's Z/Y/X voxel size as OME PhysicalSize attributes (None without a scale)."""
    if image.scale is None or not all(a in image.axes for a in "ZYX"):
        return None
    units = {v: k for k, v in OME_UNITS.items()}
    out: dict[str, float | str] = {}
    for letter in "ZYX":
        out[f"PhysicalSize{letter}"] = image.scale[image.axes.index(letter)]
        if image.units.get(letter) in units:
            out[f"PhysicalSize{letter}Unit"] = units[image.units[letter]]
    return out


def _ome_physical(tif: tifffile.TiffFile) -> list[dict[str, float | str] | None]:
    """Per OME image (series) of an OME-TIFF, its PhysicalSize{Z,Y,X}[Unit] (None where it records
    none); [] for a TIFF without OME metadata. The OME-XML is parsed once."""
    if not tif.is_ome or not tif.ome_metadata:
        return []
    try:
        images = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    except (KeyError, TypeError, ValueError):
        return []
    keys = [f"PhysicalSize{a}{u}" for a in "ZYX" for u in ("", "Unit")]
    out = []
    for image in images if isinstance(images, list) else [images]:
        pixels = image.get("Pixels", {}) if isinstance(image, dict) else {}
        found = {k: pixels[k] for k in keys if k in pixels}
        out.append(found if any(f"PhysicalSize{a}" in found for a in "ZYX") else None)
    return out


def image_stem(path: Path) -> str:
    """File name without its image suffixes (``a.ome.tif`` → ``a``)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ZARR_SUFFIX, *TIFF_SUFFIXES, *PLAIN_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _to_cyx(arr: np.ndarray, axes: str, channel_axis: int | None, where: str) -> tuple[np.ndarray, str]:
    """Move the channel axis first and drop singleton axes; refuse anything that is not 2-D. The
    note says how the channel axis was chosen when no axis of the file says so (else "")."""
    if channel_axis is not None:
        if not -arr.ndim <= channel_axis < arr.ndim:
            raise ImageReadError(f"{where}: --channel-axis {channel_axis} is out of range for an "
                                 f"image of shape {arr.shape}")
        arr = np.moveaxis(arr, channel_axis, 0)
        axes = "C" + axes[:channel_axis % len(axes)] + axes[channel_axis % len(axes) + 1:]
    keep = [i for i, n in enumerate(arr.shape) if n > 1 or (channel_axis is not None and i == 0)]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if "Z" in axes and arr.ndim > 2:
        raise ImageReadError(f"{where}: has a Z axis of {arr.shape[axes.index('Z')]} planes (shape "
                             f"{arr.shape}, axes {axes}); {STACK_MODES_HINT}")
    for letter in STACK_LETTERS:
        if letter in axes and arr.ndim > 2:
            n = arr.shape[axes.index(letter)]
            raise ImageReadError(f"{where}: has a {letter} axis of {n} planes (shape {arr.shape}, "
                                 f"axes {axes}); sa-deploy segments 2-D images and Z-stacks — "
                                 "extract the planes first")
    if arr.ndim == 2:
        return arr[None], ""
    if arr.ndim != 3:
        raise ImageReadError(f"{where}: expected a 2-D image with optional channels, got shape "
                             f"{arr.shape}; pass --channel-axis or extract a 2-D plane")
    if channel_axis is not None:
        return arr, ""
    for i, letter in enumerate(axes):
        if letter in CHANNEL_LETTERS:
            return np.moveaxis(arr, i, 0), ""
    first, last = arr.shape[0], arr.shape[-1]
    if min(first, last) <= MAX_GUESSED_CHANNELS:
        axis = 0 if first <= last else arr.ndim - 1
        note = (f"no axis of the file is marked as channels: its {arr.shape[axis]} planes along axis "
                f"{axis} of {arr.shape} were read as channels, as cellpose does (for a Z-stack "
                "--z-axis names its Z axis; --channel-axis chooses the channels)")
        return np.moveaxis(arr, axis, 0), note
    raise ImageReadError(f"{where}: cannot tell which axis holds channels in shape {arr.shape}; "
                         "pass --channel-axis")


def _z_index(arr: np.ndarray, axes: str, z_axis: int | None, where: str) -> int | None:
    """The array's Z axis: ``--z-axis``, else the file's own ``Z`` of more than one plane; None
    for an image without one."""
    if z_axis is not None:
        if arr.ndim < 3:
            raise ImageReadError(f"{where}: is a 2-D image (shape {arr.shape}); --z-axis names the "
                                 "Z axis of stacks")
        if not -arr.ndim <= z_axis < arr.ndim:
            raise ImageReadError(f"{where}: --z-axis {z_axis} is out of range for an image of shape "
                                 f"{arr.shape}")
        return z_axis % arr.ndim
    if "Z" in axes and arr.shape[axes.index("Z")] > 1:
        return axes.index("Z")
    return None


def _to_zcyx(arr: np.ndarray, axes: str, z: int, channel_axis: int | None, where: str
             ) -> tuple[np.ndarray, str]:
    """A stack with its Z axis at ``z`` → Z×C×Y×X, each plane read as :func:`_to_cyx` reads an image
    (``channel_axis`` counts the file's axes, Z included)."""
    plane_channel = None
    if channel_axis is not None:
        if not -arr.ndim <= channel_axis < arr.ndim or channel_axis % arr.ndim == z:
            raise ImageReadError(f"{where}: --channel-axis {channel_axis} is out of range or is the Z "
                                 f"axis ({z}) of an image of shape {arr.shape}")
        plane_channel = channel_axis % arr.ndim - (channel_axis % arr.ndim > z)
    arr, rest = np.moveaxis(arr, z, 0), axes[:z] + axes[z + 1:]
    planes = [_to_cyx(plane, rest, plane_channel, where) for plane in arr]
    return np.stack([data for data, _ in planes]), planes[0][1]


def _check_values(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageReadError(f"{where}: unsupported pixel type {arr.dtype}; use integer or float")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ImageReadError(f"{where}: contains NaN or infinite values; replace them (e.g. with 0)")
    if min(arr.shape[-2:]) < 2:
        raise ImageReadError(f"{where}: image of shape {arr.shape} is too small to segment")
    return arr


def _read_tiff(path: Path, channel_axis: int | None, series: int | None, z_axis: int | None = None,
               stack: str = "refuse") -> list[Image]:
    try:
        with tifffile.TiffFile(path) as tif:
            all_series = tif.series
            if not all_series:
                raise ImageReadError(f"{path}: not a readable TIFF (no image data found)")
            if series is not None and not 0 <= series < len(all_series):
                raise ImageReadError(f"{path}: --series {series} does not exist (file has "
                                     f"{len(all_series)} series, 0..{len(all_series) - 1})")
            picked = [series] if series is not None else range(len(all_series))
            sizes = _ome_physical(tif) if stack == "volume" else []  # only a volume keeps them
            arrays = [(i, all_series[i].asarray(), all_series[i].axes,
                       sizes[i] if i < len(sizes) else None) for i in picked]
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise ImageReadError(f"{path}: not a readable TIFF ({exc})") from exc
    multi = len(all_series) > 1
    images = []
    for i, arr, axes, physical in arrays:
        where = f"{path} (series {i})" if multi else str(path)
        name = f"{image_stem(path)}_s{i}" if multi and series is None else image_stem(path)
        images += _images(arr, axes, Image(name, path, arr, i if multi else None, physical=physical),
                          where, channel_axis, z_axis, stack)
    return images


def _read_zarr(path: Path, channel_axis: int | None, z_axis: int | None, stack: str) -> list[Image]:
    """An OME-Zarr image read whole (a Z-stack in a stack mode; 2-D ones stream, see wsi)."""
    image = open_ome_zarr(path)
    try:
        arr = np.asarray(image.array[...])
    except Exception as exc:  # missing or damaged chunks: zarr and its codecs raise many types
        raise ImageReadError(f"{path}: not a readable OME-Zarr image ({exc})") from exc
    return _images(arr, image.axes, Image(image_stem(path), path, arr, physical=zarr_physical(image)),
                   str(path), channel_axis, z_axis, stack)


def _images(arr: np.ndarray, axes: str, base: Image, where: str, channel_axis: int | None,
            z_axis: int | None, stack: str) -> list[Image]:
    """The images one array of a file holds: a 2-D image, a Z-stack or its planes (``stack``);
    ``base`` carries the name, source, series and voxel size."""
    z = _z_index(arr, axes, z_axis, where) if stack != "refuse" else None
    if z is None:
        data, note = _to_cyx(arr, axes, channel_axis, where)
        if note and stack != "refuse":  # a stack mode, and no axis says Z or channels
            raise ImageReadError(f"{where}: shape {arr.shape} has no axis marked as Z or as "
                                 "channels; pass --z-axis for a Z-stack (e.g. --z-axis 0), or "
                                 "--channel-axis for a 2-D image with channels")
        return [replace(base, data=_check_values(data, where), note=note, physical=None)]
    data, note = _to_zcyx(arr, axes, z, channel_axis, where)
    data = _check_values(data, where)
    if stack == "volume":
        return [replace(base, data=data, note=note)]
    # --planes: each plane its own 2-D image
    return [replace(base, name=f"{base.name}_z{k:03d}", data=plane, note=note, physical=None)
            for k, plane in enumerate(data)]


def _read_plain(path: Path, channel_axis: int | None) -> list[Image]:
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(f"{path}: not a readable image file")
    if arr.ndim == 3:  # OpenCV gives BGR(A)
        arr = arr[..., [2, 1, 0, *range(3, arr.shape[-1])]]
        channel_axis = -1 if channel_axis is None else channel_axis
    data, note = _to_cyx(arr, "YXS"[: arr.ndim], channel_axis, str(path))
    return [Image(name=image_stem(path), source=path, data=_check_values(data, str(path)), note=note)]


def image_pixels(path: Path, series: int | None = None) -> int | None:
    """Y×X pixels the file holds (summed over the series that would be segmented, times the planes
    of a Z-stack), from its header only; None when that cannot be told without reading it."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                picked = [tif.series[series]] if series is not None else tif.series
                return sum(_yx_pixels(s.shape, s.axes) * (s.shape[s.axes.index("Z")] if "Z" in s.axes else 1)
                           for s in picked) or None
        if path.suffix.lower() in PLAIN_SUFFIXES:
            from PIL import Image as PILImage

            with PILImage.open(path) as im:
                return im.width * im.height
    except Exception:  # unreadable: the reader says why, later
        return None
    return None


def has_z_axis(path: Path, series: int | None = None) -> bool:
    """Whether a TIFF's header marks a Z axis of more than one plane (in a series to segment)."""
    return any(planes > 1 for planes, *_ in stack_headers(path, series, None))


def stack_headers(path: Path, series: int | None, z_axis: int | None) -> list[tuple[int, int, int, int]]:
    """(planes, Y, X, bytes as stored) of each series to segment of a TIFF, from its header only
    or OME-Zarr (planes: ``z_axis``'s length, else the recorded Z's, else 1); [] when unreadable or
    neither."""
    if is_ome_zarr(path):
        try:
            image = open_ome_zarr(path)
        except ImageReadError:
            return []  # the reader says why, later
        return [_header(image.array.shape, image.axes, z_axis, image.array.dtype.itemsize)]
    if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file():
        return []
    try:
        with tifffile.TiffFile(path) as tif:
            picked = [tif.series[series]] if series is not None else tif.series
            return [_header(s.shape, s.axes, z_axis, s.dtype.itemsize) for s in picked]
    except Exception:  # unreadable: the reader says why, later
        return []


def _header(shape: Sequence[int], axes: str, z_axis: int | None, itemsize: int) -> tuple[int, int, int, int]:
    z = shape[z_axis] if z_axis is not None and -len(shape) <= z_axis < len(shape) else \
        shape[axes.index("Z")] if "Z" in axes else 1
    ly, lx = (shape[axes.index("Y")], shape[axes.index("X")]) if "Y" in axes and "X" in axes \
        else shape[-2:]
    return int(z), int(ly), int(lx), int(np.prod(shape)) * itemsize


def _yx_pixels(shape: Sequence[int], axes: str) -> int:
    if "Y" in axes and "X" in axes:
        return shape[axes.index("Y")] * shape[axes.index("X")]
    return int(np.prod(shape[-2:])) if len(shape) >= 2 else 0


def image_from_array(arr: np.ndarray, channel_axis: int | None = None, where: str = "image") -> np.ndarray:
    """An in-memory Y×X, Y×X×C or C×Y×X array as C×Y×X, checked as a file's pixels are (the
    channel axis guessed as for files unless ``channel_axis`` says)."""
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise ImageReadError(f"{where}: expected Y×X or Y×X×C / C×Y×X, got shape {arr.shape}")
    axes = "YX" if arr.ndim == 2 else "QYX"  # Q: unknown, so the channel axis is guessed
    return _check_values(_to_cyx(arr, axes, channel_axis, where)[0], where)


def stack_from_array(arr: np.ndarray, z_axis: int = 0, channel_axis: int | None = None,
                     where: str = "stack") -> np.ndarray:
    """An in-memory Z-stack (Z×Y×X, or with a channel axis anywhere) as Z×C×Y×X, checked as a
    file's pixels are; each plane's channel axis guessed as for images unless ``channel_axis``
    (counting the array's axes, Z included) says."""
    arr = np.asarray(arr)
    if arr.ndim not in (3, 4):
        raise ImageReadError(f"{where}: expected Z×Y×X or a Z-stack with channels, got shape {arr.shape}")
    axes = "Q" * (arr.ndim - 2) + "YX"
    z = _z_index(arr, axes, z_axis, where)
    return _check_values(_to_zcyx(arr, axes, z, channel_axis, where)[0], where)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in (*TIFF_SUFFIXES, *PLAIN_SUFFIXES)


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Inputs as files: a directory stands for the image files directly inside it (sorted); a
    ``.zarr`` directory is one OME-Zarr image."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and path.name.lower().endswith(".zarr"):
            files.append(path)  # an OME-Zarr image (streamed), not a folder of images
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if is_image_file(p))
            if not found:
                raise ImageReadError(f"{path}: directory holds no TIFF/PNG/JPEG images")
            files.extend(found)
        else:
            files.append(path)
    return files


def read_images(path: str | Path, channel_axis: int | None = None, series: int | None = None,
                z_axis: int | None = None, stack: str = "refuse") -> list[Image]:
    """All images in ``path``: every series of a multi-series OME-TIFF unless ``series`` picks one.
    A series with a Z axis (the file's, or ``z_axis``) is refused unless ``stack`` (one of
    :data:`STACK_MODES`) makes it one Z×C×Y×X image or one image per plane (``<name>_zNNN``)."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if is_ome_zarr(path):
        return _read_zarr(path, channel_axis, z_axis, stack)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(path, channel_axis, series, z_axis, stack)
    if suffix in PLAIN_SUFFIXES:
        return _read_plain(path, channel_axis)
    raise ImageReadError(f"{path}: unsupported file type '{suffix}'; sa-deploy reads TIFF/OME-TIFF "
                         f"({', '.join(TIFF_SUFFIXES)}) and {', '.join(PLAIN_SUFFIXES)}")


def check_channels(channels: Sequence[int] | None) -> None:
    """``--channels`` names at least one channel, each once and ≥ 0. Cellpose 3's ``0,0`` (greyscale,
    empty second channel) is written ``0`` here: missing channels are zero-padded."""
    if channels is None:
        return
    if not channels:
        raise SaDeployError("--channels names no channel; give e.g. 0 (greyscale) or 1,0, or leave "
                            "it out to use the image's channels")
    if any(c < 0 for c in channels):
        raise SaDeployError(f"--channels {','.join(map(str, channels))}: channel indices are ≥ 0")
    if len(set(channels)) < len(channels):
        raise SaDeployError(f"--channels {','.join(map(str, channels))} names a channel twice; for a "
                            "greyscale image write --channels 0 (the model's other channels are "
                            "zero-filled, as cellpose 3's 0,0)")


def select_channels(img: np.ndarray, channels: Sequence[int] | None, nchan: int,
                    where: str, pad: bool = True) -> np.ndarray:
    """Pick the channels the network sees, in order; zero-pad up to ``nchan``.

    A single-channel image on a 2-channel CPnet becomes [image, zeros] — cellpose 3's
    ``channels=[0, 0]``. More image channels than the network takes must be chosen explicitly.
    A Z×C×Y×X stack has each plane's channels picked so.
    """
    if img.ndim == 4:
        return np.stack([select_channels(plane, channels, nchan, where, pad) for plane in img])
    check_channels(channels)
    if channels is not None:
        bad = [c for c in channels if not 0 <= c < img.shape[0]]
        if bad:
            raise ImageReadError(f"{where}: --channels {bad} out of range; the image has "
                                 f"{img.shape[0]} channels (0..{img.shape[0] - 1})")
        if len(channels) > nchan:
            raise ImageReadError(f"{where}: --channels lists {len(channels)} channels but the model "
                                 f"takes at most {nchan}")
        img = img[list(channels)]
    elif img.shape[0] > nchan:
        raise ImageReadError(f"{where}: image has {img.shape[0]} channels but the model takes at "
                             f"most {nchan}; choose them with --channels (e.g. --channels 0,1)")
    if pad and img.shape[0] < nchan:
        img = np.concatenate([img, np.zeros((nchan - img.shape[0], *img.shape[1:]), img.dtype)])
    return img


def read_network_images(paths: Sequence[str | Path], nchan: int, pad: bool, channels, channel_axis,
                        series, report: Callable[[str], None] | None = None, stacks: bool = False,
                        z_axis: int | None = None) -> list[np.ndarray]:
    """Every image as C×Y×X with the network's channels. The images are one set (a training or
    validation set), so an unreadable one is not skipped: one error names every file that failed
    and why, before the caller has written anything. ``report`` hears each kind of
    :attr:`Image.note` once (the first file and how many more). With ``stacks``, a file whose axes
    record Z (or every file, with ``z_axis``) comes back as one Z×C×Y×X stack."""
    images, failed, files, notes = [], [], expand_inputs(paths), {}
    for path in files:
        stack = "volume" if stacks and (z_axis is not None or has_z_axis(path, series)) else "refuse"
        try:
            for image in read_images(path, channel_axis=channel_axis, series=series, z_axis=z_axis,
                                     stack=stack):
                try:
                    images.append(select_channels(image.data, channels, nchan, str(image.source), pad))
                except SaDeployError as exc:  # a guessed channel axis is part of what went wrong
                    raise ImageReadError(f"{exc}; {image.note}" if image.note else str(exc)) from None
                if image.note:
                    notes.setdefault(image.note, []).append(image.source)
        except SaDeployError as exc:
            failed.append(str(exc))
    if failed:
        which = "it" if len(failed) == 1 else f"them ({len(failed)} of {len(files)} input files)"
        raise ImageReadError("\n".join(failed) + f"\nfix or remove {which}: every image given is "
                             "part of the set, none is skipped")
    for note, sources in notes.items() if report is not None else ():
        n = len(sources) - 1
        more = f" (and {n} more image{'s' * (n > 1)})" if n else ""
        report(f"note: {sources[0]}{more}: {note}")
    return images


def read_label_image(path: Path, stacks: bool = False) -> np.ndarray:
    """A 2-D integer label image (squeezing singleton axes); with ``stacks`` also Z×Y×X labels."""
    if Path(path).is_dir():
        raise ImageReadError(f"{path} is a folder, not a label image file; give the files")
    if not Path(path).is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        arr = np.squeeze(tifffile.imread(path))
    except Exception as exc:  # tifffile raises several types for unreadable files
        raise ImageReadError(f"{path}: not a readable TIFF label image ({exc})") from exc
    if arr.ndim not in ((2, 3) if stacks else (2,)) or not np.issubdtype(arr.dtype, np.integer) \
            or arr.min() < 0:
        what = "a 2-D or Z×Y×X" if stacks else "a 2-D"
        raise ImageReadError(f"{path}: expected {what} non-negative integer label image, got "
                             f"{arr.dtype} {arr.shape}")
    return arr
