"""Inference backends behind one contract (:class:`Runner`, on torch tensors): torch,
onnxruntime (``ort_runner``) and TensorRT (``trt_runner``, imported only when used); ``select``
turns ``--model`` / ``--runtime`` into one of them."""

from selfadapt_deploy.runtime.base import MODEL_GRAPH, TEACHER_GRAPH, GraphIO, Runner
from selfadapt_deploy.runtime.ort_runner import OrtRunner
from selfadapt_deploy.runtime.torch_runner import TorchRunner, resolve_device

__all__ = ["MODEL_GRAPH", "TEACHER_GRAPH", "GraphIO", "OrtRunner", "Runner", "TorchRunner",
           "resolve_device"]
