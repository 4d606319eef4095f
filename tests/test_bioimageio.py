"""``export --bioimageio``: a bioimage.io model package that bioimageio.spec validates and whose
test tensors bioimageio.core reproduces from the ONNX and TorchScript weights."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from selfadapt_deploy.cli import app
from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.export.bioimageio import write_bioimageio_package
from selfadapt_deploy.io.normalize import normalize_image
from selfadapt_deploy.runner_choice import open_runner

pytest.importorskip("bioimageio.spec", reason="the dev extra installs bioimageio.spec")


@pytest.fixture(scope="module")
def package(tmp_path_factory, exported_cyto):
    return write_bioimageio_package(exported_cyto, tmp_path_factory.mktemp("bio") / "pkg",
                                    authors=["Ada Lovelace"])


def test_package_is_self_contained_and_describes_the_network(package, exported_cyto):
    rdf = yaml.safe_load(package.read_text())
    assert rdf["type"] == "model" and rdf["format_version"].startswith("0.5")
    assert [a["name"] for a in rdf["authors"]] == ["Ada Lovelace"]
    assert set(rdf["weights"]) == {"onnx", "torchscript"}
    files = [rdf["weights"]["onnx"]["source"], rdf["weights"]["torchscript"]["source"],
             rdf["inputs"][0]["test_tensor"]["source"], rdf["outputs"][0]["test_tensor"]["source"],
             rdf["documentation"]["source"], *(c["source"] for c in rdf["covers"])]
    assert all((package.parent / f).is_file() for f in files)
    assert (package.parent / "model.onnx").read_bytes() == (exported_cyto / "model.onnx").read_bytes()
    scale = [p for p in rdf["inputs"][0]["preprocessing"] if p["id"] == "scale_range"]
    assert scale[0]["kwargs"] == {"axes": ["y", "x"], "min_percentile": 1.0, "max_percentile": 99.0}


def test_test_tensors_are_what_sa_deploy_computes(package, exported_cyto):
    x = np.load(package.parent / "test_input.npy")
    y = np.load(package.parent / "test_output.npy")
    runner, _ = open_runner(exported_cyto, "onnx", "cpu")
    with runner:
        got = runner.infer(torch.from_numpy(normalize_image(x[0])[None]))
    np.testing.assert_allclose(y, got.numpy(), atol=1e-4)


def test_bioimageio_core_reproduces_the_test_outputs(package):
    core = pytest.importorskip("bioimageio.core", reason="the dev extra installs bioimageio.core")
    summary = core.test_model(package)
    ran = [d.name for d in summary.details]
    assert summary.status == "passed", summary.format()
    assert any("(onnx)" in n for n in ran) and any("(torchscript)" in n for n in ran), ran


@pytest.mark.slow
def test_export_cli_writes_the_package_and_refuses_a_used_folder(tmp_path, trained_cpnet_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(trained_cpnet_path), "--out", str(tmp_path / "e"),
                                      "--bioimageio", str(taken)])
    assert result.exit_code == 1 and "not an empty directory" in result.output
    assert not (tmp_path / "e").exists()
    result = CliRunner().invoke(app, ["export", str(trained_cpnet_path), "--out", str(tmp_path / "e"),
                                      "--bioimageio", str(tmp_path / "pkg"), "--author", "A. B."])
    assert result.exit_code == 0, result.output
    assert "validated by bioimageio.spec" in result.output
    assert yaml.safe_load((tmp_path / "pkg" / "rdf.yaml").read_text())["authors"] == [{"name": "A. B."}]


def test_without_bioimageio_spec_the_error_says_what_to_install(tmp_path, exported_cyto, monkeypatch):
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # import fails
    with pytest.raises(SaDeployError, match=r"pip install 'sa-deploy\[bioimageio\]'"):
        write_bioimageio_package(exported_cyto, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()
