"""``sa-deploy export``: a model (weights file, name or adaptation run) → an export directory.

The directory holds ``model.pt`` (the weights the graphs came from, in the family's cellpose
format, so ``--runtime torch`` and ``adapt`` accept the directory too), ``model.onnx``,
``teacher_tta.onnx``, with ``--trt`` ``model.plan`` and ``teacher_tta.plan``, a TensorRT timing
cache, and ``manifest.json``. Every artefact is validated against torch before it is kept; the
directory is assembled under a temporary name and renamed into place, so an interrupted or failed
export leaves nothing that looks finished.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from selfadapt_deploy.errors import DeviceError, SaDeployError
from selfadapt_deploy.io.normalize import normalize_image
from selfadapt_deploy.io.writers import atomic_dir, check_new_dir
from selfadapt_deploy.manifest import MANIFEST, Artifact, Manifest, artifact_file, sha256_file
from selfadapt_deploy.models import load_model
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.runtime.base import MODEL_GRAPH, TEACHER_GRAPH, GraphIO
from selfadapt_deploy.runtime.graphs import check_precision
from selfadapt_deploy.runtime.ort_runner import OrtRunner
from selfadapt_deploy.segment import prepare_image, rescale_factor
from selfadapt_deploy.synthetic import random_labels, render

from .onnx_export import (
    Validation,
    export_onnx,
    opset_for,
    structure_sha256,
    validate_runner,
    validation_batches,
)

WEIGHTS_FILE = "model.pt"
NORMALIZATION = {"method": "percentile per channel", "lower": 1.0, "upper": 99.0,
                 "flat_channel": "0 when p99 - p1 <= 1e-3", "as": "cellpose.transforms.normalize_img"}


def tool_versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    ort = version("onnxruntime-gpu") or version("onnxruntime")
    return {"sa_deploy": version("sa-deploy"), "torch": torch.__version__, "onnx": version("onnx"),
            "onnxruntime": ort, "cellpose": version("cellpose"), "tensorrt": version("tensorrt")}


def validation_images(net: SegmentationNet, images: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """Normalised C×Y×X images at the network's scale to validate on: the user's (already with the
    network's channels), else generated cells of the network's mean diameter."""
    if images:
        rescale = rescale_factor(net.spec, None)
        return [prepare_image(img, rescale) for img in images]
    side = 2 * net.tile_size
    radius = (0.35 * net.diam_mean, 0.55 * net.diam_mean)
    labels = random_labels((side, side), int(side**2 / (3 * net.diam_mean**2)), radius, seed=0)
    gray = normalize_image(render(labels, seed=0)[None])[0]
    channels = [gray, 0.5 * gray, np.zeros_like(gray)][: net.nchan]
    return [np.stack(channels).astype(np.float32)]


def export_model(model: str, out: Path, precision: str = "fp32", opset: int | None = None,
                 max_batch: int = 8, trt: bool = False, device: str = "cuda",
                 images: Sequence[np.ndarray] = (), report: Callable[[str], None] = print,
                 engines_from: Path | None = None) -> Manifest:
    """Export ``model`` into the new directory ``out``; returns its manifest. With ``trt``, the
    engines of ``engines_from`` (an earlier export of the same graphs, built on this machine) are
    refit with the new weights instead of being built again."""
    check_precision(precision)
    opset = opset_for(precision, opset)
    if max_batch < 1:
        raise SaDeployError("--max-batch must be ≥ 1")
    out = check_new_dir(Path(out), "--out")
    gpu = None
    if trt:  # fail before any work when the engines cannot be built here
        from selfadapt_deploy.runtime.trt_runner import import_tensorrt

        import_tensorrt()
        gpu = torch.device(device)
        if gpu.type != "cuda" or not torch.cuda.is_available():
            raise DeviceError(f"--trt builds engines for this machine's GPU, but torch sees none "
                              f"(device {device}); export without --trt here and build engines on "
                              "the GPU machine")
    net = load_model(model, "cpu")
    with atomic_dir(out, "--out") as staging:
        manifest = export_into(staging, net, str(model), precision, opset, max_batch, gpu,
                                validation_images(net, images), report, engines_from)
        (staging / MANIFEST).write_text(manifest.to_json())
    return manifest


def export_into(staging: Path, net: SegmentationNet, model: str, precision: str, opset: int,
                 max_batch: int, gpu: torch.device | None, images: list[np.ndarray],
                 report: Callable[[str], None], engines_from: Path | None,
                 graphs: Sequence[GraphIO] = (MODEL_GRAPH, TEACHER_GRAPH)) -> Manifest:
    """Write the weights, each of ``graphs`` (and its engine when ``gpu``), validated; return the
    manifest."""
    net.save(staging / WEIGHTS_FILE)
    spec = net.spec
    manifest = Manifest(family=net.family, spec=spec.to_dict(), graph_channels=net.nchan,
                        normalization=NORMALIZATION, opset=opset, precision=precision,
                        max_batch=max_batch, source={"model": model, "file": WEIGHTS_FILE,
                                                     "sha256": sha256_file(staging / WEIGHTS_FILE)},
                        versions=tool_versions())
    for graph in graphs:
        tiles = validation_batches(spec, graph, net.nchan, images)
        onnx_bytes = export_onnx(net, graph, precision, opset, manifest.core()).SerializeToString()
        validation = _validate_onnx(onnx_bytes, net, graph, precision, tiles)
        path = staging / artifact_file(graph.name, "onnx")
        path.write_bytes(onnx_bytes)
        manifest = manifest.with_artifact(Artifact(
            path.name, graph.name, "onnx", precision, sha256_file(path), validation.to_dict(),
            graph_sha256=structure_sha256(onnx_bytes)))
        report(f"{path.name}: {validation.describe()}")
        if gpu is not None:
            from .tensorrt import engine_artifact

            manifest = manifest.with_artifact(engine_artifact(
                staging, net, graph, precision, opset, max_batch, gpu, onnx_bytes, tiles, report,
                engines_from))
    return manifest


def _validate_onnx(onnx_bytes: bytes, net: SegmentationNet, graph: GraphIO, precision: str,
                   tiles: list[torch.Tensor]) -> Validation:
    """onnxruntime against torch: fp32 graphs on the CPU provider; fp16/bf16 graphs on the CUDA
    provider when this machine has one (its kernels are the ones a GPU deployment runs), else the
    CPU provider. Only a reduced-precision graph for which the provider has no kernels
    (onnxruntime's NOT_IMPLEMENTED: bfloat16 on the CPU) is recorded as not validated, with the
    reason (console and manifest) — TensorRT validates its engine; any other failure fails the export.
    **The CUDA path is written, not run**: these machines' GPU session has no onnxruntime-gpu."""
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    gpu = (precision != "fp32" and torch.cuda.is_available()
           and "CUDAExecutionProvider" in ort.get_available_providers())
    runner = OrtRunner(onnx_bytes, net.spec, graph, "cuda" if gpu else "cpu")
    try:
        runner.activate()
    except OrtNotImplemented as exc:
        if precision == "fp32":
            raise
        provider = "CUDA" if gpu else "CPU"
        return Validation("skipped", reason=f"onnxruntime's {provider} provider cannot run this "
                                            f"{precision} graph ({str(exc).splitlines()[0][:200]})")
    try:
        return validate_runner(runner, net, graph, precision, tiles, artifact_file(graph.name, "onnx"))
    finally:
        runner.deactivate()
