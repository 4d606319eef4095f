"""The graph cache behind ``--runtime auto`` on the CPU: plain weights exported once to ONNX and
reused; damaged, stale, interrupted and concurrently filled entries; ``sa-deploy cache``."""

from __future__ import annotations

import multiprocessing
import os
import shutil

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from selfadapt_deploy.caches import cache_dir
from selfadapt_deploy.cli import app
from selfadapt_deploy.export import graph_cache
from selfadapt_deploy.metrics import average_precision
from selfadapt_deploy.models import load_model
from selfadapt_deploy.runner_choice import EXPORT_PAYS_OFF_MPX, open_runner
from selfadapt_deploy.runtime import MODEL_GRAPH
from selfadapt_deploy.synthetic import random_labels, render

cli = CliRunner()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SA_DEPLOY_CACHE", str(root))
    return root / "graphs"


@pytest.fixture(scope="module")
def made_entry(tmp_path_factory, trained_cpnet_path):
    """The tiny trained net's entry, exported once for the tests that only need one to exist."""
    root = tmp_path_factory.mktemp("made")
    return graph_cache.cached_graph(load_model(trained_cpnet_path), "tiny", MODEL_GRAPH, root=root).path


@pytest.fixture
def cached(cache, made_entry):
    """``cache`` holding the tiny net's entry."""
    shutil.copytree(made_entry, cache / made_entry.name)
    return cache


def big_job(spec) -> float:
    return 2 * EXPORT_PAYS_OFF_MPX


def test_auto_exports_plain_weights_once_then_uses_the_cached_graph(cache, trained_cpnet_path):
    said = []
    runner, first = open_runner(trained_cpnet_path, "auto", "cpu", job_mpx=big_job, report=said.append)
    assert "onnxruntime (CPUExecutionProvider)" in first and "exported once into the graph cache" in first
    x = torch.rand(2, 2, 96, 128)
    with runner, open_runner(trained_cpnet_path, "torch", "cpu")[0] as reference:
        got, want = runner.infer(x), reference.infer(x)
    assert (got - want).abs().max() <= 1e-4  # the graph is the network, validated as export does
    assert len(said) == 1 and said[0].startswith("first use of these weights: exporting")
    (entry,) = graph_cache.list_entries(cache)
    assert entry.key["graph"] == "model" and entry.key["precision"] == "fp32"
    said.clear()
    _, again = open_runner(trained_cpnet_path, "auto", "cpu", job_mpx=big_job, report=said.append)
    assert f"cached graph {cache / entry.name}" in again and not said
    assert len(graph_cache.list_entries(cache)) == 1


def test_the_cached_graph_gives_torchs_masks(tmp_path, cached, trained_cpnet_path):
    image = tmp_path / "cells.tif"
    labels = random_labels((300, 260), 70, radius=(6, 9), seed=5)
    tifffile.imwrite(image, (render(labels, seed=5) * 1000).astype(np.uint16))
    masks = {}
    for runtime in ("onnx", "torch"):  # onnx on a plain weights file: the cached graph
        out = tmp_path / runtime
        result = cli.invoke(app, ["segment", str(image), "--model", str(trained_cpnet_path), "--out",
                                  str(out), "--device", "cpu", "--runtime", runtime])
        assert result.exit_code == 0, result.output
        masks[runtime] = tifffile.imread(out / "cells_masks.tif")
    assert masks["torch"].max() > 30
    assert average_precision(masks["torch"], masks["onnx"]).ap[0] >= 0.99
    assert len(graph_cache.list_entries(cached)) == 1


def test_a_job_too_small_to_repay_the_export_stays_in_torch(tmp_path, cache, made_entry,
                                                            trained_cpnet_path):
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, (render(random_labels((96, 96), 10, seed=1), seed=1) * 900).astype(np.uint16))
    result = cli.invoke(app, ["segment", str(image), "--model", str(trained_cpnet_path), "--out",
                              str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    line = result.output.replace("\n", "")
    assert "runtime: torch" in line and f"below the {EXPORT_PAYS_OFF_MPX:g} Mpx at which the one-time" in line
    assert not graph_cache.list_entries(cache)
    # once the graph is cached (by an earlier job), auto takes it whatever the job's size
    shutil.copytree(made_entry, cache / made_entry.name)
    _, line = open_runner(trained_cpnet_path, "auto", "cpu", job_mpx=lambda spec: 0.01)
    assert "onnxruntime" in line and "cached graph" in line


def test_torch_options_and_gpus_keep_torch(cache, trained_cpnet_path):
    _, line = open_runner(trained_cpnet_path, "auto", "cpu", "fp16", job_mpx=big_job)
    assert "runtime: torch" in line and "torch options were given" in line
    _, line = open_runner(trained_cpnet_path, "torch", "cpu", job_mpx=big_job)
    assert line.endswith("on cpu")
    assert not graph_cache.list_entries(cache)


def test_a_damaged_entry_is_made_again(cached, trained_cpnet_path):
    cache = cached
    (entry,) = graph_cache.list_entries(cache)
    graph = cache / entry.name / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    said = []
    runner, line = open_runner(trained_cpnet_path, "auto", "cpu", job_mpx=big_job, report=said.append)
    assert said[0].startswith(f"cached graph {entry.name} is damaged") and "sha256" in said[0]
    assert "exported once" in line
    with runner:  # the new entry is whole: it runs
        assert runner.infer(torch.rand(1, 2, 64, 64)).shape[1] == 3
    assert [e.name for e in graph_cache.list_entries(cache)] == [entry.name]


def test_an_entry_of_other_versions_is_never_reused(cached, trained_cpnet_path, monkeypatch):
    net = load_model(trained_cpnet_path)
    key = graph_cache.cache_key(net, MODEL_GRAPH, "fp32")
    assert (cached / graph_cache.entry_name(key)).is_dir()  # made by these versions
    real = graph_cache.tool_versions
    monkeypatch.setattr(graph_cache, "tool_versions", lambda: {**real(), "onnxruntime": "9.9.9"})
    newer = graph_cache.cache_key(net, MODEL_GRAPH, "fp32")
    assert newer["onnxruntime"] == "9.9.9" and graph_cache.entry_name(newer) != graph_cache.entry_name(key)
    exported = []

    def export_into(staging, *args, **kwargs):  # what an upgrade's first run does: export anew
        exported.append(staging.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(graph_cache, "export_into", export_into)
    with pytest.raises(KeyboardInterrupt):
        graph_cache.cached_graph(net, "m", MODEL_GRAPH)
    assert len(exported) == 1 and graph_cache.entry_name(newer) in exported[0]
    assert len(graph_cache.list_entries(cached)) == 1  # the stale one stays listed, for `cache clear`


def test_an_interrupted_export_leaves_nothing_that_is_used(cache, trained_cpnet_path, monkeypatch):
    net = load_model(trained_cpnet_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(graph_cache, "export_into", killed)
    with pytest.raises(KeyboardInterrupt):
        graph_cache.cached_graph(net, "m", MODEL_GRAPH)
    assert not any(cache.iterdir())  # the staging folder went with it


def _fill(path: str, root: str) -> str:
    net = load_model(path)
    return str(graph_cache.cached_graph(net, path, MODEL_GRAPH, root=root).path)


@pytest.mark.slow
def test_two_processes_filling_one_entry_at_once_both_get_a_whole_entry(cache, trained_cpnet_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.starmap(_fill, [(str(trained_cpnet_path), str(cache))] * 2)
    assert paths[0] == paths[1]
    assert [p.name for p in cache.iterdir()] == [os.path.basename(paths[0])]  # no staging left
    graph_cache.open_export_dir(paths[0])  # whole: every file matches its manifest


def test_cache_list_and_clear(cache, made_entry):
    assert "is empty" in cli.invoke(app, ["cache", "list"]).output
    shutil.copytree(made_entry, cache / made_entry.name)
    listed = cli.invoke(app, ["cache", "list"])
    assert listed.exit_code == 0 and "cpnet" in listed.output and "fp32" in listed.output
    cleared = cli.invoke(app, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 1 cached graphs" in cleared.output
    assert not graph_cache.list_entries(cache) and cache_dir("graphs") == cache
    bad = cli.invoke(app, ["cache", "purge"])
    assert bad.exit_code == 1 and "list or clear" in bad.output


def test_a_graph_that_fails_validation_leaves_auto_in_torch_and_fails_onnx(cache, trained_cpnet_path,
                                                                          monkeypatch):
    from selfadapt_deploy.export.onnx_export import ExportValidationError

    def disagreeing(*args, **kwargs):
        raise ExportValidationError("model.onnx disagrees with torch (fp32); not written:\n  "
                                    "flows_cellprob: max |Δ| 0.5 > 0.0089")

    monkeypatch.setattr(graph_cache, "cached_graph", disagreeing)
    runner, said = open_runner(trained_cpnet_path, "auto", "cpu")
    assert runner.name.startswith("torch") and "did not pass validation" in said
    with pytest.raises(ExportValidationError, match="disagrees with torch"):
        open_runner(trained_cpnet_path, "onnx", "cpu")
    assert not graph_cache.list_entries(cache)  # nothing was cached
