"""The offline demo end to end: SelfAdapt must improve target AP@0.5 over the source model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfadapt_deploy.cli import app
from selfadapt_deploy.models import load_model
from selfadapt_deploy.trainer.demo import DemoConfig, DemoResult, run_demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, DemoResult]:
    """The quick demo's folder and result (its source model is reused by the ACTIS test)."""
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, DemoConfig.quick(), "cpu", seed=0, report=lambda _: None)


def test_adaptation_improves_target_ap_and_demo_folder_is_complete(quick_demo):
    tmp_path, result = quick_demo
    target, source = "target (6× noise)", "source (clean)"
    # the source model is good on its own domain and clearly worse under the shift
    assert result.before[source].ap[0] > 0.95
    assert result.before[target].ap[0] < result.before[source].ap[0] - 0.1
    # adaptation without labels gains on the target and does not forget the source
    assert result.after[target].ap[0] > result.before[target].ap[0] + 0.08
    assert result.after[source].ap[0] >= result.before[source].ap[0] - 0.02
    for name in ("source_model.pt", "adapt/model.pt", "adapt/curves.png", "adapt/metrics.csv",
                 "overlays.png", "results.json", "target_test/images/img0.tif",
                 "target_test/labels/img0.tif"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["after"][target]["ap"][0] == result.after[target].ap[0]
    assert load_model(tmp_path / "adapt", "cpu").family == "cpnet"

    # the same folder with other settings is refused, before any work, with one clear line
    out = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--device", "cpu"])
    assert out.exit_code == 1
    assert "holds a demo run with other settings" in out.output


@pytest.mark.slow
def test_actis_with_two_labelled_target_images_beats_the_source_model(tmp_path, quick_demo):
    """ACTIS on the demo's shift: 2 labelled target images in every batch (one of 4 tiles). The
    source model is the SelfAdapt demo's (same source settings and seed): the demo reuses it."""
    shutil.copy(quick_demo[0] / "source_model.pt", tmp_path / "source_model.pt")
    reports: list[str] = []
    result = run_demo(tmp_path, DemoConfig.quick("actis"), "cpu", seed=0, report=reports.append)
    assert any(r.startswith("reusing the trained source model") for r in reports)
    target = "target (6× noise)"
    # the gain measured 0.076 with one thread (as the tests run) and above 0.08 with two: the
    # threads change the float sums of training, so the margin leaves room for that, not more
    assert result.after[target].ap[0] > result.before[target].ap[0] + 0.05
    run = json.loads((tmp_path / "adapt" / "run.json").read_text())
    assert run["method"] == "actis" and run["labelled_per_batch"] == 1


def test_demo_has_a_small_cellpose_sam_variant(tmp_path):
    from selfadapt_deploy.errors import SaDeployError

    config = DemoConfig.for_family("cpsam")
    net = config.network(seed=0)
    assert net.family == "cpsam" and net.tile_size == config.tile
    assert config.source.tile == config.tile and DemoConfig().source.tile == 112  # fixed tile: trained on it
    assert config.adapt.lr == 1e-4 and DemoConfig.for_family("cpnet") == DemoConfig()
    with pytest.raises(SaDeployError, match="--family must be one of cpnet, cpsam, cpdino"):
        DemoConfig.for_family("vit")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--family", "vit"])
    assert result.exit_code != 0 and "must be one of cpnet, cpsam, cpdino" in result.output
    assert not (tmp_path / "d").exists()
