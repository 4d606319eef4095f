"""Native TensorRT backend of the runner contract (TensorRT 10 and 11 Python API).

torch owns every buffer: inputs and outputs are torch CUDA tensors whose addresses are given to
the execution context (``set_tensor_address``), and the engine runs on a stream of the runner's
own, ordered after torch's current stream. An engine is only run on the GPU model, compute
capability and TensorRT version it was built for; anything else is refused with the command that
rebuilds it. ``update_weights`` refits the live engine (``trt.Refitter``), never rebuilds it.

Not executed on the development machines or in CI (no TensorRT there); see the README.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

import torch

from selfadapt_deploy.errors import ArtifactError, DeviceError, SaDeployError
from selfadapt_deploy.models.base import ModelSpec
from selfadapt_deploy.runtime.base import MODEL_GRAPH, GraphIO, Runner

REBUILD = "re-run `sa-deploy export ... --trt` on this machine"


def import_tensorrt():
    """The ``tensorrt`` module, or one error saying how to get it (imported only when used)."""
    try:
        import tensorrt
    except ImportError as exc:
        raise SaDeployError(
            f"TensorRT is not installed ({exc}): `pip install 'sa-deploy[trt]'` (wheels from NVIDIA's "
            "index; on Jetson use JetPack's tensorrt); the ONNX graphs run without it (--runtime onnx)"
        ) from None
    return tensorrt


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


@cache
def trt_logger():
    trt = import_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def engine_record(device: torch.device) -> dict:
    """What an engine is tied to: the GPU model, its compute capability, the TensorRT version."""
    trt = import_tensorrt()
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
            "tensorrt": trt.__version__}


def engine_mismatch(record: dict, device: torch.device) -> str:
    """Why an engine built under ``record`` cannot run here ('' when it can)."""
    here = engine_record(device)
    keys = ("tensorrt", "compute_capability", "gpu")
    return "; ".join(f"{k} {record.get(k)} ≠ {here[k]} here" for k in keys if record.get(k) != here[k])


class TrtRunner(Runner):
    """Runs a serialized TensorRT engine (``.plan``) built by :mod:`export.tensorrt`."""

    name = "tensorrt"

    def __init__(self, plan: Path, spec: ModelSpec, graph: GraphIO = MODEL_GRAPH,
                 device: torch.device | str = "cuda", record: dict | None = None):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise DeviceError(f"TensorRT engines run on CUDA devices; got {device} "
                              f"(torch sees {'a' if torch.cuda.is_available() else 'no'} GPU)")
        super().__init__(spec, graph, device)
        self.plan, self.record = Path(plan), record

    def activate_impl(self) -> None:
        trt = import_tensorrt()
        if self.record is not None and (why := engine_mismatch(self.record, self.device)):
            raise ArtifactError(f"{self.plan}: built for another machine ({why}); {REBUILD}")
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(trt_logger())
            self.engine = runtime.deserialize_cuda_engine(self.plan.read_bytes())
            if self.engine is None:
                raise ArtifactError(f"{self.plan}: TensorRT {trt.__version__} cannot load this engine "
                                    f"(another TensorRT version or GPU?); {REBUILD}")
            self.context = self.engine.create_execution_context()
        self._runtime = runtime
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [self.graph.input] or sorted(outputs) != sorted(self.graph.output_names):
            raise ArtifactError(f"{self.plan}: engine has inputs {inputs} and outputs {outputs}, not "
                                f"the {self.graph.name} graph's; {REBUILD}")
        largest = tuple(self.engine.get_tensor_profile_shape(self.graph.input, 0)[2])  # min, opt, max
        self.max_batch = int(largest[0])
        self.pads_channels = self.spec.fewer_channels_ok and largest[1] == self.spec.nchan
        self._stream = torch.cuda.Stream(self.device)

    def deactivate_impl(self) -> None:
        del self.context, self.engine, self._runtime

    def run_impl(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[0] > self.max_batch:  # the profile's limit: run in slices
            parts = [self.run_impl(x[i : i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)]
            return {n: torch.cat([p[n] for p in parts]) for n in self.graph.output_names}
        outputs = {n: torch.empty(s, device=self.device)
                   for n, s in self.graph.output_shapes(tuple(x.shape)).items()}
        self.context.set_input_shape(self.graph.input, tuple(x.shape))
        self.context.set_tensor_address(self.graph.input, x.data_ptr())
        for n, y in outputs.items():
            self.context.set_tensor_address(n, y.data_ptr())
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"{self.plan}: TensorRT execution failed (see its log)")
        current.wait_stream(self._stream)
        return outputs

    def serialize(self) -> bytes:
        """The live engine as a plan (after a refit: with the new weights)."""
        return bytes(self.engine.serialize())

    def update_weights_impl(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Refit every refittable weight of the live engine from ``weights`` (names are the ONNX
        initializer names, i.e. the graph module's ``state_dict`` names)."""
        trt = import_tensorrt()
        refitter = trt.Refitter(self.engine, trt_logger())
        names = list(refitter.get_all_weights())
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"{self.plan}: no new value for {len(missing)} refittable weights, e.g. "
                             f"{', '.join(missing[:5])}")
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.BF16: torch.bfloat16}
        keep = []  # host copies TensorRT reads during refit_cuda_engine
        for n in names:
            prototype = refitter.get_weights_prototype(n)  # the engine's dtype and element count
            value = weights[n].detach().to("cpu", dtypes[prototype.dtype]).contiguous()
            if value.numel() != prototype.size:
                raise ValueError(f"{self.plan}: weight {n} has {value.numel()} values, the engine "
                                 f"{prototype.size}")
            keep.append(value)
            refitter.set_named_weights(n, trt.Weights(prototype.dtype, value.data_ptr(), value.numel()))
        if refitter.get_missing_weights():
            raise RuntimeError(f"{self.plan}: refit left weights unset: {refitter.get_missing_weights()}")
        with torch.cuda.device(self.device):
            if not refitter.refit_cuda_engine():
                raise RuntimeError(f"{self.plan}: TensorRT refit failed (see its log)")
