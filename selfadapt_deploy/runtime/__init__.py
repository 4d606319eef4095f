"""Inference backends behind one contract (:class:`Runner`)."""

from selfadapt_deploy.runtime.base import ModelSpec, Runner
from selfadapt_deploy.runtime.torch_runner import TorchRunner, resolve_device

__all__ = ["ModelSpec", "Runner", "TorchRunner", "resolve_device"]
