"""The one contract every model family implements (DESIGN.md §3), and the facts a family declares.

Everything sa-deploy needs to know about a family (its cellpose names and download, how its state
dicts look, tile geometry and channels, CUDA precision, capabilities, adaptation defaults, citation)
is a class attribute here, declared once by the family's class; ``models/families.py`` looks them
up. No code outside ``models/`` compares family names.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from selfadapt_deploy.errors import ModelLoadError


@dataclass(frozen=True)
class ModelSpec:
    """What a runner accepts (channels, tile geometry) and the cell scale its model expects."""

    nchan: int  # exact channel count, or the maximum when ``fewer_channels_ok``
    tile_size: int
    fixed_tile: bool  # True: H = W = tile_size exactly; False: any multiple of 16
    diam_mean: float  # images are rescaled by diam_mean / diameter
    default_diameter: float  # the diameter assumed when the user gives none
    fewer_channels_ok: bool = False

    @property
    def pads_missing_channels(self) -> bool:
        """Images with fewer channels than ``nchan`` are zero-padded before the network (else the
        network takes 1..nchan channels itself)."""
        return not self.fewer_channels_ok

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DemoRecipe:
    """How the offline demo trains a small network of a family (``trainer/demo.py``)."""

    source_iterations: int = 200
    source_lr: float | None = None  # None: the demo's default source-training lr
    adapt_lr: float | None = None  # None: the family's ``adapt_defaults["lr"]``


class SegmentationNet(nn.Module, ABC):
    """A Cellpose-style network: ``forward(x: B×C×H×W) → B×3×H×W`` as (dY, dX, cellprob-logit).

    Flows are ≈ 5 × unit vectors (Cellpose's training target). ``embed`` gives the L2-normalised,
    globally pooled bottleneck used by the embedding-distance stopping rule.
    """

    # ---- facts every family class declares (read through models/families.py) ----
    #: short name: manifests, run.json, ``--family``
    family: ClassVar[str]
    #: what users call it
    title: ClassVar[str]
    #: cellpose's names of released weights, and the base URL cellpose downloads them from
    model_names: ClassVar[tuple[str, ...]] = ()
    download_url: ClassVar[str] = ""
    #: True: images with fewer channels than ``nchan`` are zero-padded (Cellpose 3); False: the
    #: network takes 1..nchan channels itself (cellpose slices the patch-embedding weight)
    pads_missing_channels: ClassVar[bool]
    #: ``--precision auto`` on CUDA (fp32 elsewhere)
    cuda_precision: ClassVar[str]
    #: attention that ``scaled_dot_product_attention`` can run (``export_forward(sdpa=True)``)
    has_attention: ClassVar[bool] = False
    #: convolutions that gain from channels-last memory on CUDA at reduced precision
    channels_last_on_cuda: ClassVar[bool] = False
    #: what ``--runtime auto`` runs a plain weights file in on the CPU: ``onnx`` (exported once
    #: into the graph cache) where onnxruntime was measured faster than torch, else ``torch``
    cpu_runtime: ClassVar[str] = "torch"
    #: adaptation defaults when the user gives none: ``lr``, ``l2sp``
    adapt_defaults: ClassVar[Mapping[str, float]]  # (a read-only mapping in each family)
    #: the offline demo's small network of this family
    demo: ClassVar[DemoRecipe] = DemoRecipe()
    #: (reference, DOI) cited in exported packages
    citation: ClassVar[tuple[str, str]]

    #: side of the square tile the network is run on
    tile_size: int
    #: whether inputs must be exactly ``tile_size`` (ViT position embeddings) or may be any multiple of 16
    fixed_tile: bool

    @classmethod
    def cache_file_name(cls, name: str) -> str:
        """File name of released weights ``name`` in cellpose's cache."""
        return name

    @classmethod
    @abstractmethod
    def recognises(cls, keys: Set[str]) -> bool:
        """Whether a state dict with these keys (``module.`` prefix removed) is of this family."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str = "<state dict>"
                        ) -> SegmentationNet:
        """Build the network a state dict describes (sizes read from its shapes), load strictly."""

    @classmethod
    @abstractmethod
    def build_demo(cls, tile: int, diam_mean: float, seed: int) -> SegmentationNet:
        """The small network of this family the demo and tests train, initialised from ``seed``
        (global RNG untouched); ``diam_mean``: the demo cells' diameter, where the family trains it."""

    @property
    def spec(self) -> ModelSpec:
        """What runners, tilers and readers need to know about this network."""
        return ModelSpec(nchan=self.nchan, tile_size=self.tile_size, fixed_tile=self.fixed_tile,
                         diam_mean=self.diam_mean, default_diameter=self.default_diameter,
                         fewer_channels_ok=not self.pads_missing_channels)

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


@contextlib.contextmanager
def evaluating(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode for the block; its previous mode (the caller's) is given back."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def is_identity_readout(w2: torch.Tensor) -> bool:
    """Whether a ViT family's read-out kernel ``W2`` (k·ps² × k × ps × ps, not trainable) is the
    identity, so its transposed convolution is exactly a pixel shuffle. Decided once, outside any
    tracer; a shapes-only (meta) kernel is not."""
    w2 = w2.detach()
    return w2.device.type != "meta" and bool(
        torch.equal(w2.reshape(w2.shape[0], -1).cpu(), torch.eye(w2.shape[0], dtype=w2.dtype)))


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
