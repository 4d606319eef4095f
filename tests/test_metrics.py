"""AP metric: identical to cellpose.metrics.average_precision on sequential labels; gaps handled."""

from __future__ import annotations

import numpy as np
import pytest
from cellpose import metrics as cp_metrics

from selfadapt_deploy.metrics import average_precision, relabel_sequential
from selfadapt_deploy.synthetic import random_labels


def perturbed(labels: np.ndarray, seed: int) -> np.ndarray:
    """A plausible prediction: shifted masks, some dropped, one false positive."""
    rng = np.random.default_rng(seed)
    pred = np.roll(labels, (1, 2), axis=(0, 1)).copy()
    drop = rng.choice(np.arange(1, labels.max() + 1), size=labels.max() // 5, replace=False)
    pred[np.isin(pred, drop)] = 0
    pred[:6, :6] = pred.max() + 1
    return pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_to_cellpose_on_sequential_labels(seed):
    gt = random_labels((160, 170), 40, seed=seed)
    pred = relabel_sequential(perturbed(gt, seed))
    ours = average_precision(gt, pred)
    ap, tp, fp, fn = cp_metrics.average_precision(gt, pred)
    np.testing.assert_allclose(ours.ap, ap, rtol=1e-6)
    assert ours.tp == tuple(tp) and ours.fp == tuple(fp) and ours.fn == tuple(fn)


def test_gapped_labels_are_relabelled_first():
    gt = random_labels((120, 120), 20, seed=3)
    gapped = np.where(gt > 0, gt * 3 + 7, 0)  # same objects, ids with gaps (max label 67)
    assert average_precision(gapped, gt) == average_precision(gt, gt)
    assert average_precision(gapped, gt).ap == (1.0, 1.0, 1.0)


def test_empty_cases():
    gt = random_labels((50, 50), 5, seed=4)
    empty = np.zeros_like(gt)
    assert average_precision(gt, empty).fn == (gt.max(),) * 3
    assert average_precision(empty, gt).fp == (gt.max(),) * 3
    assert np.isnan(average_precision(empty, empty).ap[0])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        average_precision(np.zeros((4, 4), int), np.zeros((4, 5), int))
