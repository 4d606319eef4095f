"""Resolve ``--model``: a weights file of either family, a Cellpose model name, or a run directory.

Loading is strict everywhere: an unknown file, a mistyped name or missing/mismatched keys is an
error, never a silent fallback (cellpose 4 silently falls back to cpsam_v2 with strict=False).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch

from selfadapt_deploy.errors import ModelLoadError
from selfadapt_deploy.manifest import is_export_dir, read_manifest, verified_file
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.models.cpnet import CPnet
from selfadapt_deploy.models.cpsam import CellposeSAM

CPSAM_URL = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/"
CP3_URL = "https://www.cellpose.org/models/"
CPSAM_NAMES = ("cpsam", "cpsam_v2")
# Cellpose 3 U-Net models: cyto/cyto2/cyto3/nuclei and the Cellpose 2.0 / 3.0 model zoo
CPNET_NAMES = (
    "cyto3", "cyto2", "cyto", "nuclei", "cyto2_cp3", "tissuenet_cp3", "livecell_cp3",
    "yeast_PhC_cp3", "yeast_BF_cp3", "bact_phase_cp3", "bact_fluor_cp3", "deepbacs_cp3",
    "neurips_cellpose_default", "neurips_grayscale_cyto2",
    "CP", "CPx", "TN1", "TN2", "TN3", "LC1", "LC2", "LC3", "LC4",
)
RUN_MODEL_FILE = "model.pt"  # the selected model inside an adaptation run directory


def cellpose_model_dir() -> Path:
    """Cellpose's own weight cache: ``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``."""
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env) if env else Path.home() / ".cellpose" / "models"


def cache_file_name(name: str) -> str:
    """File name cellpose uses in its cache (cellpose 3 adds ``torch_0`` to three legacy models)."""
    return f"{name}torch_0" if name in ("cyto", "cyto2", "nuclei") else name


def detect_family(state: dict) -> str:
    """'cpsam' or 'cpnet' from a state dict's keys; raises for anything else."""
    keys = {k.removeprefix("module.") for k in state}
    if "W2" in keys and "encoder.patch_embed.proj.weight" in keys:
        return "cpsam"
    if "output.2.weight" in keys and any(k.startswith("downsample.down.") for k in keys):
        return "cpnet"
    if "encoder.cls_token" in keys:
        raise ModelLoadError("Cellpose-DINO (cpdino) weights are not supported by sa-deploy")
    raise ModelLoadError("neither a Cellpose-SAM nor a Cellpose 3 U-Net state dict")


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
    """Load a ``torch.save``d state dict of either family, auto-detected from its keys."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    state = load_plain(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a state dict of tensors (torch.save(net.state_dict()))")
    try:
        family = detect_family(state)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    cls = CellposeSAM if family == "cpsam" else CPnet
    return cls.from_state_dict(state, source=str(path))


def download_to_cache(name: str) -> Path:
    """Path of a named Cellpose model in cellpose's cache, downloading it when a network exists."""
    fname = cache_file_name(name)
    target = cellpose_model_dir() / fname
    if target.is_file():
        return target
    url = (CPSAM_URL if name in CPSAM_NAMES else CP3_URL) + fname
    try:
        from cellpose.utils import download_url_to_file

        target.parent.mkdir(parents=True, exist_ok=True)
        download_url_to_file(url, os.fspath(target), progress=True)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "not downloadable here"
        target.unlink(missing_ok=True)
        raise ModelLoadError(
            f"model '{name}' is not in cellpose's cache and could not be downloaded ({exc}). "
            f"Offline? Place the file '{fname}' (from {url}) at {target} "
            "(set CELLPOSE_LOCAL_MODELS_PATH to use another directory)."
        ) from exc
    return target


def load_model(spec: str | os.PathLike, device: torch.device | str = "cpu") -> SegmentationNet:
    """Resolve ``--model`` and return the network in eval mode on ``device``.

    Accepts: a weights file of either family; a run directory holding ``model.pt``; an export
    directory (``sa-deploy export``; its weights, verified); a Cellpose model name (``cpsam``,
    ``cyto3``, …) from cellpose's cache, downloaded if possible.
    """
    path = Path(spec)
    if is_export_dir(path):  # an export directory: its weights, checked against the manifest
        manifest = read_manifest(path)
        net = load_weights_file(verified_file(path, manifest.source["file"], manifest.source["sha256"]))
        if net.family != manifest.family:
            raise ModelLoadError(f"{path}: manifest says {manifest.family}, but "
                                 f"{manifest.source['file']} holds a {net.family} network")
    elif path.is_dir():
        if not (path / RUN_MODEL_FILE).is_file():
            raise ModelLoadError(f"{path}: directory has no {RUN_MODEL_FILE}; pass a weights file")
        net = load_weights_file(path / RUN_MODEL_FILE)
    elif path.is_file():
        net = load_weights_file(path)
    elif str(spec) in CPSAM_NAMES or str(spec) in CPNET_NAMES:
        net = load_weights_file(download_to_cache(str(spec)))
    else:
        known = CPSAM_NAMES + CPNET_NAMES
        close = difflib.get_close_matches(str(spec), known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else f" Known names: {', '.join(known)}."
        raise ModelLoadError(f"'{spec}' is neither a model file, a run directory nor a Cellpose "
                             f"model name.{hint}")
    return net.to(device).eval()
