"""PyTorch backend of the runner contract; device choice is explicit and never falls back.

On CUDA it runs in reduced precision by default (Cellpose-SAM in bf16 as cellpose 4 does, CPnet
in fp16) and can go further: Cellpose-SAM's
attention through ``scaled_dot_product_attention``, CPnet in channels-last layout, and the whole
graph under ``torch.compile`` with batch sizes bucketed to powers of two (a slide's last, smaller
batch reuses a compiled graph instead of compiling another) and a persistent compilation cache.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from selfadapt_deploy.caches import cache_dir
from selfadapt_deploy.errors import DeviceError, SaDeployError
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.runtime.base import MODEL_GRAPH, GraphIO, Runner
from selfadapt_deploy.runtime.graphs import check_precision, exact_fp32, graph_module, scoped_env

ATTENTIONS = ("auto", "sdpa", "native")


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


def resolve_precision(precision: str | None, device: torch.device | str,
                      family: type[SegmentationNet] | SegmentationNet) -> str:
    """``auto`` (or None) → the family's reduced precision on CUDA (its ``cuda_precision``),
    fp32 elsewhere (the CPU path stays exact). Any other name must be fp32, fp16 or bf16."""
    if precision in (None, "auto"):
        return family.cuda_precision if torch.device(device).type == "cuda" else "fp32"
    check_precision(precision)
    return precision


def batch_bucket(n: int) -> int:
    """The compiled batch size that serves ``n`` tiles: the next power of two."""
    return 1 << (n - 1).bit_length()


class TorchRunner(Runner):
    """Runs a graph (:mod:`runtime.graphs`) of a :class:`SegmentationNet` in eval mode under
    ``torch.inference_mode``, at fp32 or with the precision cast into the graph (fp16 / bf16).

    ``attention``: ``sdpa`` routes Cellpose-SAM's attention through
    ``scaled_dot_product_attention`` (same function, equal to rounding); ``auto`` does so on CUDA
    and keeps cellpose's own code on the CPU. ``compile``: ``torch.compile`` of the graph, kernels
    cached in ``compile_cache`` (default ``caches.cache_dir("torch-compile")``).
    """

    name = "torch"

    def __init__(self, net: SegmentationNet, device: torch.device | str = "cpu",
                 precision: str | None = "fp32", graph: GraphIO = MODEL_GRAPH, compile: bool = False,
                 attention: str = "auto", compile_cache: Path | None = None):
        super().__init__(net.spec, graph, device)
        if attention not in ATTENTIONS:
            raise SaDeployError(f"--attention must be one of {', '.join(ATTENTIONS)}, got '{attention}'")
        self.net, self.precision = net, resolve_precision(precision, self.device, net)
        self.sdpa = net.has_attention and (attention == "sdpa" or (attention == "auto" and
                                                                   self.device.type == "cuda"))
        # at reduced precision the graph holds its own cast copy: its layout can change freely
        self.channels_last = (net.channels_last_on_cuda and self.device.type == "cuda"
                              and self.precision != "fp32")
        self.compile, self.compile_cache = compile, compile_cache
        extras = [self.precision] + ["sdpa"] * self.sdpa + ["channels-last"] * self.channels_last
        self.name = f"torch ({', '.join(extras + ['compiled'] * compile)})"

    def activate_impl(self) -> None:
        self.was_training = self.net.training  # the caller's mode, given back on deactivate
        self.net.to(self.device).eval()
        module = graph_module(self.net, self.graph, self.precision, self.sdpa)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.compile:
            cache = self.compile_cache or cache_dir("torch-compile")
            cache.mkdir(parents=True, exist_ok=True)
            self.compile_cache = cache
            module = torch.compile(module, dynamic=False)
        self.module = module

    def deactivate_impl(self) -> None:
        del self.module
        self.net.train(self.was_training)

    @torch.inference_mode()
    def run_impl(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        if self.compile:  # zero tiles up to the bucket, results sliced off; always a new tensor
            # made here, so every call's input is alike for the compiled graph's guards
            padded = x.new_zeros((batch_bucket(n), *x.shape[1:]))
            padded[:n] = x
            x = padded
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with contextlib.ExitStack() as scope:
            scope.enter_context(exact_fp32())
            if self.compile:  # inductor reads its cache directory when it compiles: this call
                scope.enter_context(scoped_env("TORCHINDUCTOR_CACHE_DIR", str(self.compile_cache)))
            outputs = self.module(x)
        return {name: y[:n].contiguous() for name, y in zip(self.graph.output_names, outputs, strict=True)}
