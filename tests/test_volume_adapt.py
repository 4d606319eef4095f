"""Adaptation on volumes: SelfAdapt on z-stacks of a 3-D shift never deploys a model worse in 3-D
than the source model, and gains 3-D AP over it."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from selfadapt_deploy.api import Segmenter
from selfadapt_deploy.metrics import average_precision
from selfadapt_deploy.synthetic import SOURCE, random_volume_labels, render_volume
from selfadapt_deploy.trainer.demo import DemoConfig
from selfadapt_deploy.trainer.loop import AdaptConfig
from selfadapt_deploy.trainer.run import RunInputs, run_adapt
from selfadapt_deploy.trainer.source import SourceConfig, train_source

ANISOTROPY, DIAMETER = 2.0, 16.0
SMOOTH = (1.0,)  # --flow3d-smooth at selection and test: unsmoothed, do_3D finds half the cells (AP 0.41)


def _volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 16×128×128 stack of the target condition: planes 2 px apart, blurred 2 planes along Z,
    6× the source's noise — a shift the 2-D source model never saw."""
    labels = random_volume_labels((16, 128, 128), 40, anisotropy=ANISOTROPY, seed=seed)
    return render_volume(labels, seed, z_blur=2.0, noise=0.3), labels


def _ap_3d(model: Path, volumes: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean AP@0.5 of do_3D masks (3-D IoU matching, as cellpose's average_precision on volumes),
    the flows smoothed as at selection."""
    segmenter = Segmenter(model, device="cpu")
    scores = [average_precision(labels, segmenter.segment_stack(
        image, do_3d=True, anisotropy=ANISOTROPY, diameter=DIAMETER, flow3d_smooth=SMOOTH)).ap[0]
              for image, labels in volumes]
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def adapted_on_volumes(tmp_path_factory) -> tuple[float, float, dict]:
    """The quick demo's 2-D source model (clean planes), adapted without labels on two ZYX OME-TIFF
    stacks of the shift (tiles from YX, ZY and ZX planes after the anisotropic resize; a third
    stack held out, its candidates scored in 3-D): (source, deployed) do_3D AP@0.5 on two more
    held-out volumes, and the run's summary."""
    tmp_path = tmp_path_factory.mktemp("volume-adapt")
    config = DemoConfig.quick()
    net = config.network(0)
    source = SOURCE.sample(config.n_source, (config.size, config.size), seed=0)
    train_source(net, [im for im, _ in source], [lab for _, lab in source],
                 SourceConfig(**{**asdict(config.source), "seed": 0}))
    net.save(tmp_path / "source_model.pt")
    stacks = []
    for k in range(3):
        image, _ = _volume(100 + k)
        stacks.append(tmp_path / f"stack{k}.ome.tif")
        tifffile.imwrite(stacks[-1], image, metadata={"axes": "ZYX"})
    test = [_volume(200 + k) for k in range(2)]

    inputs = RunInputs(images=stacks[:2], val_images=stacks[2:], model=str(tmp_path / "source_model.pt"),
                       config=replace(AdaptConfig(), iterations=30, eval_every=10),
                       anisotropy=ANISOTROPY, diameter=DIAMETER, flow3d_smooth=SMOOTH)
    torch.manual_seed(0)
    summary = run_adapt(inputs, tmp_path / "adapt", torch.device("cpu"), report=lambda _: None)
    return _ap_3d(tmp_path / "source_model.pt", test), _ap_3d(tmp_path / "adapt" / "model.pt", test), summary


@pytest.mark.slow
def test_adaptation_on_z_stacks_never_deploys_a_model_worse_in_3d(adapted_on_volumes):
    """The label-free choice, made on the held-out stack segmented in 3-D, keeps the 3-D AP of the
    source model or better (with BatchNorm statistics updated every snapshot lost in 3-D, and
    scored on planes the choice had deployed one: AP 0.41 → 0.28)."""
    before, after, summary = adapted_on_volumes
    assert after >= before - 0.02, (before, after, summary["selection"]["why"])


@pytest.mark.slow
def test_adaptation_on_z_stacks_of_a_3d_shift_improves_3d_ap(adapted_on_volumes):
    """Adapted on volumes of the shift, the deployed model segments held-out volumes better in
    do_3D mode than the source model (by ≥ 0.03 AP@0.5: two or three more of the ~80 test cells)."""
    before, after, summary = adapted_on_volumes
    assert after >= before + 0.03, (before, after, summary["selection"]["why"])
