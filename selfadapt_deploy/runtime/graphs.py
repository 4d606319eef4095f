"""The graphs every backend runs, as torch modules: the ONNX exporter traces these modules and the
torch runner runs them, so an exported graph and its torch reference are the same code.

* :class:`ModelGraph` — tiles → (dY, dX, cellprob logit): the network's ``export_forward``.
* :class:`TeacherTTAGraph` — tiles → the SelfAdapt teacher's D4 ensemble (mean flows, mean cell
  probability, and their std across the 8 views), exactly ``trainer/teacher.py``'s computation.

Reduced precision lives in the graph (what TensorRT 11's strong typing requires): the weights are
cast, the input is cast on entry and every output is float32 on exit.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import torch
from torch import nn

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.runtime.base import MODEL_GRAPH, TEACHER_GRAPH, GraphIO
from selfadapt_deploy.tiling import d4_ensemble, d4_views

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(precision: str) -> torch.dtype:
    """The torch dtype of a precision name; anything else is a user error."""
    if precision not in PRECISIONS:
        raise SaDeployError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    return PRECISIONS[precision]


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 means fp32 on CUDA too, as in our onnxruntime and TensorRT runners: TF32 matmuls and
    convolutions off (importing ``cellpose.vit`` turns TF32 matmuls on process-wide); the
    caller's flags are restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextlib.contextmanager
def scoped_env(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the duration of the block only."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class ModelGraph(nn.Module):
    """tiles B×C×H×W float32 → (B×3×H×W float32,)."""

    def __init__(self, net: SegmentationNet, dtype: torch.dtype = torch.float32, sdpa: bool = False):
        super().__init__()
        self.net, self.dtype, self.sdpa = net, dtype, sdpa

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.net.export_forward(tiles.to(self.dtype), sdpa=self.sdpa).float(),)


class TeacherTTAGraph(nn.Module):
    """Square tiles B×C×S×S → (flows B×2, prob B×1, flows_std B×2, prob_std B×1), all ×S×S, float32:
    the 8 D4 views in one forward, mapped back (flows as vectors), averaged."""

    def __init__(self, net: SegmentationNet, dtype: torch.dtype = torch.float32, sdpa: bool = False):
        super().__init__()
        self.net, self.dtype, self.sdpa = net, dtype, sdpa

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return d4_ensemble(self.net.export_forward(d4_views(tiles.to(self.dtype)), sdpa=self.sdpa))


def graph_module(net: SegmentationNet, graph: GraphIO = MODEL_GRAPH, precision: str = "fp32",
                 sdpa: bool = False) -> nn.Module:
    """The eval-mode module computing ``graph`` with ``net`` at ``precision``. At fp32 it shares
    ``net``'s parameters (its ``state_dict`` names are the exported graph's initializer names);
    at reduced precision it holds a cast copy, so the caller's network is never changed.
    ``sdpa``: attention through ``scaled_dot_product_attention`` (torch runner; not exported)."""
    dtype = check_precision(precision)
    if dtype != torch.float32:
        net = copy.deepcopy(net).to(dtype)
    cls = {MODEL_GRAPH.name: ModelGraph, TEACHER_GRAPH.name: TeacherTTAGraph}[graph.name]
    return cls(net, dtype, sdpa).eval()
