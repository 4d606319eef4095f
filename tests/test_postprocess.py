"""Flows → masks against cellpose 4.2's own ``compute_masks`` + hole filling on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cellpose import dynamics, utils

from selfadapt_deploy.metrics import average_precision
from selfadapt_deploy.postprocess import MaskParams, flows_to_masks
from selfadapt_deploy.postprocess.cleanup import fill_holes_and_remove_small
from selfadapt_deploy.postprocess.flow_qc import flow_errors, masks_to_flows
from selfadapt_deploy.postprocess.integrate import integrate
from selfadapt_deploy.synthetic import random_labels

from .helpers import synthetic_flows


def cellpose_masks(flows, cellprob, p: MaskParams) -> np.ndarray:
    """What cellpose 4.2's eval does after the network (resample=True, no resize)."""
    masks = dynamics.compute_masks(flows, cellprob, niter=p.niter,
                                   cellprob_threshold=p.cellprob_threshold,
                                   flow_threshold=p.flow_threshold,
                                   max_size_fraction=p.max_size_fraction)
    return utils.fill_holes_and_remove_small_masks(masks, min_size=p.min_size)


@pytest.mark.parametrize("integrator", ["torch", "numba"])
def test_integrator_positions_equal_cellposes(integrator):
    _, flows, cellprob = synthetic_flows((97, 131), 20, seed=1)
    inds, pos = integrate(flows, cellprob, 0.0, 150, "cpu", integrator)
    ref = dynamics.follow_flows(flows * (cellprob > 0) / 5.0, inds=inds, niter=150)
    torch.testing.assert_close(pos, ref, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_masks_from_flows_from_masks_equal_cellposes(seed):
    _, flows, cellprob = synthetic_flows((256, 256), 150, seed=seed, noise=1.0)
    p = MaskParams()
    ours = flows_to_masks(flows, cellprob, p)
    ref = cellpose_masks(flows, cellprob, p)
    assert ours.max() > 100
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("params", [
    MaskParams(niter=100, cellprob_threshold=-1.0, flow_threshold=0.8, min_size=30),
    MaskParams(flow_threshold=0.0, min_size=-1),
    MaskParams(flow_threshold=0.1, max_size_fraction=0.01),
])
def test_parameters_act_as_in_cellpose(params):
    _, flows, cellprob = synthetic_flows((200, 180), 80, seed=4, noise=2.0)
    np.testing.assert_array_equal(flows_to_masks(flows, cellprob, params),
                                  cellpose_masks(flows, cellprob, params))


def test_thousands_of_cells_agree_with_cellpose():
    _, flows, cellprob = synthetic_flows((640, 640), 3000, seed=7, noise=1.0, radius=(4, 6))
    ours, ref = flows_to_masks(flows, cellprob), cellpose_masks(flows, cellprob, MaskParams())
    assert ref.max() > 2000
    assert average_precision(ref, ours).ap[0] >= 0.99
    assert abs(int(ours.max()) - int(ref.max())) <= 0.01 * ref.max()


def test_no_foreground_gives_empty_masks():
    masks = flows_to_masks(np.zeros((2, 30, 40), np.float32), np.full((30, 40), -5.0, np.float32))
    assert masks.shape == (30, 40) and masks.dtype == np.uint16 and masks.max() == 0


def test_masks_to_flows_and_errors_equal_cellposes():
    labels = random_labels((120, 150), 40, seed=2)
    ref_mu, _ = dynamics.masks_to_flows_gpu(labels)
    np.testing.assert_array_equal(masks_to_flows(labels), ref_mu)
    gaps = np.where(labels > 0, 3 * labels + 100, 0)  # other label values, gaps between them
    np.testing.assert_array_equal(masks_to_flows(gaps), ref_mu)
    net = np.random.default_rng(0).normal(0, 3, (2, 120, 150))
    ref_err, _ = dynamics.flow_error(labels, net)
    np.testing.assert_allclose(flow_errors(labels, net), ref_err, rtol=1e-12)


def test_fill_holes_and_min_size_equal_cellposes():
    labels = random_labels((100, 100), 25, seed=5).astype(np.uint16)
    labels[labels == 3] = 0
    ring = np.zeros_like(labels)
    ring[40:60, 40:60] = 30
    ring[45:55, 45:55] = 0  # a hole
    labels = np.where(ring > 0, ring, labels).astype(np.uint16)
    labels[0:2, 0:2] = 31  # too small
    ours = fill_holes_and_remove_small(labels.copy(), 15)
    ref = utils.fill_holes_and_remove_small_masks(labels.copy(), min_size=15)
    np.testing.assert_array_equal(ours, ref)
    assert (ours[45:55, 45:55] > 0).all()


def test_hole_filling_equals_cellposes_on_nested_and_diagonal_cases():
    labels = np.zeros((40, 60), np.uint16)
    labels[2:20, 2:20] = 1
    labels[6:14, 6:14] = 0
    labels[8:12, 8:12] = 2  # enclosed in 1's hole: taken over by 1, then too small
    labels[22:38, 22:38] = 3
    labels[28:32, 26:30] = 0  # a hole
    labels[22:25, 30] = 0  # a channel from the box border ...
    labels[25, 31] = 0  # ... and a pixel touching it only diagonally: a hole (4-connectivity)
    labels[2:20, 40:58] = 4
    labels[5:9, 44:48] = 0
    labels[12:16, 50:54] = 5  # a second mask inside 4's box but touching nothing
    labels[12:16, 44:48] = 0
    labels[12:16, 49] = 0
    for min_size in (15, 0):
        ours = fill_holes_and_remove_small(labels, min_size)
        ref = utils.fill_holes_and_remove_small_masks(labels.copy(), min_size=min_size)
        np.testing.assert_array_equal(ours, ref)
        assert ours[25, 31] == ours[29, 27] == ours[30, 30] and ours[23, 30] == 0
    assert labels[8, 8] == 2  # the input is left alone
