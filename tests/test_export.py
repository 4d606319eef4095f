"""Export: ONNX graphs of both families against torch, the manifest, refusal of bad artefacts."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from selfadapt_deploy.errors import ArtifactError, OutputWriteError, SaDeployError
from selfadapt_deploy.export import onnx_export
from selfadapt_deploy.export.exporter import _validate_onnx, export_model
from selfadapt_deploy.manifest import MANIFEST, ONNX_METADATA_KEY, read_manifest
from selfadapt_deploy.models import CPnet, ModelSpec, build_cpsam, load_model
from selfadapt_deploy.models.cpdino import build_cpdino
from selfadapt_deploy.runner_choice import open_runner
from selfadapt_deploy.runtime import MODEL_GRAPH, TEACHER_GRAPH, OrtRunner, TorchRunner
from selfadapt_deploy.runtime.graphs import graph_module
from selfadapt_deploy.trainer.teacher import teacher_predict

from .helpers import randomize_batchnorm


def _net(family: str):
    if family == "cpnet":
        torch.manual_seed(0)
        return randomize_batchnorm(CPnet((2, 8, 16, 32), diam_mean=17.0)).eval()
    if family == "cpdino":
        return build_cpdino(seed=0).eval()
    return build_cpsam(seed=0).eval()


@pytest.fixture(scope="module")
def export_of(tmp_path_factory) -> Callable[[str], Path]:
    """family → export directory of a tiny network of that family, exported once per module (a
    parametrized module fixture would export again whenever pytest's test order changes family)."""
    made: dict[str, Path] = {}

    def export(family: str) -> Path:
        if family not in made:
            root = tmp_path_factory.mktemp(f"export_{family}")
            _net(family).save(root / "weights.pt")
            export_model(str(root / "weights.pt"), root / "export", report=lambda m: None)
            made[family] = root / "export"
        return made[family]

    return export


@pytest.fixture(params=["cpnet", "cpsam", "cpdino"])
def exported(request, export_of) -> tuple[str, Path]:
    """(family, export directory) of a tiny network of each family."""
    return request.param, export_of(request.param)


def _tiles(family: str, graph, batch: int, seed: int = 0) -> torch.Tensor:
    net = _net(family)
    side = net.tile_size if net.fixed_tile else 96
    return torch.from_numpy(np.random.default_rng(seed).random((batch, net.nchan, side, side),
                                                               dtype=np.float32))


@pytest.mark.parametrize("graph", [MODEL_GRAPH, TEACHER_GRAPH], ids=lambda g: g.name)
def test_onnx_graph_matches_torch(exported, graph):
    family, out = exported
    net = load_model(out)
    x = _tiles(family, graph, batch=5, seed=1)  # another batch size and tile than at export
    with OrtRunner(out / f"{graph.name}.onnx", read_spec(out), graph) as ort_runner, \
            TorchRunner(net, graph=graph) as torch_runner:
        got, want = ort_runner.run(x), torch_runner.run(x)
    for name in graph.output_names:
        assert got[name].shape == want[name].shape
        assert (got[name] - want[name]).abs().max() <= 1e-4, name
    record = read_manifest(out).artifact(graph.name, "onnx").validation
    assert record["status"] == "passed" and max(record["max_abs_diff"].values()) <= 1e-4


def read_spec(out: Path) -> ModelSpec:
    return ModelSpec(**read_manifest(out).spec)


def test_teacher_graph_is_the_trainers_teacher(exported):
    family, out = exported
    net = load_model(out)
    x = _tiles(family, TEACHER_GRAPH, batch=2, seed=2)
    with OrtRunner(out / "teacher_tta.onnx", read_spec(out), TEACHER_GRAPH) as runner:
        got = runner.run(x)
    want = teacher_predict(net, x)
    torch.testing.assert_close(got["flows"], want.flows, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["prob"][:, 0], want.prob, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["flows_std"], want.flows_std, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["prob_std"][:, 0], want.prob_std, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["cpsam", "cpdino"])
def test_vit_graphs_take_fewer_channels_as_cellpose_does(family, export_of):
    out = export_of(family)
    net = load_model(out)
    x = _tiles(family, MODEL_GRAPH, batch=2)[:, :2]  # two channels into a 3-channel graph
    with OrtRunner(out / "model.onnx", read_spec(out)) as runner:
        got = runner.infer(x)
    with torch.no_grad():
        torch.testing.assert_close(got, net(x), atol=1e-4, rtol=0)  # cellpose's own forward


def test_manifest_round_trip_and_embedded_metadata(exported):
    family, out = exported
    manifest = read_manifest(out)
    assert manifest.family == family and manifest.precision == "fp32" and manifest.opset == 18
    assert {(a.file, a.graph, a.format) for a in manifest.artifacts} == {
        ("model.onnx", "model", "onnx"), ("teacher_tta.onnx", "teacher_tta", "onnx")}
    assert manifest.from_json(manifest.to_json(), "x") == manifest
    embedded = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(embedded[ONNX_METADATA_KEY]) == json.loads(json.dumps(manifest.core()))
    names = [i.name for i in onnx.load(str(out / "model.onnx")).graph.initializer]
    state = graph_module(load_model(out)).state_dict()
    assert names and all(n in state for n in names)  # weights addressable by their torch names


def test_export_forward_is_the_networks_forward():
    """The traced forward (pixel-shuffle read-out, named weights) equals cellpose's CPSAM.forward
    exactly; a read-out W2 that is not the identity keeps the transposed convolution."""
    net = build_cpsam(seed=3).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net.export_forward(x), net(x))
        assert torch.equal(net.export_forward(x[:, :1]), net(x[:, :1]))
        net.net.W2.mul_(0.5)
        other = type(net)(net.net)
        assert not other.w2_is_identity
        torch.testing.assert_close(other.export_forward(x), net(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_graphs(tmp_path, precision):
    net = _net("cpnet")
    model = onnx_export.export_onnx(net, MODEL_GRAPH, precision)
    onnx.checker.check_model(model, full_check=True)  # valid ONNX: bf16 only where ONNX allows it
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    x = _tiles("cpnet", MODEL_GRAPH, batch=2)
    validation = _validate_onnx(model.SerializeToString(), net, MODEL_GRAPH, precision, [x])
    if precision == "fp16":  # validated against torch in fp16; its distance to fp32 is recorded
        assert validation.status == "passed" and validation.max_abs_diff_fp32["flows_cellprob"] > 0
    else:  # onnxruntime has no bf16 CPU kernels: recorded as not validated, with the reason
        assert validation.status == "skipped" and "CPU provider cannot run" in validation.reason


def test_bf16_cpsam_attention_runs_as_fp32_island():
    model = onnx_export.export_onnx(_net("cpsam"), MODEL_GRAPH, "bf16")
    assert model.opset_import[0].version >= onnx_export.BF16_OPSET
    einsums = [n for n in model.graph.node if n.op_type == "Einsum"]
    assert einsums and all("__fp32_for_" in i for n in einsums for i in n.input)


def test_tampered_or_missing_artefacts_are_refused(exported, tmp_path):
    import shutil

    _, out = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "model.onnx", "r+b") as f:  # one byte changed
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    for runtime in ("onnx", "torch"):  # a directory is used whole or not at all
        with pytest.raises(ArtifactError, match=r"model.onnx: sha256 .* differs"):
            open_runner(copy, runtime)
    with pytest.raises(ArtifactError, match=r"model.onnx: sha256 .* differs"):
        load_model(copy)
    moved = tmp_path / "manifest.json"
    shutil.move(copy / MANIFEST, moved)  # no manifest: its artefacts cannot be checked, so refused
    with pytest.raises(ArtifactError, match=r"export artefacts \(model.onnx, teacher_tta.onnx\) but no"):
        open_runner(copy, "torch")
    shutil.move(moved, copy / MANIFEST)
    (copy / "model.pt").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_model(copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "colour": "blue"}))
    with pytest.raises(ArtifactError, match=r"unknown keys \['colour'\]"):
        read_manifest(copy)
    (copy / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="newer sa-deploy"):
        read_manifest(copy)


def test_tensorrt_runtime_needs_an_engine(exported):
    _, out = exported
    with pytest.raises(ArtifactError, match="no tensorrt artefact"):
        open_runner(out, "tensorrt", "cuda" if torch.cuda.is_available() else "cpu")


def test_export_refuses_existing_output_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    _net("cpnet").save(tmp_path / "w.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(OutputWriteError, match="not an empty directory"):
        export_model(str(tmp_path / "w.pt"), tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    monkeypatch.setitem(onnx_export.ATOL, "fp32", 0.0)  # any difference now fails validation
    with pytest.raises(onnx_export.ExportValidationError, match="disagrees with torch"):
        export_model(str(tmp_path / "w.pt"), tmp_path / "new", report=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "w.pt"]  # no partial directory


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_trt_export_without_tensorrt_fails_before_any_work(tmp_path):
    _net("cpnet").save(tmp_path / "w.pt")
    with pytest.raises(SaDeployError, match="TensorRT is not installed"):
        export_model(str(tmp_path / "w.pt"), tmp_path / "e", trt=True)
    assert not (tmp_path / "e").exists()
