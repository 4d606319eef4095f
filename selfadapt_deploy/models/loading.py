"""Resolve ``--model``: a weights file of any family (``models/families.py``), a Cellpose model
name, or a run directory.

Loading is strict everywhere: an unknown file, a mistyped name or missing/mismatched keys is an
error, never a silent fallback (cellpose 4 silently falls back to cpsam_v2 with strict=False).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from selfadapt_deploy.errors import ModelLoadError
from selfadapt_deploy.manifest import is_export_dir, open_export_dir, refuse_unlisted_artifacts
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.models.families import closest_model_names, family_of_model_name, family_of_state

RUN_MODEL_FILE = "model.pt"  # the selected model inside an adaptation run directory
#: a failed download that is the local disk's fault, not the network's
LOCAL_ERRNOS = (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM)


def cellpose_model_dir() -> Path:
    """Cellpose's own weight cache: ``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``."""
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env) if env else Path.home() / ".cellpose" / "models"


def detect_family(state: dict) -> str:
    """The family name of a state dict, from its keys; raises for anything else."""
    return family_of_state(state).family


def load_plain(path: Path, what: str = "weights file") -> object:
    """``torch.load`` with ``weights_only=True`` (tensors and plain data; nothing that runs code).
    Any failure is one :class:`ModelLoadError` line naming the file — never torch's multi-line
    unpickler text, which suggests ``weights_only=False``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / non-torch files
        found = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        if found:
            raise ModelLoadError(f"{path}: the {what} holds pickled Python objects besides tensors and "
                                 f"plain data ({found[0]}); refusing to unpickle them (that could run "
                                 "code)") from None
        raise ModelLoadError(f"{path}: not a readable PyTorch {what} (corrupt, truncated or another "
                             "format); check the file or download it again") from None


def load_weights_file(path: Path) -> SegmentationNet:
    """Load a ``torch.save``d state dict of any family, recognised by its keys."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    state = load_plain(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a state dict of tensors (torch.save(net.state_dict()))")
    try:
        cls = family_of_state(state)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    return cls.from_state_dict(state, source=str(path))


def download_to_cache(name: str) -> Path:
    """Path of a named Cellpose model in cellpose's cache, downloading it when a network exists."""
    cls = family_of_model_name(name)
    if cls is None:
        raise ModelLoadError(f"'{name}' is not a released Cellpose model. {closest_model_names(name)}")
    fname = cls.cache_file_name(name)
    target = cellpose_model_dir() / fname
    if target.is_file():
        return target
    url = cls.download_url + fname
    from cellpose.utils import download_url_to_file

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        download_url_to_file(url, os.fspath(target), progress=True)
    except OSError as exc:  # URLError and socket/HTTP errors are OSErrors; so is a full disk
        target.unlink(missing_ok=True)
        if exc.errno in LOCAL_ERRNOS:
            raise ModelLoadError(f"model '{name}': could not write {target} ({exc}); free space or "
                                 "set CELLPOSE_LOCAL_MODELS_PATH to a writable directory") from exc
        raise ModelLoadError(
            f"model '{name}' is not in cellpose's cache and could not be downloaded ({exc}). "
            f"Offline? Place the file '{fname}' (from {url}) at {target} "
            "(set CELLPOSE_LOCAL_MODELS_PATH to use another directory)."
        ) from exc
    return target


def load_model(spec: str | os.PathLike, device: torch.device | str = "cpu") -> SegmentationNet:
    """Resolve ``--model`` and return the network in eval mode on ``device``.

    Accepts: a weights file of any family; a run directory holding ``model.pt``; an export
    directory (``sa-deploy export``; its weights, verified); a Cellpose model name (``cpsam``,
    ``cyto3``, …) from cellpose's cache, downloaded if possible.
    """
    path = Path(spec)
    if is_export_dir(path):  # an export directory: its weights, every listed file checked
        manifest = open_export_dir(path)
        net = load_weights_file(path / manifest.source["file"])
        if net.family != manifest.family:
            raise ModelLoadError(f"{path}: manifest says {manifest.family}, but "
                                 f"{manifest.source['file']} holds a {net.family} network")
    elif path.is_dir():
        refuse_unlisted_artifacts(path)
        if not (path / RUN_MODEL_FILE).is_file():
            raise ModelLoadError(f"{path}: directory has no {RUN_MODEL_FILE}; pass a weights file")
        net = load_weights_file(path / RUN_MODEL_FILE)
    elif path.is_file():
        net = load_weights_file(path)
    elif family_of_model_name(str(spec)) is not None:
        net = load_weights_file(download_to_cache(str(spec)))
    else:
        raise ModelLoadError(f"'{spec}' is neither a model file, a run directory nor a Cellpose "
                             f"model name. {closest_model_names(str(spec))}")
    return net.to(device).eval()
