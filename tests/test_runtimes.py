"""Runners behind one contract (torch, onnxruntime; TensorRT where it exists) and segmentation
through an export directory: the same masks in every runtime."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from selfadapt_deploy.cli import app
from selfadapt_deploy.errors import DeviceError
from selfadapt_deploy.metrics import average_precision
from selfadapt_deploy.models import load_model
from selfadapt_deploy.runner_choice import open_runner
from selfadapt_deploy.runtime import MODEL_GRAPH, TEACHER_GRAPH, OrtRunner, TorchRunner
from selfadapt_deploy.runtime.graphs import graph_module
from selfadapt_deploy.synthetic import random_labels, render

cli = CliRunner()


def runners(export_dir, graph=MODEL_GRAPH):
    """Every runner this machine can build for the export, as (name, inactive runner)."""
    out = [("torch", open_runner(export_dir, "torch", "cpu", graph=graph)[0]),
           ("onnx", open_runner(export_dir, "onnx", "cpu", graph=graph)[0])]
    if torch.cuda.is_available():
        out.append(("onnx-cuda", open_runner(export_dir, "onnx", "cuda", graph=graph)[0]))
    return out


class StandInTritonClient:
    """A Triton server's ``network`` model as sa-deploy writes it (its config carries the model
    spec), answered by onnxruntime on the exported graph instead of over HTTP."""

    def __init__(self, export_dir):
        import json

        from selfadapt_deploy.export.triton_repo import SPEC_PARAMETER

        self.runner = open_runner(export_dir, "onnx", "cpu")[0]
        self.runner.activate()
        spec = json.dumps(self.runner.spec.to_dict())
        self.config_ = {"max_batch_size": 2, "parameters": {SPEC_PARAMETER: {"string_value": spec}}}

    def config(self, model):
        return self.config_

    def infer(self, model, inputs, outputs):
        (tiles,) = inputs.values()
        assert len(tiles) <= self.config_["max_batch_size"]  # the runner splits at the server's max
        return {outputs[0]: self.runner.infer(torch.from_numpy(tiles)).numpy()}

    def close(self):
        self.runner.deactivate()


def contract_runner(which, export_dir, monkeypatch):
    """The runner ``which`` for the contract test: real backends, Triton against a stand-in server."""
    if which == "triton":
        import selfadapt_deploy.serving.triton_runner as triton_runner

        monkeypatch.setattr(triton_runner, "TritonHTTPClient", lambda url: StandInTritonClient(export_dir))
        return triton_runner.TritonRunner("http://stand-in:8000")
    if which == "tensorrt":
        pytest.importorskip("tensorrt")
        if not torch.cuda.is_available():
            pytest.skip("TensorRT runs engines on CUDA only")
        return open_runner(export_dir, "tensorrt", "cuda")[0]
    return dict(runners(export_dir))[which]


@pytest.mark.parametrize("which", ["torch", "onnx", "tensorrt", "triton"])
def test_runner_contract(exported_cyto, which, monkeypatch):
    runner = contract_runner(which, exported_cyto, monkeypatch)
    x = torch.rand(3, 2, 64, 96)
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer(x)
    with runner:
        assert runner.is_active
        y = runner.infer(x)
        assert y.shape == (3, 3, 64, 96) and y.dtype == torch.float32 and y.device == runner.device
        with pytest.raises(TypeError, match="unexpected dtype"):
            runner.infer(x.numpy())
        with pytest.raises(TypeError, match="unexpected dtype"):
            runner.infer(x.double())
        with pytest.raises(ValueError, match="channel count"):
            runner.infer(torch.rand(1, 3, 64, 64))
        with pytest.raises(ValueError, match="multiples of 16"):
            runner.infer(torch.rand(1, 2, 60, 64))
        with pytest.raises(RuntimeError, match="already active"):
            runner.activate()
    assert not runner.is_active


def test_teacher_graph_needs_square_tiles(exported_cyto):
    with open_runner(exported_cyto, "onnx", "cpu", graph=TEACHER_GRAPH)[0] as runner:
        with pytest.raises(ValueError, match="square tiles"):
            runner.run(torch.rand(1, 2, 64, 96))
        with pytest.raises(RuntimeError, match="needs the model graph"):
            runner.infer(torch.rand(1, 2, 64, 64))


def test_onnxruntime_refuses_a_provider_it_cannot_use(exported_cyto):
    spec = load_model(exported_cyto).spec
    with pytest.raises(DeviceError, match="does not run on device cpu"):
        OrtRunner(exported_cyto / "model.onnx", spec, provider="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="torch sees no GPU"):
            OrtRunner(exported_cyto / "model.onnx", spec, device="cuda")


@pytest.mark.parametrize("graph", [MODEL_GRAPH, TEACHER_GRAPH], ids=lambda g: g.name)
def test_onnxruntime_weight_update_follows_torch(exported_cyto, graph):
    """New weights into a live session give what torch gives with those weights."""
    net = load_model(exported_cyto)
    x = torch.rand(2, 2, 64, 64)
    with open_runner(exported_cyto, "onnx", "cpu", graph=graph)[0] as runner:
        before = runner.run(x)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        runner.update_weights(graph_module(net, graph).state_dict())
        after = runner.run(x)
        with pytest.raises(ValueError, match="no new value"):
            runner.update_weights({})
    with TorchRunner(net, graph=graph) as reference:
        want = reference.run(x)
    name = graph.output_names[0]
    assert (before[name] - want[name]).abs().max() > 1e-2  # the update changed something
    for name in graph.output_names:
        assert (after[name] - want[name]).abs().max() <= 1e-4, name


def _segment(tmp_path, image, model, runtime, *extra):
    out = tmp_path / runtime
    result = cli.invoke(app, ["segment", str(image), "--model", str(model), "--runtime", runtime,
                              "--out", str(out), "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return {p.name: tifffile.imread(p) for p in sorted(out.glob("*_masks.tif"))}


def test_segment_with_onnxruntime_gives_torchs_masks(tmp_path, exported_cyto):
    image = tmp_path / "cells.tif"
    labels = random_labels((300, 260), 70, radius=(6, 9), seed=5)
    tifffile.imwrite(image, (render(labels, seed=5) * 1000).astype(np.uint16))
    ours = _segment(tmp_path, image, exported_cyto, "onnx")["cells_masks.tif"]
    ref = _segment(tmp_path, image, exported_cyto, "torch")["cells_masks.tif"]
    assert ref.max() > 30
    assert average_precision(ref, ours).ap[0] >= 0.99
    assert average_precision(labels, ours).ap[0] > 0.5  # and they are cells, not noise


def test_segment_with_onnxruntime_on_real_images(tmp_path, exported_cyto, data_dir):
    image = data_dir / "cdp2bioactives_h15.ome.tif"
    args = ("--channels", "0", "--series", "2")
    ours, ref = (_segment(tmp_path, image, exported_cyto, rt, *args) for rt in ("onnx", "torch"))
    assert ours.keys() == ref.keys() and len(ref) == 1
    for name in ref:
        assert ref[name].max() > 50
        assert average_precision(ref[name], ours[name]).ap[0] >= 0.99


def test_auto_runtime_says_what_it_picked(tmp_path, exported_cyto):
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, (render(random_labels((96, 96), 10, seed=1), seed=1) * 900).astype(np.uint16))
    result = cli.invoke(app, ["segment", str(image), "--model", str(exported_cyto), "--out",
                              str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "runtime: onnxruntime (CPUExecutionProvider) (model.onnx, fp32) on cpu; auto: no " \
           "TensorRT engine" in result.output.replace("\n", "")


def test_runtime_tensorrt_needs_an_export_directory(tmp_path, trained_cpnet_path):
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.ones((32, 32), np.uint16))
    result = cli.invoke(app, ["segment", str(image), "--model", str(trained_cpnet_path), "--runtime",
                              "tensorrt", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 1
    assert f"create it with `sa-deploy export {trained_cpnet_path} --out DIR --trt`" in \
        result.output.replace("\n", "")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_reduced_precision_masks_agree_with_fp32(trained_cpnet_path, precision):
    """Precision cast into the graph, on CPU: masks agree with fp32 at AP@0.5 ≥ 0.99."""
    from selfadapt_deploy.segment import segment_image

    net = load_model(trained_cpnet_path)
    labels = random_labels((256, 256), 60, radius=(6, 9), seed=7)
    img = np.stack([render(labels, seed=7), np.zeros((256, 256), np.float32)])
    with TorchRunner(net) as r32, TorchRunner(net, precision=precision) as low:
        m32, mlow = segment_image(r32, img).masks, segment_image(low, img).masks
    assert m32.max() > 30
    assert average_precision(m32, mlow).ap[0] >= 0.99


# ---- GPU: onnxruntime CUDA with I/O binding, TensorRT (skip without them) --------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_onnxruntime_cuda_io_binding_matches_torch(exported_cyto):
    x = torch.rand(4, 2, 224, 224, device="cuda")
    with open_runner(exported_cyto, "onnx", "cuda")[0] as runner, \
            open_runner(exported_cyto, "torch", "cuda", "fp32")[0] as reference:
        got, want = runner.infer(x), reference.infer(x)
    assert got.device.type == "cuda"
    # cuDNN's algorithms sum in other orders than torch's, and torch's convolutions use TF32 by
    # default: relative to the output's magnitude
    assert (got - want).abs().max() <= 1e-2 * max(1.0, float(want.abs().max()))


@pytest.mark.slow
def test_pseudo_label_in_onnxruntime_equals_torch_on_real_images(tmp_path, exported_cyto, data_dir):
    image = data_dir / "cdp2bioactives_h23.ome.tif"
    outputs = {}
    for rt in ("torch", "onnx"):
        result = cli.invoke(app, ["pseudo-label", str(image), "--model", str(exported_cyto),
                                  "--runtime", rt, "--out", str(tmp_path / rt), "--device", "cpu",
                                  "--channels", "0", "--series", "3"])
        assert result.exit_code == 0, result.output
        outputs[rt] = np.load(tmp_path / rt / "cdp2bioactives_h23_pseudo.npz")
    ref, ours = outputs["torch"], outputs["onnx"]
    assert ref["flows"].shape == (2, 520, 696) and ref["mask_flows"].shape == (2, 520, 696)
    assert 0.05 < ref["cell"].mean() < 0.95  # cells and background, not a blank map
    for name in ("flows", "prob", "flows_std", "prob_std"):
        assert np.abs(ref[name] - ours[name]).max() <= 1e-4, name
    for name in ("cell", "mask_prob", "mask_flows"):  # thresholds are quantiles: a few pixels may flip
        assert (ref[name] == ours[name]).mean() >= 0.999, name
    # the confidence masks are those of trainer/confidence.py on the written maps
    from selfadapt_deploy.trainer.confidence import ConfidenceMasks

    again = ConfidenceMasks()(torch.from_numpy(ref["prob"])[None], torch.from_numpy(ref["flows_std"])[None])
    assert np.array_equal(again.mask_prob[0].numpy().astype(np.uint8), ref["mask_prob"])
    assert np.array_equal(again.mask_flows[0].numpy().astype(np.uint8), ref["mask_flows"])
    again = cli.invoke(app, ["pseudo-label", str(image), "--model", str(exported_cyto), "--out",
                             str(tmp_path / "onnx"), "--device", "cpu", "--channels", "0", "--series", "3"])
    assert again.exit_code == 0 and "skipped" in again.output  # resumable: done images are skipped


@pytest.mark.parametrize("args,message", [
    (["--precision", "fp8"], "--precision must be one of fp32, fp16, bf16, got 'fp8'"),
    (["--runtime", "onnx", "--precision", "fp16"], "holds fp32 graphs, not fp16"),
    (["--runtime", "foo"], "--runtime must be one of auto, torch, onnx, tensorrt"),
    (["--runtime", "onnx", "--onnx-provider", "cuda"], "provider 'cuda' does not run on device cpu"),
    (["--runtime", "tensorrt"], "no tensorrt artefact of the model graph"),
])
def test_bad_runtime_choices_fail_with_one_line_before_any_work(tmp_path, exported_cyto, args, message):
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.ones((32, 32), np.uint16))
    result = cli.invoke(app, ["segment", str(image), "--model", str(exported_cyto), "--out",
                              str(tmp_path / "o"), "--device", "cpu", *args])
    assert result.exit_code == 1 and message in result.output.replace("\n", "")
    assert not list((tmp_path / "o").glob("*.tif"))
