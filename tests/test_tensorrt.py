"""TensorRT: the engine builder's choices per TensorRT generation (against a stand-in module that
has exactly the documented API of each: 11 removed the weak-typing builder flags), engine
compatibility; and, where TensorRT and a GPU exist, real engines against torch and refit engines
against freshly built ones (TensorRT 11.3 documents that REFIT can drop a GEMM bias)."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.models import ModelSpec, load_model
from selfadapt_deploy.runner_choice import open_runner
from selfadapt_deploy.runtime import MODEL_GRAPH, TEACHER_GRAPH, TorchRunner
from selfadapt_deploy.runtime.graphs import graph_module

HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
SPEC = ModelSpec(nchan=2, tile_size=224, fixed_tile=False, diam_mean=30.0, default_diameter=30.0)


def stand_in_tensorrt(version: str, calls: list) -> types.ModuleType:
    """A ``tensorrt`` module with the documented builder API of ``version``, recording calls."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    flags = {"REFIT": "REFIT", "REFIT_IDENTICAL": "REFIT_IDENTICAL", "TF32": "TF32"}
    if major < 11:  # removed in 11: "Strong typing with ModelOpt AutoCast"
        flags.update(FP16="FP16", BF16="BF16")
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Cache:
        def serialize(self):
            return b"timing"

    class Config:
        def clear_flag(self, flag):
            calls.append(("clear", flag))

        def set_memory_pool_limit(self, pool, size):
            calls.append(("pool", pool, size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data):
            calls.append(("timing cache in", data))
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set timing cache", ignore_mismatch))

        def get_timing_cache(self):
            return Cache()

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shapes = (name, low, opt, high)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network flags", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, data):
            calls.append(("parse", data))
            return True

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


@pytest.mark.parametrize("version,precision,typing,flags", [
    ("10.3.0", "fp16", "weak", {"REFIT", "FP16"}),  # JetPack 6: builder flags on the fp32 graph
    ("10.3.0", "fp32", "weak", {"REFIT"}),
    ("11.4.0", "fp16", "strong", {"REFIT"}),  # precision is the graph's; FP16 no longer exists
    ("11.4.0", "bf16", "strong", {"REFIT"}),
])
def test_engine_builder_per_tensorrt_generation(monkeypatch, tmp_path, fake_gpu, version, precision,
                                                typing, flags):
    from selfadapt_deploy.export import tensorrt as trt_export
    from selfadapt_deploy.runtime import trt_runner

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt(version, calls))
    trt_runner.trt_logger.cache_clear()
    assert trt_export.needs_fp32_graph(precision) == (typing == "weak" and precision != "fp32")
    build = trt_export.build_engine(b"onnx", MODEL_GRAPH, SPEC, 2, precision, 16,
                                    tmp_path / "timing.cache", torch.device("cuda"))
    trt_runner.trt_logger.cache_clear()
    assert build.plan == b"plan" and (tmp_path / "timing.cache").read_bytes() == b"timing"
    assert build.record == {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                            "tensorrt": version, "typing": typing, "refittable": True,
                            "max_batch": 16, "min_tile": 16, "tile": 224}
    assert ("network flags", 1 << 5 if typing == "strong" else 0) in calls
    assert {c[1] for c in calls if c[0] == "flag"} == flags
    assert (("clear", "TF32") in calls) == (precision == "fp32")
    assert ("profile", ("tiles", (1, 2, 16, 16), (16, 2, 224, 224), (16, 2, 224, 224))) in calls


def test_engine_from_another_machine_is_refused(monkeypatch, fake_gpu):
    from selfadapt_deploy.runtime import trt_runner

    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt("10.3.0", []))
    here = trt_runner.engine_record(torch.device("cuda"))
    assert trt_runner.engine_mismatch(here, torch.device("cuda")) == ""
    why = trt_runner.engine_mismatch({**here, "tensorrt": "11.4.0", "compute_capability": "8.7"},
                                     torch.device("cuda"))
    assert why == "tensorrt 11.4.0 ≠ 10.3.0 here; compute_capability 8.7 ≠ 9.0 here"


def test_missing_tensorrt_is_one_clear_error(monkeypatch):
    from selfadapt_deploy.runtime import trt_runner

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(SaDeployError, match=r"pip install 'sa-deploy\[trt\]'"):
        trt_runner.import_tensorrt()


# ---- real TensorRT (skips without it) ---------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_engines_refit_and_match_torch(tmp_path, trained_cpnet_path):
    """Build, run, refit: a refit engine equals a non-refittable engine built with the new weights
    (TensorRT 11.3: REFIT may drop a GEMM bias) and torch; export --engines-from refits."""
    from selfadapt_deploy.export.exporter import export_model
    from selfadapt_deploy.export.onnx_export import export_onnx
    from selfadapt_deploy.export.tensorrt import build_engine
    from selfadapt_deploy.runtime.trt_runner import TrtRunner

    out = tmp_path / "trt"
    export_model(str(trained_cpnet_path), out, trt=True, report=lambda m: None)
    net = load_model(out)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.save(tmp_path / "moved.pt")
    refit_dir = tmp_path / "refit"
    manifest = export_model(str(tmp_path / "moved.pt"), refit_dir, trt=True, report=lambda m: None,
                            engines_from=out)
    assert manifest.artifact("model", "tensorrt").engine["refit_from"] == str(out)
    x = torch.rand(4, 2, 224, 224, device="cuda")

    def close(a, b):  # GPU kernels sum in other orders: relative to the output's magnitude
        return (a - b).abs().max() <= 1e-3 * max(1.0, float(b.abs().max()))

    for graph in (MODEL_GRAPH, TEACHER_GRAPH):
        build = build_engine(export_onnx(net, graph).SerializeToString(), graph, net.spec,
                             net.nchan, "fp32", 8, tmp_path / "timing.cache", torch.device("cuda"),
                             refittable=False)
        plain = tmp_path / f"{graph.name}.plan"
        plain.write_bytes(build.plan)
        with open_runner(out, "tensorrt", "cuda", graph=graph)[0] as refit, \
                TrtRunner(plain, net.spec, graph, "cuda", build.record) as built, \
                open_runner(refit_dir, "tensorrt", "cuda", graph=graph)[0] as exported:
            refit.update_weights(graph_module(net, graph).state_dict())
            a, b, c = refit.run(x), built.run(x), exported.run(x)
        with TorchRunner(net.cpu(), graph=graph) as reference:  # fp32 proper (no TF32)
            want = reference.run(x.cpu())
        for name in graph.output_names:
            assert close(a[name], b[name]) and close(c[name], b[name]), name
            assert close(a[name].cpu(), want[name]), name


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_requests_without_tensorrt_fail_before_any_work(tmp_path, trained_cpnet_path):
    import numpy as np
    import tifffile
    from typer.testing import CliRunner

    from selfadapt_deploy.cli import app

    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 900, (96, 96), dtype=np.uint16))
    for args in (["adapt", str(image), "--model", str(trained_cpnet_path), "--out",
                  str(tmp_path / "run"), "--teacher-runtime", "tensorrt", "--device", "cpu"],
                 ["export", str(trained_cpnet_path), "--out", str(tmp_path / "export"), "--trt"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1
        assert "error: TensorRT is not installed" in result.output
        assert "pip install 'sa-deploy[trt]'" in result.output.replace("\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]  # nothing was started
