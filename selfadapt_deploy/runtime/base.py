"""One runner contract for every backend (torch now; onnxruntime / TensorRT later).

As Polygraphy's runners: the public ``activate`` / ``infer`` / ``deactivate`` own the checks and
the lifecycle; a backend overrides only the ``*_impl`` hooks. Use as a context manager.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """What a runner accepts (channels, tile geometry) and the cell scale its model expects."""

    nchan: int  # exact channel count, or the maximum when ``fewer_channels_ok``
    tile_size: int
    fixed_tile: bool  # True: H = W = tile_size exactly; False: any multiple of 16
    diam_mean: float  # images are rescaled by diam_mean / diameter
    default_diameter: float  # the diameter assumed when the user gives none
    fewer_channels_ok: bool = False


class Runner(ABC):
    """``infer(x: B×C×H×W float32) → B×3×H×W float32`` as (dY, dX, cellprob logit)."""

    name = "runner"

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.is_active = False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self.is_active:
            raise RuntimeError(f"{self.name} is already active")
        self.activate_impl()
        self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Check ``x`` against the spec, then run the backend."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active; use it inside `with runner:`")
        self.check_input(x)
        y = self.infer_impl(x)
        if y.shape != (x.shape[0], 3, *x.shape[2:]) or y.dtype != np.float32:
            raise RuntimeError(f"{self.name} returned {y.dtype} {y.shape}, expected float32 "
                               f"{(x.shape[0], 3, *x.shape[2:])}")
        return y

    def check_input(self, x: np.ndarray) -> None:
        s = self.spec
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise TypeError(f"{self.name}: unexpected dtype {getattr(x, 'dtype', type(x))}, "
                            "expected float32 numpy array")
        if x.ndim != 4:
            raise ValueError(f"{self.name}: unexpected shape {x.shape}, expected B×C×H×W")
        c, h, w = x.shape[1:]
        if c > s.nchan or (c < s.nchan and not s.fewer_channels_ok) or c < 1:
            want = f"1..{s.nchan}" if s.fewer_channels_ok else str(s.nchan)
            raise ValueError(f"{self.name}: unexpected channel count {c}, expected {want}")
        if s.fixed_tile and (h, w) != (s.tile_size, s.tile_size):
            raise ValueError(f"{self.name}: unexpected shape {x.shape}, tiles must be "
                             f"{s.tile_size}×{s.tile_size}")
        if not s.fixed_tile and (h % 16 or w % 16):
            raise ValueError(f"{self.name}: unexpected shape {x.shape}, H and W must be multiples of 16")

    def activate_impl(self) -> None:  # noqa: B027 - optional hook
        """Build sessions/engines, move weights to the device."""

    def deactivate_impl(self) -> None:  # noqa: B027 - optional hook
        """Free what ``activate_impl`` built."""

    @abstractmethod
    def infer_impl(self, x: np.ndarray) -> np.ndarray:
        """Backend inference on a checked batch."""
