"""The offline demo end to end: SelfAdapt must improve target AP@0.5 over the source model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from selfadapt_deploy.cli import app
from selfadapt_deploy.models import load_model
from selfadapt_deploy.trainer.demo import DemoConfig, run_demo


def test_adaptation_improves_target_ap_and_demo_folder_is_complete(tmp_path):
    result = run_demo(tmp_path, DemoConfig.quick(), "cpu", seed=0, report=lambda _: None)
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


def test_actis_with_two_labelled_target_images_beats_the_source_model(tmp_path):
    """ACTIS on the demo's shift: 2 labelled target images in every batch (one of 4 tiles)."""
    result = run_demo(tmp_path, DemoConfig.quick("actis"), "cpu", seed=0, report=lambda _: None)
    target = "target (6× noise)"
    assert result.after[target].ap[0] > result.before[target].ap[0] + 0.08
    run = json.loads((tmp_path / "adapt" / "run.json").read_text())
    assert run["method"] == "actis" and run["labelled_per_batch"] == 1


def test_demo_has_a_small_cellpose_sam_variant(tmp_path):
    import pytest

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
