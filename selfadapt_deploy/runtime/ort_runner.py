"""onnxruntime backend of the runner contract: CPU, CUDA and TensorRT execution providers.

The requested provider must be the one that runs: onnxruntime quietly drops a provider it cannot
load (missing CUDA/cuDNN/TensorRT libraries) and runs on the CPU, so the session's providers are
checked after creation and a mismatch is an error naming what is available. On CUDA the graph
reads and writes torch-owned device memory through I/O binding, on a stream of the runner's own
that is ordered after torch's current stream (onnxruntime rejects torch's default stream, 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from selfadapt_deploy.caches import cache_dir
from selfadapt_deploy.errors import ArtifactError, DeviceError
from selfadapt_deploy.models.base import ModelSpec
from selfadapt_deploy.runtime.base import MODEL_GRAPH, GraphIO, Runner

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


class OrtRunner(Runner):
    """Runs an ONNX graph (a file, or serialised bytes) with one onnxruntime execution provider."""

    def __init__(self, source: str | Path | bytes, spec: ModelSpec, graph: GraphIO = MODEL_GRAPH,
                 device: torch.device | str = "cpu", provider: str | None = None):
        device = torch.device(device)
        provider = provider or ("cpu" if device.type == "cpu" else "cuda")
        if provider not in PROVIDERS:
            raise ValueError(f"unknown onnxruntime provider '{provider}'; use {', '.join(PROVIDERS)}")
        if (provider == "cpu") != (device.type == "cpu"):
            raise DeviceError(f"onnxruntime provider '{provider}' does not run on device {device}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"onnxruntime provider '{provider}' needs CUDA, but torch sees no GPU")
        super().__init__(spec, graph, device)
        self.source, self.provider = source, provider
        self.name = f"onnxruntime ({PROVIDERS[provider]})"
        self._proto = None  # the graph with its weights, loaded on the first update_weights

    # ---- lifecycle ------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.session = self._make_session(self.source)

    def deactivate_impl(self) -> None:
        del self.session
        self._proto = None

    def _provider_options(self) -> dict:
        if self.provider == "cpu":
            return {}
        options = {"device_id": self.device.index or 0}
        if self.provider == "cuda":
            options["user_compute_stream"] = str(self._stream.cuda_stream)
            options["use_tf32"] = 0  # on by default; an fp32 graph runs in fp32
        else:
            cache = cache_dir("ort-tensorrt")
            cache.mkdir(parents=True, exist_ok=True)
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache),
                           trt_timing_cache_enable=True, trt_timing_cache_path=str(cache))
        return options

    def _make_session(self, source: str | Path | bytes):
        import onnxruntime as ort

        wanted = PROVIDERS[self.provider]
        if wanted not in ort.get_available_providers():
            raise DeviceError(f"onnxruntime {ort.__version__} has no {wanted}; available: "
                              f"{', '.join(ort.get_available_providers())}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: provider problems are raised below
        if self.provider == "cpu":  # the CPU threads torch uses (physical cores, OMP_NUM_THREADS,
            options.intra_op_num_threads = torch.get_num_threads()  # or torch.set_num_threads)
        session = ort.InferenceSession(source if isinstance(source, bytes) else str(source),
                                       options, providers=[(wanted, self._provider_options())])
        if session.get_providers()[0] != wanted:
            raise DeviceError(f"onnxruntime could not load {wanted} (its libraries are missing or "
                              f"do not match) and would run on {session.get_providers()}; install "
                              "the matching CUDA/cuDNN/TensorRT libraries or choose another "
                              "--runtime / --device")
        self._check_io(session)
        return session

    def _check_io(self, session) -> None:
        inputs, outputs = session.get_inputs(), [o.name for o in session.get_outputs()]
        if [i.name for i in inputs] != [self.graph.input] or outputs != self.graph.output_names:
            raise ArtifactError(f"{self.source!s:.200}: graph has inputs {[i.name for i in inputs]} "
                                f"and outputs {outputs}; the {self.graph.name} graph has "
                                f"[{self.graph.input}] and {self.graph.output_names}")
        channels = inputs[0].shape[1]
        self.pads_channels = self.spec.fewer_channels_ok and channels == self.spec.nchan

    # ---- inference ------------------------------------------------------------------------------
    def run_impl(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        names = self.graph.output_names
        if self.device.type == "cpu":
            arrays = self.session.run(names, {self.graph.input: x.numpy()})
            return {n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)}
        outputs = {n: torch.empty(s, device=self.device)
                   for n, s in self.graph.output_shapes(tuple(x.shape)).items()}
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(self.graph.input, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        for n, y in outputs.items():
            binding.bind_output(n, "cuda", index, np.float32, tuple(y.shape), y.data_ptr())
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)  # x is ready before onnxruntime reads it
        self.session.run_with_iobinding(binding)
        current.wait_stream(self._stream)  # and the outputs before torch reads them
        return outputs

    # ---- weights --------------------------------------------------------------------------------
    def update_weights_impl(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Every initializer of the graph from ``weights`` (cast to the graph's dtype), then a new
        session; the structure and its optimisation are the exported graph's."""
        import onnx
        from onnx import helper, numpy_helper

        if self._proto is None:
            self._proto = onnx.load_from_string(self.source) if isinstance(self.source, bytes) \
                else onnx.load(str(self.source))
        initializers = self._proto.graph.initializer
        missing = [i.name for i in initializers if i.name not in weights]
        if missing:
            raise ValueError(f"{self.name}: no new value for {len(missing)} graph weights, e.g. "
                             f"{', '.join(missing[:5])}")
        for init in initializers:
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            value = weights[init.name].detach().float().cpu().numpy().astype(dtype)
            if tuple(value.shape) != tuple(init.dims):
                raise ValueError(f"{self.name}: weight {init.name} has shape {value.shape}, the "
                                 f"graph's is {tuple(init.dims)}")
            init.CopyFrom(numpy_helper.from_array(value, init.name))
        self.session = self._make_session(self._proto.SerializeToString())
