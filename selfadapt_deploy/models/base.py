"""The one contract every model family implements (DESIGN.md §3)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from selfadapt_deploy.errors import ModelLoadError


class SegmentationNet(nn.Module, ABC):
    """A Cellpose-style network: ``forward(x: B×C×H×W) → B×3×H×W`` as (dY, dX, cellprob-logit).

    Flows are ≈ 5 × unit vectors (Cellpose's training target). ``embed`` gives the L2-normalised,
    globally pooled bottleneck used by the embedding-distance stopping rule.
    """

    family: str
    #: side of the square tile the network is run on
    tile_size: int
    #: whether inputs must be exactly ``tile_size`` (ViT position embeddings) or may be any multiple of 16
    fixed_tile: bool

    @property
    @abstractmethod
    def nchan(self) -> int:
        """Number of input channels the network was trained with."""

    @property
    @abstractmethod
    def diam_mean(self) -> float:
        """Cell diameter (pixels) the network expects; images are rescaled by diam_mean / diameter."""

    @property
    def default_diameter(self) -> float:
        """Diameter assumed when the user gives none (no rescale unless a family says otherwise)."""
        return self.diam_mean

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → B×3×H×W: (dY, dX, cellprob logit)."""

    def export_forward(self, x: torch.Tensor, sdpa: bool = False) -> torch.Tensor:
        """``forward`` in eval mode as it is traced for export (ONNX, TensorRT) and run by the
        runners: the same outputs, written so that every weight is a named graph initializer.
        ``sdpa``: attention through ``scaled_dot_product_attention`` (families with attention)."""
        return self.forward(x)

    @abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → B×D: L2-normalised, globally pooled bottleneck features."""

    @abstractmethod
    def perturb_first_features(self, perturb: Callable[[torch.Tensor, int], torch.Tensor]
                               ) -> RemovableHandle:
        """Make every forward replace the network's first feature map ``f`` by
        ``perturb(f, channel_dim)`` (dropout consistency, ``trainer/perturb.py``) until the
        returned handle is removed."""

    @abstractmethod
    def native_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in the family's own cellpose file format (what cellpose itself loads)."""

    def save(self, path: str | Path) -> None:
        """Save weights in the family's cellpose format, atomically."""
        from selfadapt_deploy.io.writers import atomic_path

        with atomic_path(Path(path)) as tmp:
            torch.save(self.native_state_dict(), tmp)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def load_strict(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one readable error listing what did not match."""
    own = net.state_dict()
    # BatchNorm's num_batches_tracked counter is not a weight; older files omit it
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} keys (e.g. {', '.join(keys[:3])})")
        raise ModelLoadError(f"{source}: weights do not match the {type(net).__name__} architecture: "
                             + "; ".join(parts))
    for k, v in own.items():
        if k not in state:
            state[k] = v
    net.load_state_dict(state, strict=True)
