"""Batch jobs over files: an image's flows → masks and writing overlap the next image's network,
results stay in input order, the masks are those of the one-image pipeline."""

from __future__ import annotations

import threading
import time

import numpy as np
import tifffile
import torch

import selfadapt_deploy.batch as batch
from selfadapt_deploy.batch import SegmentJob, segment_files
from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.models import load_model
from selfadapt_deploy.runtime import TorchRunner
from selfadapt_deploy.segment import SegmentParams, segment_image
from selfadapt_deploy.synthetic import random_labels, render


def images(tmp_path, n=3):
    paths = []
    for k in range(n):
        labels = random_labels((160, 144), 30, radius=(6, 9), seed=k)
        paths.append(tmp_path / f"img{k}.tif")
        tifffile.imwrite(paths[-1], (render(labels, seed=k) * 1000).astype(np.uint16))
    return paths


def test_masks_of_one_image_overlap_the_next_images_network(tmp_path, trained_cpnet_path, monkeypatch):
    paths = images(tmp_path)
    net = load_model(trained_cpnet_path)
    params = SegmentParams(batch_size=1)  # every image fills a batch: each runs on its own
    events = []
    predict, masks = batch.predict_on_host, batch.masks_on_host

    def timed_predict(*args):
        events.append(("network", threading.current_thread().name, time.perf_counter()))
        return predict(*args)

    def slow_masks(*args):
        time.sleep(0.3)  # long enough that the next network must start meanwhile
        out = masks(*args)
        events.append(("masks done", threading.current_thread().name, time.perf_counter()))
        return out

    monkeypatch.setattr(batch, "predict_on_host", timed_predict)
    monkeypatch.setattr(batch, "masks_on_host", slow_masks)
    job = SegmentJob(TorchRunner(net), tmp_path / "out", params, torch.device("cpu"))
    (tmp_path / "out").mkdir()
    results = list(segment_files(paths, job))
    assert [r.name for r in results] == ["img0", "img1", "img2"] and {r.status for r in results} == {"done"}
    networks = [t for kind, _, t in events if kind == "network"]
    finished = [t for kind, _, t in events if kind == "masks done"]
    assert networks[1] < finished[0] and networks[2] < finished[1]  # overlapped
    assert all(name.startswith("sa-deploy-masks") for kind, name, _ in events if kind == "masks done")
    with TorchRunner(net) as runner:
        for path, result in zip(paths, results, strict=True):
            data = tifffile.imread(path)[None].astype(np.float32)
            want = segment_image(runner, np.concatenate([data, np.zeros_like(data)]), params).masks
            got = tifffile.imread(tmp_path / "out" / f"{path.stem}_masks.tif")
            np.testing.assert_array_equal(got, want)
            assert result.count == want.max() > 0


def test_an_image_failing_in_the_background_is_reported_in_order_and_the_others_go_on(
        tmp_path, trained_cpnet_path, monkeypatch):
    paths = images(tmp_path)
    masks = batch.masks_on_host
    calls = []

    def failing_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise SaDeployError("img1: could not write")
        return masks(*args)

    monkeypatch.setattr(batch, "masks_on_host", failing_second)
    job = SegmentJob(TorchRunner(load_model(trained_cpnet_path)), tmp_path / "out",
                     SegmentParams(batch_size=1), torch.device("cpu"))
    (tmp_path / "out").mkdir()
    results = list(segment_files(paths, job))
    assert [(r.name, r.status) for r in results] == [("img0", "done"), ("img1", "failed"), ("img2", "done")]
    assert "could not write" in results[1].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0_masks.tif", "img2_masks.tif"]
