"""Benchmark: linking a Z-stack's plane masks into 3-D labels, sa-deploy against cellpose 4.2.

What is measured
    The part of ``segment --stitch-threshold`` after the network, on the same per-plane label
    images: a generated volume (``--shape``, default 64×512×512, ``--cells`` ellipsoids, planes
    ``--anisotropy`` pixels apart) cut into planes, each plane relabelled 1..N on its own (what the
    2-D pipeline gives per plane), then

    * **cellpose**: ``utils.stitch3D(masks, stitch_threshold)`` and
      ``utils.fill_holes_and_remove_small_masks(masks, min_size=15)``;
    * **sa-deploy**: ``postprocess.stitch.PlaneStitcher`` fed plane by plane and
      ``postprocess.cleanup.fill_holes_and_remove_small`` (the numba 3-D hole filling).

    Stage by stage, ``--repeats`` alternating rounds, medians; the labels must be identical.

Output: per stage seconds and ratio; last line ``ratio=<cellpose s ÷ sa-deploy s, stitch + clean-up>``.

Run (repository root)::

    python benchmarks/stitch_vs_cellpose.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

Run = Callable[[], tuple[np.ndarray, dict]]  # one side's labels and its seconds per stage


def alternate(theirs: Run, ours: Run, repeats: int) -> tuple[np.ndarray, np.ndarray, dict[str, list[dict]]]:
    """``repeats`` alternating rounds, cellpose first: (cellpose's labels, ours, stage seconds)."""
    times: dict[str, list[dict]] = {"cellpose": [], "ours": []}
    for _ in range(repeats):
        ref, t = theirs()
        times["cellpose"].append(t)
        got, t = ours()
        times["ours"].append(t)
    return ref, got, times


def print_stages(times: dict[str, list[dict]], stages: tuple[str, ...]) -> float:
    """Per stage: median seconds of both and their ratio; the total's seconds. Returns the total
    ratio (cellpose ÷ ours)."""
    width = max(len(s) for s in (*stages, "total")) + 2
    total = {}
    for stage in stages:
        c = statistics.median(t[stage] for t in times["cellpose"])
        o = statistics.median(t[stage] for t in times["ours"])
        total[stage] = (c, o)
        print(f"  {stage:<{width}} cellpose {c:8.2f} s   sa-deploy {o:8.3f} s   ratio {c / o:6.1f}")
    c, o = (sum(v[i] for v in total.values()) for i in (0, 1))
    print(f"  {'total':<{width}} cellpose {c:8.2f} s   sa-deploy {o:8.3f} s")
    return c / o


def plane_masks(shape: tuple[int, int, int], cells: int, anisotropy: float, seed: int) -> np.ndarray:
    """Per-plane labels (each plane 1..N) of a generated volume of ellipsoids."""
    from selfadapt_deploy.synthetic import random_volume_labels

    labels = random_volume_labels(shape, cells, radius=(8, 14), anisotropy=anisotropy, seed=seed)
    out = np.zeros(shape, np.uint16)
    for k, plane in enumerate(labels):
        present = np.unique(plane)
        lookup = np.zeros(int(plane.max()) + 1, np.uint16)
        lookup[present] = np.arange(len(present))
        out[k] = lookup[plane]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512])
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--anisotropy", type=float, default=2.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from cellpose import utils

    from selfadapt_deploy.postprocess.cleanup import fill_holes_and_remove_small
    from selfadapt_deploy.postprocess.stitch import PlaneStitcher

    masks = plane_masks(tuple(args.shape), args.cells, args.anisotropy, 0)
    print(f"stitch_vs_cellpose: {'×'.join(map(str, args.shape))} stack, "
          f"{int(sum(p.max() for p in masks))} plane masks, threshold {args.threshold}")

    def ours() -> tuple[np.ndarray, dict]:
        t0 = time.perf_counter()
        stitcher = PlaneStitcher(args.threshold)
        linked = np.stack([stitcher.add(p) for p in masks])
        t1 = time.perf_counter()
        clean = fill_holes_and_remove_small(linked, 15)
        return clean, {"stitch": t1 - t0, "clean-up": time.perf_counter() - t1}

    def theirs() -> tuple[np.ndarray, dict]:
        t0 = time.perf_counter()
        linked = utils.stitch3D(masks.copy(), stitch_threshold=args.threshold)
        t1 = time.perf_counter()
        clean = utils.fill_holes_and_remove_small_masks(linked, min_size=15)
        return clean, {"stitch": t1 - t0, "clean-up": time.perf_counter() - t1}

    ours()  # numba compiles once
    ref, got, times = alternate(theirs, ours, args.repeats)
    identical = bool((ref.astype(np.int64) == got).all())
    print(f"labels identical: {identical} ({int(got.max())} 3-D masks)")
    print(f"ratio={print_stages(times, ('stitch', 'clean-up')):.1f}")
    return 0 if identical else 2


if __name__ == "__main__":
    raise SystemExit(main())
