"""An export directory as a Triton Inference Server model repository (``export --triton-repo``).

The network graph becomes model ``network`` (platform ``onnxruntime_onnx``) and, when the export
holds a TensorRT engine of it, ``network_trt`` (``tensorrt_plan``): ``<repo>/<model>/1/model.*``
plus a ``config.pbtxt`` with the graph's input/output names and dims (``-1`` where a tile side is
free), the manifest's max batch, dynamic batching and one instance (Triton puts it on a GPU when
there is one). Drop the folder into a server's ``--model-repository``; clients send float32
B×C×H×W tiles normalised as the manifest says and get B×3×H×W (dY, dX, cell-probability logit).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

from selfadapt_deploy.errors import ArtifactError
from selfadapt_deploy.io.writers import atomic_dir
from selfadapt_deploy.manifest import Manifest, read_manifest, verified_file
from selfadapt_deploy.models.base import ModelSpec
from selfadapt_deploy.runtime.base import MODEL_GRAPH, GraphIO

#: Triton model name and file per artefact format
TRITON_MODELS = {"onnx": ("network", "onnxruntime_onnx", "model.onnx"),
                 "tensorrt": ("network_trt", "tensorrt_plan", "model.plan")}
SPEC_PARAMETER = "sa_deploy_spec"  # the model's ModelSpec as JSON, for clients that tile locally
QUEUE_DELAY_US = 100  # dynamic batching: how long a request may wait for others to join its batch


def spec_parameter(spec: ModelSpec) -> str:
    """The ``parameters`` entry that describes the model (read by ``segment --triton``)."""
    value = json.dumps(json.dumps(spec.to_dict()))  # a JSON object as a protobuf text string
    return f'parameters: {{ key: "{SPEC_PARAMETER}" value: {{ string_value: {value} }} }}\n'


def model_config(name: str, platform: str, graph: GraphIO, spec: ModelSpec, channels: int,
                 max_batch: int, *, backend: str | None = None, instance: str = "count: 1",
                 extra: str = "") -> str:
    """``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``) for one graph:
    ``platform`` (onnxruntime_onnx, tensorrt_plan) or, with ``backend``, a backend model such as
    ``sa-deploy serve``'s Python one; ``instance`` and ``extra`` lines are the caller's."""
    side = spec.tile_size if spec.fixed_tile else -1

    def tensor(tensor_name: str, k: int) -> str:
        return (f'  {{\n    name: "{tensor_name}"\n    data_type: TYPE_FP32\n'
                f"    dims: [ {k}, {side}, {side} ]\n  }}")

    outputs = ",\n".join(tensor(n, k) for n, k in graph.outputs)
    runs = f'backend: "{backend}"' if backend else f'platform: "{platform}"'
    return (f'name: "{name}"\n{runs}\nmax_batch_size: {max_batch}\n'
            f"input [\n{tensor(graph.input, channels)}\n]\noutput [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}\n"
            f"instance_group [\n  {{\n    {instance}\n  }}\n]\n" + spec_parameter(spec) + extra)


def _model_config_proto() -> ModuleType | None:
    """tritonclient's generated ``model_config_pb2``, loaded from its file: the ``grpc`` subpackage
    that holds it imports grpc, which parsing does not need. None without tritonclient."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_model_config(text: str, where: str):
    """``text`` parsed into tritonclient's ``ModelConfig`` message (what the server parses);
    None when tritonclient is not installed. A field the server would reject is an error."""
    from google.protobuf import text_format

    proto = _model_config_proto()
    if proto is None:
        return None
    try:
        return text_format.Parse(text, proto.ModelConfig())
    except text_format.ParseError as exc:
        raise ArtifactError(f"{where}: not a valid Triton model configuration ({exc})") from None


def write_triton_repo(export_dir: Path, repo: Path, max_batch: int | None = None) -> list[str]:
    """Write ``repo`` (new, or an empty directory) from the export in ``export_dir``, atomically;
    returns the model names. Every artefact is checked against the manifest first."""
    manifest: Manifest = read_manifest(export_dir)
    spec = ModelSpec(**manifest.spec)
    chosen = [a for a in manifest.artifacts if a.graph == MODEL_GRAPH.name and a.format in TRITON_MODELS]
    names = []
    with atomic_dir(Path(repo), "--triton-repo") as staging:
        for artifact in chosen:
            name, platform, file = TRITON_MODELS[artifact.format]
            source = verified_file(export_dir, artifact.file, artifact.sha256)
            (staging / name / "1").mkdir(parents=True)
            shutil.copy2(source, staging / name / "1" / file)
            text = model_config(name, platform, MODEL_GRAPH, spec, manifest.graph_channels,
                                max_batch or manifest.max_batch)
            parse_model_config(text, f"{Path(repo) / name / 'config.pbtxt'}")
            (staging / name / "config.pbtxt").write_text(text)
            names.append(name)
    return names
