"""One runner contract for every backend (torch, onnxruntime, TensorRT), on torch tensors.

As Polygraphy's runners: the public ``activate`` / ``run`` / ``deactivate`` own the checks and
the lifecycle; a backend overrides only the ``*_impl`` hooks. Use as a context manager. Inputs
and outputs are float32 torch tensors on the runner's device; torch owns device memory for every
backend, so nothing goes through the host between the tiler, the network and the blender.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from selfadapt_deploy.models.base import ModelSpec


@dataclass(frozen=True)
class GraphIO:
    """The input/output contract of a graph, as data (as optimum's export configs): one input of
    B×C×H×W tiles; every output is B×k×H×W float32 with k channels."""

    name: str
    input: str
    outputs: tuple[tuple[str, int], ...]  # (name, channels) in graph order
    square: bool = False  # H must equal W (D4 views rotate the tile)

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.outputs]

    def output_shapes(self, x_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        b, _, h, w = x_shape
        return {name: (b, k, h, w) for name, k in self.outputs}


#: the network: tiles → (dY, dX, cellprob logit)
MODEL_GRAPH = GraphIO("model", "tiles", (("flows_cellprob", 3),))
#: the SelfAdapt teacher's D4 ensemble (``trainer/teacher.py``): mean flows and cell probability
#: over the 8 flip/rot90 views, and their per-pixel standard deviation across views
TEACHER_GRAPH = GraphIO("teacher_tta", "tiles", (("flows", 2), ("prob", 1), ("flows_std", 2),
                                                 ("prob_std", 1)), square=True)


class Runner(ABC):
    """``run(x: B×C×H×W float32) → {output: B×k×H×W float32}`` on the runner's device.

    ``infer`` is the segmentation form of the model graph: B×3×H×W (dY, dX, cellprob logit).
    Backends whose graph has a fixed channel count (exported Cellpose-SAM graphs take 3) get
    fewer channels zero-padded here, which is what cellpose's weight slicing computes.
    """

    name = "runner"

    def __init__(self, spec: ModelSpec, graph: GraphIO = MODEL_GRAPH,
                 device: torch.device | str = "cpu"):
        self.spec, self.graph, self.device = spec, graph, torch.device(device)
        self.pads_channels = False  # set by backends whose graph input has exactly spec.nchan
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

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Check ``x`` against the spec, run the backend, check what it returned."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active; use it inside `with runner:`")
        self.check_input(x)
        x = x.to(self.device)
        if self.pads_channels and x.shape[1] < self.spec.nchan:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.spec.nchan - x.shape[1]))
        outputs = self.run_impl(x.contiguous())
        expected = self.graph.output_shapes(tuple(x.shape))
        if set(outputs) != set(expected):
            raise RuntimeError(f"{self.name} returned outputs {sorted(outputs)}, expected "
                               f"{sorted(expected)}")
        for name, y in outputs.items():
            if tuple(y.shape) != expected[name] or y.dtype != torch.float32 or y.device != self.device:
                raise RuntimeError(f"{self.name} returned {name} as {y.dtype} {tuple(y.shape)} on "
                                   f"{y.device}, expected float32 {expected[name]} on {self.device}")
        return outputs

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W tiles → B×3×H×W (dY, dX, cellprob logit); model graphs only."""
        if self.graph is not MODEL_GRAPH:
            raise RuntimeError(f"{self.name} runs the {self.graph.name} graph; infer() needs the "
                               "model graph (use run())")
        return self.run(x)[MODEL_GRAPH.outputs[0][0]]

    def check_input(self, x: torch.Tensor) -> None:
        s = self.spec
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            raise TypeError(f"{self.name}: unexpected dtype {getattr(x, 'dtype', type(x))}, "
                            "expected a float32 torch tensor")
        if x.ndim != 4:
            raise ValueError(f"{self.name}: unexpected shape {tuple(x.shape)}, expected B×C×H×W")
        c, h, w = x.shape[1:]
        if c > s.nchan or (c < s.nchan and not s.fewer_channels_ok) or c < 1:
            want = f"1..{s.nchan}" if s.fewer_channels_ok else str(s.nchan)
            raise ValueError(f"{self.name}: unexpected channel count {c}, expected {want}")
        if s.fixed_tile and (h, w) != (s.tile_size, s.tile_size):
            raise ValueError(f"{self.name}: unexpected shape {tuple(x.shape)}, tiles must be "
                             f"{s.tile_size}×{s.tile_size}")
        if not s.fixed_tile and (h % 16 or w % 16):
            raise ValueError(f"{self.name}: unexpected shape {tuple(x.shape)}, H and W must be "
                             "multiples of 16")
        if self.graph.square and h != w:
            raise ValueError(f"{self.name}: the {self.graph.name} graph needs square tiles, got "
                             f"{h}×{w}")

    def update_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Replace the graph's weights (names as in the graph module's ``state_dict``) while
        active; the structure stays. Backends that cannot do this say so."""
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active; use it inside `with runner:`")
        self.update_weights_impl(weights)

    def update_weights_impl(self, weights: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"{self.name} cannot update its weights in place")

    def activate_impl(self) -> None:  # noqa: B027 - optional hook
        """Build sessions/engines, move weights to the device."""

    def deactivate_impl(self) -> None:  # noqa: B027 - optional hook
        """Free what ``activate_impl`` built."""

    @abstractmethod
    def run_impl(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backend inference on a checked, contiguous batch on ``self.device``."""
