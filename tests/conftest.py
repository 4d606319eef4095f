"""Shared fixtures: tiny networks of every family, the real data folder, trained fixture."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# the graph cache (--runtime auto on the CPU exports plain weights once) of this test process
# only, never the user's ~/.cache/sa-deploy (the CLI subprocesses of the tests inherit it); each
# test starts with an empty one (`fresh_graph_cache`), so no test's runtime depends on another's
os.environ["SA_DEPLOY_CACHE"] = tempfile.mkdtemp(prefix="sa-deploy-test-cache-")

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of the two test workers: one thread each, so the
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):  # two share the cores
        os.environ.setdefault(_var, "1")  # (subprocesses inherit it) instead of oversubscribing them

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from selfadapt_deploy.models import CPnet, build_cpsam
from selfadapt_deploy.models.cpdino import build_cpdino

from .helpers import randomize_batchnorm

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bbbc047"
FIXTURES = Path(__file__).parent / "fixtures" / "cellpose3"


@pytest.fixture(autouse=True)
def fresh_graph_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SA_DEPLOY_CACHE", str(tmp_path_factory.mktemp("graph-cache")))


@pytest.fixture
def tiny_cpnet() -> CPnet:
    torch.manual_seed(0)
    return randomize_batchnorm(CPnet((2, 8, 16, 32), diam_mean=17.0)).eval()


@pytest.fixture
def tiny_cpsam():
    return build_cpsam(seed=0).eval()


@pytest.fixture
def tiny_cpdino():
    return build_cpdino(seed=0).eval()


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data folder {DATA} is absent")
    return DATA


@pytest.fixture(scope="session")
def trained_cpnet_path() -> Path:
    path = FIXTURES / "tiny_cyto.pth"
    if not path.is_file():
        pytest.skip(f"{path} missing: run tests/reference/make_cellpose3_fixtures.py")
    return path


@pytest.fixture(scope="session")
def exported_cyto(tmp_path_factory) -> Path:
    """The trained tiny Cellpose 3 model (fixture) exported once: weights, graphs, manifest."""
    from selfadapt_deploy.export.exporter import export_model

    path = FIXTURES / "tiny_cyto.pth"
    if not path.is_file():
        pytest.skip(f"{path} missing: run tests/reference/make_cellpose3_fixtures.py")
    out = tmp_path_factory.mktemp("exported") / "tiny_cyto"
    export_model(str(path), out, report=lambda m: None)
    return out
