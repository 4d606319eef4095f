"""Integrator kernels and flow QC kernels against the torch reference (itself equal to cellpose)."""

from __future__ import annotations

import os

import fastremap
import numpy as np
import pytest
import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.metrics import average_precision
from selfadapt_deploy.postprocess import MaskParams, flows_to_masks
from selfadapt_deploy.postprocess.flow_qc import (
    flow_errors,
    flow_errors_torch,
    heat_map,
    heat_map_torch,
    mask_boxes,
    mask_geometry,
)
from selfadapt_deploy.postprocess.integrate import (
    integrate,
    integrate_batch,
    prepare,
    resolve_integrator,
    walk_merging,
)
from selfadapt_deploy.postprocess.numba_kernels import first_of_equal, integrate_field, mask_centres
from selfadapt_deploy.synthetic import random_labels

from .helpers import assert_positions_agree, cuda, needs_triton, synthetic_flows, under_triton_interpreter
from .test_postprocess import cellpose_masks


def _batch(shape=(120, 136), n=2, cells=40):
    pairs = [synthetic_flows(shape, cells, seed=s, noise=1.0)[1:] for s in range(n)]
    return np.stack([f for f, _ in pairs]), np.stack([c for _, c in pairs])


def test_numba_integrator_is_bit_identical_to_the_reference_on_a_batch():
    flows, cellprob = _batch()
    ref = integrate_batch(flows, cellprob, 0.0, 200, "cpu", "torch")
    ours = integrate_batch(flows, cellprob, 0.0, 200, "cpu", "numba")
    for (ri, rp), (oi, op) in zip(ref, ours, strict=True):
        np.testing.assert_array_equal(ri[0], oi[0])
        torch.testing.assert_close(op, rp, rtol=0, atol=0)
    # the batch call equals one call per image
    single = integrate(flows[1], cellprob[1], 0.0, 200, "cpu", "numba")[1]
    torch.testing.assert_close(single, ours[1][1], rtol=0, atol=0)


def test_first_of_equal_groups_rows_by_their_exact_bits():
    rows = np.array([[3, 1], [0, 0], [3, 1], [7, 2], [0, 0], [3, 1]], np.uint32)
    first, group = first_of_equal(rows)
    np.testing.assert_array_equal(first, [0, 1, 3])  # first row of each group, in order
    np.testing.assert_array_equal(group, [0, 1, 0, 2, 1, 0])
    # 0.0 and -0.0 compare equal as floats but are different bits: kept apart (exactness)
    zeros = np.array([[0.0], [-0.0], [0.0]], np.float32).view(np.uint32)
    np.testing.assert_array_equal(first_of_equal(zeros)[1], [0, 1, 0])
    many = np.random.default_rng(0).integers(0, 50, (20_000, 3)).astype(np.uint32)
    first, group = first_of_equal(many)
    assert len(first) == len(np.unique(many, axis=0))
    np.testing.assert_array_equal(many[first][group], many)


def test_merged_walk_equals_the_plain_walk_and_merges():
    """Merging points at bit-identical positions is exact: same final positions as walking every
    point, with far fewer points walked after the first merge."""
    flows, cellprob = _batch(n=2)
    p = prepare(torch.from_numpy(flows), torch.from_numpy(cellprob), 0.0)
    field = np.zeros((2, flows.shape[2] + 2, flows.shape[3] + 2, 2), np.float32)
    field[:, 1:-1, 1:-1] = p.field.numpy().transpose(0, 2, 3, 1)  # as the numba integrator
    start, image = p.start.numpy(), p.image.numpy()
    walked: list[int] = []

    def walk(pts, im, n):
        walked.append(len(pts))
        return integrate_field(field, pts, im, n)

    merged = walk_merging(walk, start, 200, image)
    np.testing.assert_array_equal(merged, integrate_field(field, start, image, 200))
    assert walked[0] == len(start) and walked[-1] < 0.6 * len(start), walked


def test_batched_flows_to_masks_equals_one_image_at_a_time():
    from selfadapt_deploy.postprocess import flows_to_masks_batch

    flows, cellprob = _batch(n=3)
    cellprob[1] = -5.0  # an image without foreground in the batch
    batch = flows_to_masks_batch(flows, cellprob, MaskParams())
    assert batch[0].max() > 10 and batch[1].max() == 0
    for b in range(3):
        np.testing.assert_array_equal(batch[b], flows_to_masks(flows[b], cellprob[b], MaskParams()))


def test_integrator_choice_and_clear_errors():
    assert resolve_integrator("auto", "cpu") == "numba"
    with pytest.raises(SaDeployError, match="unknown integrator 'fast'"):
        resolve_integrator("fast", "cpu")
    with pytest.raises(SaDeployError, match="numba runs on the CPU"):
        resolve_integrator("numba", "cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(SaDeployError, match="triton needs a CUDA device"):
            resolve_integrator("triton", "cpu")



def test_non_finite_flows_in_cells_are_one_clear_error():
    flows, cellprob = _batch(n=1)
    flows[0, :, 0, 0] = np.nan  # background pixel: ignored, as by cellpose
    cellprob[0, 0, 0] = -5.0
    integrate_batch(flows, cellprob, 0.0, 5, "cpu", "numba")
    y, x = np.argwhere(cellprob[0] > 0)[0]
    flows[0, 1, y, x] = np.inf
    with pytest.raises(SaDeployError, match="NaN or infinite values inside cells"):
        integrate_batch(flows, cellprob, 0.0, 5, "cpu", "numba")

_TRITON_SCRIPT = """
import sys, numpy as np
from selfadapt_deploy.postprocess import MaskParams, flows_to_masks
from selfadapt_deploy.postprocess.integrate import integrate_batch
d = np.load(sys.argv[1])
res = integrate_batch(d["flows"][None], d["cellprob"][None], 0.0, 200, "cpu", "triton")
masks = flows_to_masks(d["flows"], d["cellprob"], MaskParams(integrator="triton"))
np.savez(sys.argv[2], positions=res[0][1].numpy(), masks=masks)
"""


@needs_triton
def test_triton_kernel_under_the_interpreter_matches_the_reference(tmp_path):
    _, flows, cellprob = synthetic_flows((48, 48), 8, seed=3, noise=0.5)
    got = under_triton_interpreter(_TRITON_SCRIPT, tmp_path, flows=flows, cellprob=cellprob)
    ref = integrate(flows, cellprob, 0.0, 200, "cpu", "torch")[1].numpy()
    # the reference's formulas with its FMAs evaluated unfused by the interpreter: equal to rounding
    assert (np.abs(got["positions"] - ref) < 1e-3).all(axis=0).mean() > 0.99
    assert (got["positions"].astype(int) == ref.astype(int)).all(axis=0).mean() > 0.99
    reference_masks = cellpose_masks(flows, cellprob, MaskParams())
    assert reference_masks.max() >= 6
    assert average_precision(reference_masks, got["masks"]).ap[0] >= 0.99


def test_batched_torch_heat_equals_the_cpu_kernels():
    """The torch diffusion (crops of masks batched by size, as on a GPU) against the numba kernel:
    same sums in the same order, so the same float64 numbers."""
    masks = _concave_masks()
    masks[60:100, 0:60] = masks.max() + 1  # one large mask: its own, larger bucket
    masks = fastremap.renumber(masks)[0]
    boxes = mask_boxes(masks)
    labels = torch.from_numpy(masks.astype(np.int64))
    np.testing.assert_array_equal(heat_map_torch(labels).numpy(), heat_map(masks, boxes, "cpu").numpy())
    _, _, _, t_boxes, t_centres = mask_geometry(labels)
    np.testing.assert_array_equal(t_boxes.numpy(), boxes)
    np.testing.assert_array_equal(t_centres.numpy(), mask_centres(masks, boxes))
    small = torch.from_numpy(random_labels((90, 110), 30, seed=4).astype(np.int64))
    import selfadapt_deploy.postprocess.flow_qc as fq

    whole = heat_map_torch(small)
    fq.HEAT_BUDGET, budget = 3 * 16**2, fq.HEAT_BUDGET  # buckets split into chunks of 3 crops
    try:
        torch.testing.assert_close(heat_map_torch(small), whole, rtol=0, atol=0)
    finally:
        fq.HEAT_BUDGET = budget


def _concave_masks() -> np.ndarray:
    """Rings and C shapes (centroid outside the mask, ties in distance) among ordinary cells."""
    masks = random_labels((100, 120), 12, seed=5)
    yy, xx = np.mgrid[:100, :120]
    ring = ((yy - 25) ** 2 + (xx - 95) ** 2 < 15**2) & ((yy - 25) ** 2 + (xx - 95) ** 2 >= 9**2)
    c_shape = ((yy - 75) ** 2 + (xx - 95) ** 2 < 14**2) & ~((xx > 95) & (abs(yy - 75) < 5))
    masks[ring] = masks.max() + 1
    masks[c_shape & (masks == 0)] = masks.max() + 1
    return fastremap.renumber(masks)[0]


def test_mask_centres_equal_cellposes_including_concave_masks():
    from cellpose.dynamics import get_centers
    from scipy import ndimage

    masks = _concave_masks()
    assert masks[25, 95] != masks[25, 107]  # the ring's centroid is not in the ring
    ref, _ = get_centers(masks, ndimage.find_objects(masks))
    got = mask_centres(masks, mask_boxes(masks))
    assert (masks[ref[:, 0], ref[:, 1]] == np.arange(1, masks.max() + 1)).all()
    np.testing.assert_array_equal(got, ref)


def test_torch_flow_errors_equal_cellposes():
    """The batched torch flow QC used on GPUs, run here on the CPU, against cellpose."""
    from cellpose.dynamics import flow_error

    masks = _concave_masks()
    net = np.random.default_rng(1).normal(0, 3, (2, *masks.shape)).astype(np.float32)
    ref, _ = flow_error(masks, net)
    got = flow_errors_torch(torch.from_numpy(masks.astype(np.int64)), torch.from_numpy(net))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(flow_errors(masks, net), ref, rtol=1e-10)


@cuda
@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("method", ["torch", "triton"])
def test_cuda_integrators_agree_with_the_cpu_reference(method):
    """torch's grid_sample on CUDA (cellpose's GPU path) and our Triton kernel against the CPU
    reference (= cellpose on the CPU, bit for bit), with the criterion the method guarantees."""
    flows, cellprob = _batch((300, 280), n=3, cells=150)
    ref = integrate_batch(flows, cellprob, 0.0, 200, "cpu", "numba")
    ours = integrate_batch(flows, cellprob, 0.0, 200, "cuda", method)
    for (ri, rp), (oi, op) in zip(ref, ours, strict=True):
        np.testing.assert_array_equal(ri[0], oi[0])
        assert_positions_agree(op, rp)
    for b in range(len(flows)):
        cpu = flows_to_masks(flows[b], cellprob[b], MaskParams(integrator="numba"))
        gpu = flows_to_masks(flows[b], cellprob[b], MaskParams(integrator=method), device="cuda")
        assert average_precision(cpu, gpu).ap[0] >= 0.99


@cuda
@pytest.mark.gpu
def test_masks_on_cuda_agree_with_cellpose():
    _, flows, cellprob = synthetic_flows((512, 512), 2000, seed=12, noise=1.0, radius=(4, 6))
    p = MaskParams()
    ours = flows_to_masks(flows, cellprob, p, device="cuda")
    ref = cellpose_masks(flows, cellprob, p)
    assert average_precision(ref, ours).ap[0] >= 0.99
    assert abs(int(ours.max()) - int(ref.max())) <= 0.01 * ref.max()
