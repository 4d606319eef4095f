"""The Python API: the same labels as ``sa-deploy segment``, the CLI's errors, no half-open state."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from selfadapt_deploy import api
from selfadapt_deploy.cli import app
from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.synthetic import random_labels, render


def cells(seed: int = 0, shape=(120, 104)) -> np.ndarray:
    return (render(random_labels(shape, 14, seed=seed), seed=seed) * 1000).astype(np.uint16)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_segmenter_labels_equal_what_segment_writes(tmp_path, exported_cyto, runtime):
    images = [cells(0), cells(1, (90, 130))]
    for k, img in enumerate(images):
        tifffile.imwrite(tmp_path / f"img{k}.tif", img)
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "img0.tif"), str(tmp_path / "img1.tif"),
                                      "--model", str(exported_cyto), "--runtime", runtime,
                                      "--out", str(tmp_path / "out"), "--device", "cpu",
                                      "--flow-threshold", "0.6"])
    assert result.exit_code == 0, result.output
    with api.Segmenter(exported_cyto, runtime=runtime, device="cpu", flow_threshold=0.6) as seg:
        assert runtime in seg.description
        labels = [seg.segment(img) for img in images]
        together = [s.masks for s in seg.segment_many(images)]
    for k, got in enumerate(labels):
        written = tifffile.imread(tmp_path / "out" / f"img{k}_masks.tif")
        assert got.max() > 3, "a trained model finds cells here"
        np.testing.assert_array_equal(got, written)
        assert got.dtype == written.dtype
        np.testing.assert_array_equal(together[k], written)


def test_segmenter_channel_layouts_and_per_call_settings(trained_cpnet_path):
    img = cells(2)
    two = np.stack([img, img // 2])  # C×Y×X
    with api.Segmenter(trained_cpnet_path, runtime="torch", device="cpu") as seg:
        np.testing.assert_array_equal(seg.segment(two, channels=[0]), seg.segment(img))
        np.testing.assert_array_equal(seg.segment(np.moveaxis(two, 0, -1), channels=[0]),
                                      seg.segment(img))
        fewer = seg.segment(img, cellprob_threshold=6.0)  # a call's setting, not the default's
        assert fewer.max() < seg.segment(img).max()
        flows = seg.segment_many([img])[0].flows
        assert flows.shape == (2, *img.shape)


@pytest.mark.parametrize("call, message", [
    (lambda s: s.segment(np.full((64, 64), np.nan, np.float32)), "NaN"),
    (lambda s: s.segment(np.zeros((2, 3, 64, 64))), "expected Y×X"),
    (lambda s: s.segment(np.zeros((64, 64)), flow_threshold=-1), "--flow-threshold must be a number ≥ 0"),
    (lambda s: s.segment(np.zeros((64, 64)), treshold=1), "unknown segmentation settings"),
    (lambda s: s.segment(np.zeros((4, 64, 64))), "choose them with --channels"),
])
def test_segmenter_bad_input_is_one_error(trained_cpnet_path, call, message):
    with api.Segmenter(trained_cpnet_path, runtime="torch", device="cpu") as seg:
        with pytest.raises(SaDeployError, match=message):
            call(seg)
        assert seg.segment(cells(3)).max() > 0  # still usable afterwards
    with pytest.raises(SaDeployError, match="closed"):
        seg.segment(cells(3))


def test_adapt_and_export_refuse_bad_options_before_any_work(tmp_path, trained_cpnet_path):
    img = tmp_path / "a.tif"
    tifffile.imwrite(img, cells(4))
    for options, message in [({"stop": "sometimes"}, "--stop must be one of"),
                             ({"method": "magic"}, "--method must be"),
                             ({"iterations": 0}, "--iterations"),
                             ({"learning_rate": 1e-3}, "learning_rate")]:
        with pytest.raises(SaDeployError, match=message):
            api.adapt([img], trained_cpnet_path, tmp_path / "run", device="cpu", **options)
        assert not (tmp_path / "run").exists()
    with pytest.raises(SaDeployError, match="precision"):
        api.export(trained_cpnet_path, tmp_path / "exp", precision="int3")
    assert not (tmp_path / "exp").exists()


def test_adapt_refuses_a_set_with_unreadable_images_and_says_what_it_used(tmp_path, trained_cpnet_path):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "good.tif", cells(4))
    (folder / "bad1.tif").write_bytes(b"II*\x00nope")
    (folder / "bad2.png").write_bytes(b"not a png")
    with pytest.raises(SaDeployError) as err:
        api.adapt([folder], trained_cpnet_path, tmp_path / "run", device="cpu", iterations=1)
    assert "bad1.tif" in str(err.value) and "bad2.png" in str(err.value)
    assert "fix or remove them (2 of 3 input files)" in str(err.value)
    assert not (tmp_path / "run").exists()
    (folder / "bad1.tif").unlink()
    (folder / "bad2.png").unlink()
    said: list[str] = []
    api.adapt([folder], trained_cpnet_path, tmp_path / "run", device="cpu", iterations=1, batch_size=2,
              eval_every=1, report=said.append)
    assert "1 training / 1 validation images (of 1 image read)" in said[0]
    assert "both the training and the validation image" in said[1]


def test_adapt_then_export_from_python(tmp_path, trained_cpnet_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        tifffile.imwrite(folder / f"a{k}.tif", cells(10 + k))
    summary = api.adapt([folder], trained_cpnet_path, tmp_path / "run", device="cpu", iterations=4,
                        eval_every=2, batch_size=2, report=lambda _: None)
    assert summary["method"] == "selfadapt" and (tmp_path / "run" / "model.pt").is_file()
    manifest = api.export(tmp_path / "run", tmp_path / "exp", report=lambda _: None)
    assert manifest.family == "cpnet"
    with api.Segmenter(tmp_path / "exp", runtime="onnx", device="cpu") as seg:
        assert seg.segment(cells(20)).shape == (120, 104)


BAD_CONFIG = {"iterations": 0, "batch_size": 1.5, "lr": -1e-4, "l2sp": -1.0, "weight_decay": float("nan"),
              "warmup_fraction": 1.0, "lambda_bal": -1.0, "ema_decay": 3.0, "ema_every": 0,
              "eval_every": 0, "stop": "sometimes", "tau_fn": 0.0, "tau_emb": float("inf"),
              "teacher_runtime": "tvm", "teacher_sync": 0, "teacher_precision": "int8", "amp": "fp8",
              "method": "magic", "labelled_fraction": 5.0, "select": "bogus", "seed": -1,
              "batchnorm_stats": "freeze", "train_tile": 100}


def test_every_checked_adapt_setting_has_a_bad_value_here():
    from dataclasses import fields

    from selfadapt_deploy.trainer.config import AdaptConfig, config_rules

    assert set(BAD_CONFIG) == set(config_rules())
    unchecked = {f.name for f in fields(AdaptConfig)} - set(config_rules())
    assert all(isinstance(getattr(AdaptConfig(), n), bool | None) for n in unchecked), unchecked


@pytest.mark.parametrize("field", sorted(BAD_CONFIG))
def test_a_bad_adapt_setting_is_one_error_before_any_file(tmp_path, field):
    """Refused by AdaptConfig itself, naming the option and the value, before the model is read
    and before the run directory exists."""
    value = BAD_CONFIG[field]
    with pytest.raises(SaDeployError, match=rf"^--{field.replace('_', '-')} must be .*, got {value!r}$"):
        api.adapt([tmp_path / "never-read.tif"], tmp_path / "no-model.pt", tmp_path / "run", device="cpu",
                  **{field: value})
    assert not (tmp_path / "run").exists()


def test_run_inputs_round_trip_and_older_runs_resume(tmp_path, trained_cpnet_path):
    """settings.json is RunInputs' asdict; a run written before the ACTIS/CULPICO inputs existed
    (the keys earlier versions wrote, in their order) still resumes; an unknown key is refused."""
    import json

    from selfadapt_deploy.trainer.run import SETTINGS, RunInputs

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        tifffile.imwrite(folder / f"a{k}.tif", cells(10 + k))
    run = tmp_path / "run"
    api.adapt([folder], trained_cpnet_path, run, device="cpu", iterations=2, eval_every=1,
              batch_size=2, stop="none")
    inputs = RunInputs.load(run)
    assert inputs.images == (str(folder),) and inputs.config.iterations == 2 and inputs.labelled == ()
    saved = json.loads((run / SETTINGS).read_text())
    old = {k: saved[k] for k in ("images", "model", "diameter", "channels", "channel_axis", "series",
                                 "val_images", "val_fraction", "keep_snapshots", "config")}
    old["config"] = {("labeled_fraction" if k == "labelled_fraction" else k): v  # the old spelling
                     for k, v in old["config"].items()}
    (run / SETTINGS).write_text(json.dumps(old, indent=2))
    assert RunInputs.load(run) == inputs
    summary = api.resume(run, device="cpu")
    assert summary["iterations_run"] == 2
    (run / SETTINGS).write_text(json.dumps({**old, "colour": "blue"}))
    with pytest.raises(SaDeployError, match="unknown settings colour"):
        api.resume(run, device="cpu")


def test_segment_paths_is_what_the_cli_runs(tmp_path, trained_cpnet_path):
    """The CLI's segment is this one call: the same masks on disk, its events in order, bad
    options refused before any output."""
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(2):
        tifffile.imwrite(folder / f"a{k}.tif", cells(30 + k))
    events = list(api.segment_paths([folder], tmp_path / "api", model=trained_cpnet_path, device="cpu",
                                    channels=[0], diameter=None))
    assert [e[0] for e in events] == ["model", "images", "image", "image"]
    assert events[1][1] == 2 and {e[1].status for e in events[2:]} == {"done"}
    result = CliRunner().invoke(app, ["segment", str(folder), "--model", str(trained_cpnet_path),
                                      "--out", str(tmp_path / "cli"), "--device", "cpu", "--channels", "0"])
    assert result.exit_code == 0, result.output
    for k in range(2):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "api" / f"a{k}_masks.tif"),
                                      tifffile.imread(tmp_path / "cli" / f"a{k}_masks.tif"))
    with pytest.raises(SaDeployError, match="give --model, or --triton"):
        next(api.segment_paths([folder], tmp_path / "none"))
    with pytest.raises(SaDeployError, match="unknown segmentation settings"):
        next(api.segment_paths([folder], tmp_path / "bad", model=trained_cpnet_path, device="cpu",
                               flow_treshold=0.4))
    assert not (tmp_path / "none").exists() and not (tmp_path / "bad").exists()
