"""Normalisation, tiling/blending and D4 views against cellpose's own functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cellpose import core, transforms

from selfadapt_deploy.io.normalize import normalize_image
from selfadapt_deploy.runtime import TorchRunner
from selfadapt_deploy.segment import SegmentParams, predict_flows
from selfadapt_deploy.tiling import (
    D4,
    d4_inverse,
    d4_merge,
    d4_transform,
    d4_views,
    pad_amounts,
    predict_tiled,
    predict_tiled_many,
    taper_mask,
)

from .helpers import CellposeNetAdapter, cellpose4_model


@pytest.mark.parametrize("shape", [(2, 300, 260), (1, 700, 690), (3, 40, 50)])
def test_normalize_matches_cellpose(shape):
    rng = np.random.default_rng(0)
    img = rng.gamma(2.0, 100.0, size=shape).astype(np.uint16)
    img[-1] = 7 if shape[0] > 1 else img[-1]  # a constant channel becomes 0
    ref = transforms.normalize_img(img.transpose(1, 2, 0), axis=-1).transpose(2, 0, 1)
    np.testing.assert_array_equal(normalize_image(img), ref)


@pytest.mark.parametrize("ly,lx,min_size", [(300, 260, None), (17, 250, None), (40, 50, 256),
                                            (500, 20, 224)])
def test_padding_matches_cellpose(ly, lx, min_size):
    ms = None if min_size is None else (min_size, min_size)
    assert pad_amounts(ly, lx, min_size) == transforms.get_pad_yx(ly, lx, min_size=ms)


@pytest.mark.parametrize("shape", [(224, 224), (64, 80), (256, 256)])
def test_taper_matches_cellpose(shape):
    np.testing.assert_array_equal(taper_mask(*shape), transforms._taper_mask(*shape))


@pytest.mark.parametrize("shape,overlap", [((2, 300, 260), 0.1), ((2, 470, 231), 0.3),
                                           ((2, 224, 224), 0.1)])
def test_tiled_output_matches_cellpose_run_net(tiny_cpnet, shape, overlap):
    img = np.random.default_rng(1).random(shape, dtype=np.float32)
    with TorchRunner(tiny_cpnet) as runner:
        ours = predict_tiled(runner.infer, torch.from_numpy(img), 224, overlap, batch_size=3,
                             fixed_tile=True).numpy()
    ref, _ = core.run_net(CellposeNetAdapter(tiny_cpnet), img.transpose(1, 2, 0)[None],
                          bsize=224, tile_overlap=overlap, batch_size=3)
    np.testing.assert_allclose(ours, ref[0].transpose(2, 0, 1), atol=1e-5, rtol=0)


def test_tiles_of_several_images_share_batches_with_unchanged_results(tiny_cpnet):
    """Small and large images together (CPnet: a small image is one smaller tile of its own
    shape): each result equals the image tiled alone (to the rounding of a convolution at another
    batch size), in fewer network calls."""
    rng = np.random.default_rng(2)
    imgs = [torch.from_numpy(rng.random(s, dtype=np.float32))
            for s in [(2, 100, 120), (2, 300, 260), (2, 90, 100), (2, 100, 120)]]
    calls = []
    with TorchRunner(tiny_cpnet) as runner:
        def predict(tiles):
            calls.append(len(tiles))
            return runner.infer(tiles)

        together = predict_tiled_many(predict, imgs, 224, 0.1, batch_size=8, fixed_tile=False)
        n_together = len(calls)
        alone = [predict_tiled(predict, img, 224, 0.1, batch_size=8, fixed_tile=False) for img in imgs]
    assert n_together < len(calls) - n_together
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("diameter", [None, 45.0, 20.0])
def test_rescaled_prediction_matches_cellpose_eval_internals(tiny_cpsam, diameter):
    img = np.random.default_rng(2).random((2, 150, 130), dtype=np.float32)
    with TorchRunner(tiny_cpsam) as runner:
        ours, rescale = predict_flows(runner, img, SegmentParams(diameter=diameter))
    model = cellpose4_model(tiny_cpsam)
    dP, cellprob, _ = model._run_net(img.transpose(1, 2, 0)[None], rescale=rescale,
                                     bsize=tiny_cpsam.tile_size)
    np.testing.assert_allclose(ours[:2], dP[:, 0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours[2], cellprob[0], atol=1e-5, rtol=0)


def test_d4_round_trip_and_group():
    x = torch.randn(2, 3, 16, 16)
    for k, flip in D4:
        torch.testing.assert_close(d4_inverse(d4_transform(x, k, flip, True), k, flip, True), x)
        torch.testing.assert_close(d4_inverse(d4_transform(x, k, flip), k, flip, False), x)
    views = d4_views(x)
    assert views.shape == (16, 3, 16, 16)
    assert len({tuple(v.flatten()[:20].tolist()) for v in views.chunk(8)}) == 8


def test_flow_equivariance_under_d4():
    """Flows computed from transformed masks equal the transformed flows (the vector rule)."""
    from selfadapt_deploy.postprocess.flow_qc import masks_to_flows
    from selfadapt_deploy.synthetic import random_labels

    labels = random_labels((48, 48), 6, radius=(4, 7), seed=3)
    flows = torch.from_numpy(masks_to_flows(labels))[None]
    for k, flip in D4:
        moved = d4_transform(torch.from_numpy(labels)[None, None], k, flip)[0, 0].numpy()
        expected = d4_transform(flows, k, flip, vector=True)[0]
        # centres of even-sized masks may round differently after a flip: compare directions
        got = torch.from_numpy(masks_to_flows(np.ascontiguousarray(moved)))
        cos = (got * expected).sum(0)[torch.from_numpy(moved > 0)]
        assert cos.mean() > 0.95, (k, flip, cos.mean())


def test_d4_merge_of_equivariant_outputs_has_zero_std():
    field = torch.randn(1, 3, 8, 8)
    outputs = torch.cat([d4_transform(field, k, flip, vector=True) for k, flip in D4])
    mean, std = d4_merge(outputs)
    torch.testing.assert_close(mean, field)
    assert std.abs().max() < 1e-6


def test_tta_prediction_runs_on_non_square_tiles(tiny_cpnet):
    img = np.random.default_rng(4).random((2, 64, 96), dtype=np.float32)
    with TorchRunner(tiny_cpnet) as runner:
        y, _ = predict_flows(runner, img, SegmentParams(tta=True))
    assert y.shape == (3, 64, 96) and np.isfinite(y).all()
