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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.manifest import (
    Artifact,
    artifact_file,
    is_export_dir,
    read_manifest,
    sha256_file,
    verified_file,
)
from selfadapt_deploy.models.base import ModelSpec, SegmentationNet
from selfadapt_deploy.runtime.base import GraphIO
from selfadapt_deploy.runtime.graphs import graph_module
from selfadapt_deploy.runtime.trt_runner import (
    TrtRunner,
    engine_mismatch,
    engine_record,
    import_tensorrt,
    trt_logger,
    trt_major,
)

from .onnx_export import (
    ExportValidationError,
    Validation,
    export_onnx,
    structure_sha256,
    validate_runner,
)

WORKSPACE_BYTES = 4 << 30
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class EngineBuild:
    plan: bytes
    record: dict  # manifest Artifact.engine: the machine, TensorRT version, typing, profile


def needs_fp32_graph(precision: str) -> bool:
    """TensorRT 10 builds reduced precision from the float32 graph with builder flags."""
    return precision != "fp32" and trt_major(import_tensorrt()) < 11


def build_engine(onnx_bytes: bytes, graph: GraphIO, spec: ModelSpec, channels: int, precision: str,
                 max_batch: int, timing_cache: Path, device: torch.device,
                 refittable: bool = True) -> EngineBuild:
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
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if not strong and precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 means fp32 here
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
              "refittable": refittable, "max_batch": max_batch, "min_tile": smallest, "tile": t}
    return EngineBuild(bytes(plan), record)


def engine_artifact(staging: Path, net: SegmentationNet, graph: GraphIO, precision: str, opset: int,
                    max_batch: int, device: torch.device, onnx_bytes: bytes,
                    tiles: list[torch.Tensor], report: Callable[[str], None],
                    engines_from: Path | None = None) -> Artifact:
    """``<graph>.plan`` in ``staging``: refit from ``engines_from`` when its engine of this graph
    can be (same graph structure, precision and profile, built on this machine), else built;
    validated against torch either way."""
    path = staging / artifact_file(graph.name, "tensorrt")
    refit = _refit_source(engines_from, graph, precision, max_batch, onnx_bytes, device)
    if isinstance(refit, tuple):
        old_plan, record = refit
        path.write_bytes(old_plan.read_bytes())
        with TrtRunner(path, net.spec, graph, device, record) as runner:
            runner.update_weights(graph_module(net, graph).state_dict())
            path.write_bytes(runner.serialize())
        record = {**record, "refit_from": str(engines_from)}
        report(f"{path.name}: refit from {old_plan} (same graph, new weights)")
        with TrtRunner(path, net.spec, graph, device, record) as runner:
            validation = validate_runner(runner, net, graph, precision, tiles, path.name)
    else:
        if refit:
            report(f"{path.name}: building, not refitting: {refit}")
        if needs_fp32_graph(precision):  # TensorRT 10: precision by builder flags on the fp32 graph
            onnx_bytes = export_onnx(net, graph, "fp32", opset).SerializeToString()
        validation, record = _build_validated(path, onnx_bytes, net, graph, precision, max_batch,
                                              device, tiles, report)
    report(f"{path.name}: {validation.describe()}")
    return Artifact(path.name, graph.name, "tensorrt", precision, sha256_file(path),
                    validation.to_dict(), record)


def _build_validated(path: Path, onnx_bytes: bytes, net: SegmentationNet, graph: GraphIO,
                     precision: str, max_batch: int, device: torch.device, tiles: list[torch.Tensor],
                     report: Callable[[str], None]) -> tuple[Validation, dict]:
    """Build a refittable engine and validate it; if it disagrees with torch, build a
    non-refittable one (TensorRT 11.3: "Enabling BuilderFlag::kREFIT may produce incorrect
    numerical output ... A GEMM bias can be dropped"), say so, and validate that."""
    for refittable in (True, False):
        report(f"building {path.name} with TensorRT (minutes) ...")
        build = build_engine(onnx_bytes, graph, net.spec, net.nchan, precision, max_batch,
                             path.parent / TIMING_CACHE, device, refittable)
        path.write_bytes(build.plan)
        with TrtRunner(path, net.spec, graph, device, build.record) as runner:
            try:
                return validate_runner(runner, net, graph, precision, tiles, path.name), build.record
            except ExportValidationError as exc:
                if not refittable:
                    raise
                report(f"{path.name}: the refittable engine disagrees with torch ({exc}); "
                       "building it without REFIT (refit and --engines-from will not apply to it)")
    raise AssertionError("unreachable")


def _refit_source(old: Path | None, graph: GraphIO, precision: str, max_batch: int, onnx_bytes: bytes,
                  device: torch.device) -> tuple[Path, dict] | str:
    """(old plan, its record) when it can be refit into this export, else why not ('' when no
    ``old`` was given)."""
    if old is None:
        return ""
    if not is_export_dir(old):
        return f"{old} is not an export directory"
    manifest = read_manifest(old)
    engine, graph_onnx = manifest.artifact(graph.name, "tensorrt"), manifest.artifact(graph.name, "onnx")
    if engine is None or graph_onnx is None:
        return f"{old} has no engine of the {graph.name} graph"
    if graph_onnx.graph_sha256 != structure_sha256(onnx_bytes) or manifest.precision != precision:
        return f"{old}'s {graph.name} graph differs in structure or precision"
    if not engine.engine.get("refittable") or engine.engine.get("max_batch") != max_batch:
        return f"{old}'s {engine.file} is not refittable or has another batch profile"
    if why := engine_mismatch(engine.engine, device):
        return f"{old}'s {engine.file} was built for another machine ({why})"
    return verified_file(old, engine.file, engine.sha256), dict(engine.engine)
