"""The adaptation loop on CPU: run-directory files, snapshot selection, exact resume after a kill."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from selfadapt_deploy.models import load_model
from selfadapt_deploy.segment import SegmentParams
from selfadapt_deploy.synthetic import random_labels, render
from selfadapt_deploy.trainer.data import TileSampler, prepare_image
from selfadapt_deploy.trainer.loop import AdaptConfig, Validation, adapt, split_indices

CONFIG = AdaptConfig(iterations=6, batch_size=2, eval_every=3, stop="none", seed=3)


def setup(trained_cpnet_path):
    net = load_model(trained_cpnet_path)
    raw = [np.stack([render(random_labels((96, 96), 14, seed=s), seed=s, gamma=1.5),
                     np.zeros((96, 96), np.float32)]) for s in range(3)]
    train = TileSampler([prepare_image(im, 1.0) for im in raw[:2]], tile=64)
    tiles = TileSampler([prepare_image(raw[2], 1.0)], tile=64).sample(2, torch.Generator())
    return net, train, Validation(images=[raw[2]], tiles=tiles, params=SegmentParams())


def test_adapt_writes_the_run_directory(tmp_path, trained_cpnet_path):
    net, train, val = setup(trained_cpnet_path)
    summary = adapt(net, train, val, tmp_path / "run", CONFIG)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "iter_000000.pt", "iter_000003.pt", "iter_000006.pt"]
    assert summary["selected_iteration"] == 6 and not summary["stopped_early"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["iteration"] for r in rows if r["d_emb"]] == ["0", "3", "6"]
    assert float(rows[0]["d_emb"]) == 0 and float(rows[0]["fn_rate"]) == 0
    assert all(float(r["loss"]) > 0 for r in rows if r["loss"])
    assert json.loads((run / "run.json").read_text())["config"]["lr"] == 1e-4  # CPnet default
    adapted = load_model(run)  # model.pt loads wherever a model is accepted
    before = load_model(trained_cpnet_path).state_dict()["output.2.weight"]
    assert not torch.equal(adapted.state_dict()["output.2.weight"], before)


def test_stopping_selects_the_snapshot_before_the_crossing(tmp_path, trained_cpnet_path):
    net, train, val = setup(trained_cpnet_path)
    cfg = AdaptConfig(**{**CONFIG.__dict__, "stop": "emb", "tau_emb": 1e-9, "lr": 1e-2})
    summary = adapt(net, train, val, tmp_path / "run", cfg)
    assert summary["stopped_early"] and summary["selected_iteration"] == 0
    assert "d_emb" in summary["stop_reason"]
    assert summary["iterations_run"] == 3


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, trained_cpnet_path):
    net, train, val = setup(trained_cpnet_path)
    adapt(net, train, val, tmp_path / "full", CONFIG)

    def kill_at_step_4(step, terms):
        if step == 4:
            raise KeyboardInterrupt

    net, train, val = setup(trained_cpnet_path)
    with pytest.raises(KeyboardInterrupt):
        adapt(net, train, val, tmp_path / "killed", CONFIG, progress=kill_at_step_4)
    assert not (tmp_path / "killed" / "model.pt").exists()
    net, train, val = setup(trained_cpnet_path)
    adapt(net, train, val, tmp_path / "killed", CONFIG, resume=True)
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)


def test_split_indices():
    assert split_indices(1, 0.2, 0) == ([0], [0])
    train, val = split_indices(10, 0.2, 0)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert split_indices(2, 0.9, 0)[0]  # never leaves training empty


def test_teacher_in_onnxruntime_gives_the_torch_pseudo_labels_at_every_sync(tmp_path,
                                                                            trained_cpnet_path):
    """--teacher-runtime onnx: at each sync point (every 2 steps) the exported teacher graph, with
    the EMA's weights pushed in, gives the torch teacher's pseudo-labels on that step's tiles."""
    net, train, val = setup(trained_cpnet_path)
    cfg = AdaptConfig(**{**CONFIG.__dict__, "teacher_runtime": "onnx", "teacher_sync": 2})
    adapt(net, train, val, tmp_path / "run", cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    synced = {int(r["iteration"]): float(r["teacher_err"]) for r in rows if r["teacher_err"]}
    assert sorted(synced) == [1, 3, 5]  # steps 0, 2, 4
    assert max(synced.values()) <= 1e-4
    assert (tmp_path / "run" / "teacher_engine" / "teacher_tta.onnx").is_file()
    assert load_model(tmp_path / "run").family == "cpnet"


def test_a_teacher_runtime_that_disagrees_with_torch_stops_the_run(trained_cpnet_path, monkeypatch,
                                                                  tmp_path):
    """A runner whose weights did not follow the EMA (here: the sync is skipped after the teacher
    moved) is caught at the sync point instead of silently training on wrong pseudo-labels."""
    from selfadapt_deploy.errors import SaDeployError
    from selfadapt_deploy.trainer.engine_teacher import open_engine_teacher

    net = load_model(trained_cpnet_path)
    engine = open_engine_teacher(net, "onnx", "fp32", tmp_path, torch.device("cpu"), 1, 2)
    x = torch.rand(2, 2, 64, 64)
    _, metrics = engine(x, 0)
    assert metrics["teacher_err"] <= 1e-4
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    monkeypatch.setattr(engine.runner, "update_weights", lambda weights: None)
    with pytest.raises(SaDeployError, match="disagrees with the torch teacher at step 1"):
        engine(x, 1)
    engine.close()
