"""``export --triton-repo``: a Triton model repository whose configs Triton's own protobuf parses and
whose tensor names, dims and batch match the graph they describe."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from selfadapt_deploy.cli import app
from selfadapt_deploy.errors import ArtifactError, OutputWriteError
from selfadapt_deploy.export.triton_repo import model_config, parse_model_config, write_triton_repo
from selfadapt_deploy.manifest import MANIFEST, Artifact, read_manifest, sha256_file
from selfadapt_deploy.models.base import ModelSpec
from selfadapt_deploy.runtime.base import MODEL_GRAPH

pytest.importorskip("tritonclient", reason="the dev extra installs tritonclient (its ModelConfig)")


def dims(tensor) -> list[int]:
    return list(tensor.dims)


def test_repository_matches_the_exported_graph(tmp_path, exported_cyto):
    manifest = read_manifest(exported_cyto)
    assert write_triton_repo(exported_cyto, tmp_path / "repo") == ["network"]
    model_file = tmp_path / "repo" / "network" / "1" / "model.onnx"
    assert model_file.read_bytes() == (exported_cyto / "model.onnx").read_bytes()

    config = parse_model_config((tmp_path / "repo" / "network" / "config.pbtxt").read_text(), "x")
    assert (config.name, config.platform) == ("network", "onnxruntime_onnx")
    assert config.max_batch_size == manifest.max_batch
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert len(config.instance_group) == 1 and config.instance_group[0].count == 1

    graph = onnx.load(model_file).graph
    assert [t.name for t in config.input] == [i.name for i in graph.input]
    assert [t.name for t in config.output] == [o.name for o in graph.output]
    assert dims(config.input[0]) == [manifest.graph_channels, -1, -1]
    assert dims(config.output[0]) == [3, -1, -1]
    # what a client sends under this config runs, and comes back with the config's shape
    batch, side = config.max_batch_size, 48
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(batch, dims(config.input[0])[0], side, side))
    (y,) = session.run(None, {config.input[0].name: x.astype(np.float32)})
    assert y.shape == (batch, dims(config.output[0])[0], side, side)


def test_fixed_tile_families_get_fixed_dims():
    spec = ModelSpec(nchan=3, tile_size=256, fixed_tile=True, diam_mean=30.0, default_diameter=30.0,
                     fewer_channels_ok=True)
    config = parse_model_config(model_config("network_trt", "tensorrt_plan", MODEL_GRAPH, spec, 3, 4),
                                "x")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert dims(config.input[0]) == [3, 256, 256] and dims(config.output[0]) == [3, 256, 256]


def test_an_engine_becomes_a_tensorrt_plan_model(tmp_path, exported_cyto):
    export = tmp_path / "export"
    shutil.copytree(exported_cyto, export)
    (export / "model.plan").write_bytes(b"engine bytes")  # TensorRT cannot run here: any bytes
    manifest = read_manifest(export)
    engine = Artifact("model.plan", "model", "tensorrt", "fp32", sha256_file(export / "model.plan"), {})
    manifest = dataclasses.replace(manifest, artifacts=(*manifest.artifacts, engine))
    (export / MANIFEST).write_text(manifest.to_json())
    assert write_triton_repo(export, tmp_path / "repo") == ["network", "network_trt"]
    assert (tmp_path / "repo" / "network_trt" / "1" / "model.plan").read_bytes() == b"engine bytes"
    config = parse_model_config((tmp_path / "repo" / "network_trt" / "config.pbtxt").read_text(), "x")
    assert config.platform == "tensorrt_plan"


def test_bad_repository_targets_and_artefacts_leave_nothing(tmp_path, exported_cyto):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "other").write_text("x")
    with pytest.raises(OutputWriteError, match="not an empty directory"):
        write_triton_repo(exported_cyto, taken)
    export = tmp_path / "export"
    shutil.copytree(exported_cyto, export)
    (export / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ArtifactError):
        write_triton_repo(export, tmp_path / "repo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "taken"]
    with pytest.raises(ArtifactError, match="not a valid Triton model configuration"):
        parse_model_config('name: "network"\nmax_batch: 8\n', "config.pbtxt")


@pytest.mark.slow
def test_export_cli_writes_the_repository(tmp_path, trained_cpnet_path):
    result = CliRunner().invoke(app, ["export", str(trained_cpnet_path), "--out", str(tmp_path / "exp"),
                                      "--triton-repo", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    assert "Triton model repository" in result.output
    assert (tmp_path / "repo" / "network" / "config.pbtxt").is_file()
    again = CliRunner().invoke(app, ["export", str(trained_cpnet_path), "--out", str(tmp_path / "exp2"),
                                     "--triton-repo", str(tmp_path / "repo")])
    assert again.exit_code == 1 and "not an empty directory" in again.output
    assert not (tmp_path / "exp2").exists()  # refused before any work
