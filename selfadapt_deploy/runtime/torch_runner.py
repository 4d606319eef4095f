"""PyTorch backend of the runner contract; device choice is explicit and never falls back."""

from __future__ import annotations

import torch

from selfadapt_deploy.errors import DeviceError
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.runtime.base import MODEL_GRAPH, GraphIO, ModelSpec, Runner
from selfadapt_deploy.runtime.graphs import check_precision, graph_module


def resolve_device(device: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; 'cuda' without a GPU is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} requested but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise DeviceError(f"unknown device '{device}'; use auto, cpu or cuda[:N]")
    return torch.device(device)


def spec_for(net: SegmentationNet) -> ModelSpec:
    return ModelSpec(nchan=net.nchan, tile_size=net.tile_size, fixed_tile=net.fixed_tile,
                     diam_mean=net.diam_mean, default_diameter=net.default_diameter,
                     fewer_channels_ok=net.family == "cpsam")


class TorchRunner(Runner):
    """Runs a graph (:mod:`runtime.graphs`) of a :class:`SegmentationNet` in eval mode under
    ``torch.inference_mode``, at fp32 or with the precision cast into the graph (fp16 / bf16)."""

    name = "torch"

    def __init__(self, net: SegmentationNet, device: torch.device | str = "cpu",
                 precision: str = "fp32", graph: GraphIO = MODEL_GRAPH):
        super().__init__(spec_for(net), graph, device)
        check_precision(precision)
        self.net, self.precision = net, precision
        self.name = f"torch ({precision})"

    def activate_impl(self) -> None:
        self.net.to(self.device).eval()
        self.module = graph_module(self.net, self.graph, self.precision)

    def deactivate_impl(self) -> None:
        del self.module

    @torch.inference_mode()
    def run_impl(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.graph.output_names, self.module(x), strict=True))
