"""ONNX → TensorRT engine (the ``trt`` extra), for both TensorRT generations users have.

* **TensorRT 10** (JetPack 6 ships 10.3): weakly typed networks; reduced precision through the
  builder flags (``BuilderFlag.FP16`` / ``BF16``) on the float32 graph, TensorRT choosing per layer.
* **TensorRT 11**: weak typing is gone; the network is strongly typed and its precision is the
  graph's (the exporter casts in torch, fp32 in and out, bf16 ops ONNX lacks as fp32 islands).

Every engine has one optimisation profile over the batch (1 … ``max_batch``; CPnet's tile may also
shrink to 16 pixels), a timing cache beside it, and is refittable: ``BuilderFlag.REFIT``, because
the adaptation loop pushes new teacher weights into a live engine (``REFIT_IDENTICAL`` is only for
the build's own weights). TensorRT 11.3 documents that ``REFIT`` can drop a GEMM bias; every
engine is therefore validated against torch right after its build, and refit engines are tested
against non-refit ones (``tests/test_tensorrt.py``) where TensorRT exists.

Not executed on the development machines or in CI: TensorRT is not installable there (its
libraries are not on the package index) and no lent GPU has it. Written against the documented
Python API of 10.x and 11.x; see the README's "Not verified here".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.runtime.base import GraphIO, ModelSpec
from selfadapt_deploy.runtime.trt_runner import engine_record, import_tensorrt, trt_logger, trt_major

WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class EngineBuild:
    plan: bytes
    record: dict  # manifest Artifact.engine: the machine, TensorRT version, typing, profile


def needs_fp32_graph(precision: str) -> bool:
    """TensorRT 10 builds reduced precision from the float32 graph with builder flags."""
    return precision != "fp32" and trt_major(import_tensorrt()) < 11


def build_engine(onnx_bytes: bytes, graph: GraphIO, spec: ModelSpec, channels: int, precision: str,
                 max_batch: int, timing_cache: Path, device: torch.device) -> EngineBuild:
    """Serialized engine of an ONNX graph (the float32 graph on TensorRT 10 when ``precision`` is
    reduced, the graph at ``precision`` on TensorRT 11)."""
    trt = import_tensorrt()
    major = trt_major(trt)
    logger = trt_logger()
    builder = trt.Builder(logger)
    strong = major >= 11
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SaDeployError(f"TensorRT {trt.__version__} cannot parse the {graph.name} graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.set_flag(trt.BuilderFlag.REFIT)
    if not strong and precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    t = spec.tile_size
    smallest = t if spec.fixed_tile else 16
    profile = builder.create_optimization_profile()
    profile.set_shape(graph.input, (1, channels, smallest, smallest), (max_batch, channels, t, t),
                      (max_batch, channels, t, t))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SaDeployError(f"TensorRT {trt.__version__} could not build the {graph.name} engine "
                            "(see its log above)")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    record = {**engine_record(device), "typing": "strong" if strong else "weak",
              "refittable": True, "max_batch": max_batch, "min_tile": smallest, "tile": t}
    return EngineBuild(bytes(plan), record)
