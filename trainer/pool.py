"""The candidate pool: every candidate's predictions on the held-out images, kept on disk, and the
consensus of the pool (EnsV, Hu et al., NeurIPS 2024) that scores each candidate without labels.

A candidate is θ0, a snapshot or a weight average (:mod:`averaging`). At every evaluation the loop
already segments the held-out images with the snapshot; those network outputs (float16) and masks
go to ``pool/<candidate>/<k>.npz`` instead of being thrown away, so selection costs no extra
inference, and memory holds one image of one candidate at a time however many candidates and
however large the images are.

Consensus: the pool's mean network output (flows and cell-probability logits, as cellpose's own
tile and TTA averaging combine outputs) on each held-out image, turned into masks by the ordinary
dynamics; a candidate's score is its agreement with those masks, TP/(TP+FP+FN) at IoU 0.5 and
0.75, pooled over the images. Averaging cancels what candidates disagree on, so the consensus is
at least as good as the average candidate wherever errors are not shared, and the candidate
closest to it is never the worst of the pool (EnsV's guarantee).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.writers import atomic_path
from selfadapt_deploy.metrics import APResult, average_precision, pooled
from selfadapt_deploy.postprocess import MaskParams, flows_to_masks
from selfadapt_deploy.postprocess.volume_masks import flows_to_masks_3d
from selfadapt_deploy.segment import Segmentation

POOL = "pool"  # the run directory's folder of predictions
AGREEMENT_IOUS = (0.5, 0.75)


def agreement(reference: Sequence[np.ndarray], masks: Sequence[np.ndarray],
              ious: tuple[float, ...] = AGREEMENT_IOUS) -> tuple[float, ...]:
    """TP/(TP+FP+FN) of ``masks`` against ``reference`` at each IoU, pooled over the images;
    1.0 where neither has an object."""
    return _agreement([average_precision(r, m, ious) for r, m in zip(reference, masks, strict=True)])


def _agreement(results: Sequence[APResult]) -> tuple[float, ...]:
    total = pooled(results)
    return tuple(1.0 if t + p + n == 0 else a
                 for a, t, p, n in zip(total.ap, total.tp, total.fp, total.fn, strict=True))


class PredictionPool:
    """Network outputs (3×Y×X float16: dY, dX, cellprob logit; 4×Z×Y×X for a volume segmented in
    3-D) and masks of each candidate on each held-out image, one ``.npz`` per (candidate, image),
    written atomically."""

    def __init__(self, root: Path, n_images: int):
        self.root, self.n_images = Path(root), n_images

    def _path(self, name: str, k: int) -> Path:
        return self.root / name / f"{k}.npz"

    def add(self, name: str, segs: Sequence[Segmentation]) -> None:
        """Store a candidate's segmentations of the held-out images (replacing any earlier ones)."""
        if len(segs) != self.n_images:
            raise ValueError(f"pool holds {self.n_images} images per candidate, got {len(segs)}")
        for k, seg in enumerate(segs):
            with atomic_path(self._path(name, k)) as tmp, open(tmp, "wb") as f:
                np.savez(f, output=np.asarray(seg.output, np.float16), masks=seg.masks)

    def has(self, name: str) -> bool:
        return all(self._path(name, k).is_file() for k in range(self.n_images))

    def output(self, name: str, k: int) -> np.ndarray:
        """Candidate ``name``'s network output on image ``k`` (float32)."""
        return self._load(name, k)["output"].astype(np.float32)

    def masks(self, name: str, k: int) -> np.ndarray:
        return self._load(name, k)["masks"]

    def segmentations(self, name: str) -> list[Segmentation]:
        """Candidate ``name``'s segmentations of every held-out image, as stored."""
        return [Segmentation(masks=self.masks(name, k), output=self.output(name, k))
                for k in range(self.n_images)]

    def _load(self, name: str, k: int):
        path = self._path(name, k)
        if not path.is_file():
            raise SaDeployError(f"{path}: the predictions of candidate '{name}' are missing; the run "
                                "directory is incomplete (resume it, or re-run the adaptation)")
        return np.load(path)

    def consensus_masks(self, members: Mapping[str, float], k: int, params: MaskParams) -> np.ndarray:
        """Masks of the weighted mean output of ``members`` (name → weight) on image ``k``."""
        total = sum(members.values())
        if not members or total <= 0:
            raise ValueError("a consensus needs at least one member with a positive weight")
        mean = None
        for name, weight in members.items():
            y = self.output(name, k) * np.float32(weight / total)
            mean = y if mean is None else mean + y
        if mean.ndim == 4:  # a volume segmented in 3-D: dZ, dY, dX, cellprob
            return flows_to_masks_3d(mean[:3], mean[3], params)
        return flows_to_masks(mean[:2], mean[2], params)

    def consensus_scores(self, members: Mapping[str, float], scored: Sequence[str],
                         params: MaskParams) -> dict[str, tuple[float, ...]]:
        """Agreement (at :data:`AGREEMENT_IOUS`) of every ``scored`` candidate's masks with the
        consensus of ``members``; one image of one candidate in memory at a time."""
        counts: dict[str, list] = {name: [] for name in scored}
        for k in range(self.n_images):
            reference = self.consensus_masks(members, k, params)
            for name in scored:
                counts[name].append(average_precision(reference, self.masks(name, k), AGREEMENT_IOUS))
        return {name: _agreement(results) for name, results in counts.items()}

    def bytes_per_candidate(self, name: str) -> int:
        """Disk used by one candidate's predictions (for the cost report)."""
        return sum(self._path(name, k).stat().st_size for k in range(self.n_images))
