"""Where sa-deploy keeps what it makes once and reuses: one root, one folder per kind.

``$SA_DEPLOY_CACHE`` when set, else ``$XDG_CACHE_HOME/sa-deploy`` (``~/.cache/sa-deploy``), as
cellpose keeps its weights under ``~/.cellpose/models`` (``$CELLPOSE_LOCAL_MODELS_PATH``).
"""

from __future__ import annotations

import os
from pathlib import Path

#: the kinds: exported ONNX graphs (``--runtime auto`` on the CPU), torch.compile kernels,
#: onnxruntime's TensorRT engines and timing caches
KINDS = ("graphs", "torch-compile", "ort-tensorrt")


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cached artefact (not created here)."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind '{kind}'; one of {', '.join(KINDS)}")
    root = os.environ.get("SA_DEPLOY_CACHE")
    if root:
        return Path(root) / kind
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sa-deploy" / kind
