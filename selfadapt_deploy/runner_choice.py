"""``--model`` + ``--runtime`` → a runner, and a line saying which one and why.

An export directory (``sa-deploy export``) runs in any runtime: ``torch`` (its ``model.pt``),
``onnx`` (its graphs, onnxruntime), ``tensorrt`` (its engines) or ``auto``: TensorRT when an
engine matches this GPU and TensorRT version, else onnxruntime. A weights file, Cellpose name or
adaptation run runs in torch on a GPU; on the CPU ``auto`` takes its family's ``cpu_runtime``:
for ``onnx`` the model is exported once into the graph cache (``export.graph_cache``) and run by
onnxruntime — unless the job is too small for the one-time export to pay off
(:data:`EXPORT_PAYS_OFF_MPX`); ``--runtime onnx`` exports it whatever the size. Every artefact is
checked against its manifest's sha256 before use; an explicit choice that cannot run here is an
error, never a quiet substitute.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from selfadapt_deploy.errors import ArtifactError, SaDeployError
from selfadapt_deploy.manifest import Manifest, is_export_dir, open_export_dir, verified_file
from selfadapt_deploy.models import load_model
from selfadapt_deploy.models.base import ModelSpec, SegmentationNet
from selfadapt_deploy.runtime.base import MODEL_GRAPH, GraphIO, Runner
from selfadapt_deploy.runtime.graphs import check_precision
from selfadapt_deploy.runtime.ort_runner import OrtRunner
from selfadapt_deploy.runtime.torch_runner import TorchRunner

RUNTIMES = ("auto", "torch", "onnx", "tensorrt")
ONNX_PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
#: ``auto`` exports a model not yet in the graph cache when the job holds at least this many
#: megapixels at the network's scale. Measured for the real Cellpose 3 net on 2 cores: the export
#: takes ~15-20 s and onnxruntime saves ~6-8 s per megapixel over torch, so the export is repaid
#: within the job from ~2.5 Mpx (two or three 1024² images at the model's own diameter)
EXPORT_PAYS_OFF_MPX = 2.0


def open_runner(model: str | Path, runtime: str = "auto", device: torch.device | str = "cpu",
                precision: str | None = None, graph: GraphIO = MODEL_GRAPH,
                onnx_provider: str = "auto", job_mpx: Callable[[ModelSpec], float] | None = None,
                report: Callable[[str], None] | None = None, **torch_options) -> tuple[Runner, str]:
    """An inactive runner for ``model`` on ``device`` and a one-line description of the choice
    ("<family> (diam_mean …, tile …); runtime: <runner> on <device>; <why>").

    ``job_mpx(spec)``: the megapixels the job runs the network on (None: unknown, taken as large —
    a server, the Python API); ``report`` is told when a graph is exported into the cache.

    ``precision`` None/``auto``: bf16 on CUDA and fp32 on the CPU for torch, the export's own
    for onnx / tensorrt. ``torch_options`` (``compile``, ``attention``, ``compile_cache``) go to
    :class:`TorchRunner`; asking for compilation of another runtime is an error."""
    device = torch.device(device)
    precision = None if precision == "auto" else precision
    torch_options = {k: v for k, v in torch_options.items() if v is not None}
    runner, family, how = _open(model, runtime, device, precision, graph, onnx_provider, torch_options,
                                job_mpx, report)
    s = runner.spec
    return runner, f"{family} (diam_mean {s.diam_mean:g}, tile {s.tile_size}); runtime: {how}"


def _open(model: str | Path, runtime: str, device: torch.device, precision: str | None, graph: GraphIO,
          onnx_provider: str, torch_options: dict, job_mpx: Callable[[ModelSpec], float] | None,
          report: Callable[[str], None] | None) -> tuple[Runner, str, str]:
    if runtime not in RUNTIMES:
        raise SaDeployError(f"--runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    if precision is not None:
        check_precision(precision)
    if onnx_provider not in ONNX_PROVIDERS:
        raise SaDeployError(f"--onnx-provider must be one of {', '.join(ONNX_PROVIDERS)}, got "
                            f"'{onnx_provider}'")
    path = Path(model)
    cached = ""
    if not is_export_dir(path):
        if runtime == "tensorrt":
            raise SaDeployError(f"--runtime tensorrt runs an export directory's engines, and {model} "
                                f"is not one; create it with `sa-deploy export {model} --out DIR --trt`")
        net = load_model(model, "cpu")
        onnx, why, where = _plain_weights_in_onnx(net, graph, runtime, device, precision, torch_options,
                                                 job_mpx)
        if not onnx:
            runner = TorchRunner(net.to(device), device, precision, graph, **torch_options)
            return runner, net.family, f"{runner.name} on {device}" + (f"; {why}" if why else "")
        from selfadapt_deploy.export.graph_cache import cached_graph
        from selfadapt_deploy.export.onnx_export import ExportValidationError

        try:
            entry = cached_graph(net, str(model), graph, precision or "fp32", report=report, where=where)
        except ExportValidationError as exc:
            if runtime == "onnx":  # asked for: the disagreement is the answer
                raise
            runner = TorchRunner(net.to(device), device, precision, graph, **torch_options)
            first = str(exc).splitlines()[0]
            return runner, net.family, (f"{runner.name} on {device}; auto: its ONNX graph did not pass "
                                        f"validation ({first}), so torch runs it")
        path, runtime = entry.path, "onnx"
        cached = (f"{why}; exported once into the graph cache ({entry.seconds:.0f} s)" if entry.made
                  else f"{why}; cached graph {entry.path}")
    manifest = open_export_dir(path)  # every listed file checked, whichever runtime then reads which
    if runtime == "torch":
        runner = TorchRunner(load_model(path, device), device, precision, graph, **torch_options)
        return runner, manifest.family, f"{runner.name} on {device} ({manifest.source['file']})"
    if torch_options.get("compile"):
        raise SaDeployError("--compile compiles the torch runtime; onnxruntime and TensorRT optimise "
                            "their graphs themselves (use --runtime torch to compile)")
    if precision not in (None, manifest.precision):
        raise SaDeployError(f"{path} holds {manifest.precision} graphs, not {precision}; re-export "
                            f"with --precision {precision} or use --runtime torch")
    spec = ModelSpec(**manifest.spec)
    if runtime == "auto":
        engine_ok, why = _engine_usable(path, manifest, graph, device)
        runtime = "tensorrt" if engine_ok else "onnx"
        reason = f"auto: {why}"
    else:
        reason = cached or f"--runtime {runtime}"
    if runtime == "tensorrt":
        from selfadapt_deploy.runtime.trt_runner import TrtRunner

        artifact = _artifact(path, manifest, graph, "tensorrt")
        runner = TrtRunner(verified_file(path, artifact.file, artifact.sha256), spec, graph, device,
                           artifact.engine)
    else:
        artifact = _artifact(path, manifest, graph, "onnx")
        provider = onnx_provider if onnx_provider != "auto" else ("cpu" if device.type == "cpu" else "cuda")
        runner = OrtRunner(verified_file(path, artifact.file, artifact.sha256), spec, graph, device,
                           provider)
    how = f"{runner.name} ({artifact.file}, {artifact.precision}) on {device}; {reason}"
    return runner, manifest.family, how


def _plain_weights_in_onnx(net: SegmentationNet, graph: GraphIO, runtime: str, device: torch.device,
                           precision: str | None, torch_options: dict,
                           job_mpx: Callable[[ModelSpec], float] | None):
    """Whether a plain weights file runs in onnxruntime through the graph cache, why (not), and
    its cache entry's place when ``auto`` looked it up (None otherwise)."""
    if runtime == "onnx":
        return True, "--runtime onnx", None
    if runtime == "torch" or device.type != "cpu":
        return False, "", None
    if net.cpu_runtime != "onnx":
        return False, f"auto: {net.family} runs in torch on the CPU", None
    if precision not in (None, "fp32") or torch_options.get("compile") or \
            torch_options.get("attention", "auto") != "auto":
        return False, "auto: torch options were given", None
    from selfadapt_deploy.export.graph_cache import graph_entry

    where = graph_entry(net, graph, "fp32")
    faster = "auto: onnxruntime is faster on the CPU"
    if where.path.is_dir():
        return True, faster, where
    mpx = job_mpx(net.spec) if job_mpx is not None else None
    if mpx is not None and mpx < EXPORT_PAYS_OFF_MPX:
        return False, (f"auto: {mpx:.1f} Mpx is below the {EXPORT_PAYS_OFF_MPX:g} Mpx at which "
                       "the one-time ONNX export pays off (--runtime onnx exports it now; later "
                       "runs then use the cached graph)"), None
    return True, faster, where


def _artifact(path: Path, manifest: Manifest, graph: GraphIO, fmt: str):
    artifact = manifest.artifact(graph.name, fmt)
    if artifact is None:
        hint = " --trt" if fmt == "tensorrt" else ""
        raise ArtifactError(f"{path} has no {fmt} artefact of the {graph.name} graph; re-run "
                            f"`sa-deploy export MODEL --out DIR{hint}`")
    return artifact


def _engine_usable(path: Path, manifest: Manifest, graph: GraphIO, device: torch.device) -> tuple[bool, str]:
    """Whether ``auto`` takes the TensorRT engine, and why (not)."""
    artifact = manifest.artifact(graph.name, "tensorrt")
    if artifact is None:
        return False, f"no TensorRT engine in {path}"
    if device.type != "cuda":
        return False, f"TensorRT engines need a GPU; device is {device}"
    try:
        from selfadapt_deploy.runtime.trt_runner import engine_mismatch, import_tensorrt

        import_tensorrt()
    except SaDeployError:
        return False, "TensorRT is not installed"
    if why := engine_mismatch(artifact.engine or {}, device):
        return False, f"{artifact.file} was built for another machine ({why})"
    return True, f"{artifact.file} matches this GPU and TensorRT"
