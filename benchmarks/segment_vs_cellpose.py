"""Benchmark: sa-deploy's segmentation pipeline against cellpose 4.2's own reference pipeline, on CPU.

What is measured
    One synthetic fluorescence image (``selfadapt_deploy.synthetic``; cell diameter = the diameter
    the pipeline assumes ± 20%, i.e. ``--diameter`` or the model's default diameter — for a CPnet
    its ``diam_labels``, as cellpose 3 does) is segmented by

    * **ours**: ``select_channels`` + ``selfadapt_deploy.segment.segment_image`` with a ``TorchRunner``;
    * **cellpose**: ``cellpose.models.CellposeModel.eval`` (cellpose ≥ 4 cannot load a Cellpose 3
      CPnet, so the same network is wrapped by ``tests.helpers.cellpose4_model``; everything
      around the network — normalisation, tiling, blending, dynamics, mask assembly, flow QC,
      clean-up — is cellpose's own code).

    Both use the same CPnet weights, image, rescale factor (cellpose 4 rescales by 30/diameter,
    so it is given ``30·d/diam_mean``) and default settings (niter, thresholds, tile size 224,
    overlap 0.1, batch size 8), in the same process and thread count. Each
    end-to-end call is timed as a whole; per-stage times are taken *inside* that same call by
    temporarily wrapping the stage functions each pipeline looks up at call time (ours:
    ``normalize_image``, ``predict_flows_many``, ``integrate_batch``, ``assemble_masks``,
    ``remove_bad_flow_masks``, ``fill_holes_and_remove_small``; cellpose: ``normalize_img``,
    ``_run_net``, ``follow_flows``, ``get_masks_torch``, ``remove_bad_flow_masks``,
    ``fill_holes_and_remove_small_masks``, ``plot.dx_to_circ``), so the stages add up to the
    end-to-end time minus a small "other" remainder (glue, channel handling). The script stops if
    a stage runs more than once per call or the network stage does not run. Both pipelines are
    warmed up on a small crop first; with ``--repeats N`` the two pipelines alternate (cellpose
    first) and medians are reported.

    To make sure the two did the same work, the script prints the number of masks each found, the
    AP@0.5 / AP@0.9 agreement between our masks and cellpose's (≈ 1.0 expected), and each
    pipeline's AP@0.5 against the synthetic ground truth. It exits with status 2 (after printing
    everything) when the agreement at IoU 0.5 is below 0.9, when no pixel is foreground (the
    post-processing was not exercised) or when the pipelines ran different post-processing stages.

Output
    A header, a stage table (cellpose s, ours s, cellpose/ours), the total, and as the very last
    line ``ratio=<cellpose seconds / ours seconds>`` for the end-to-end time (> 1: ours is faster).

Run (from the repository root; needs cellpose 4.x installed next to sa-deploy)::

    python benchmarks/segment_vs_cellpose.py                      # 1024² image, 2 threads
    python benchmarks/segment_vs_cellpose.py --size 512 --repeats 3 --threads 4
    python benchmarks/segment_vs_cellpose.py --weights path/to/cp3_model.pth --diameter 25

Default weights: ``tests/fixtures/cellpose3/tiny_cyto.pth`` when present, else a default-size
``CPnet()`` (nbase 2,32,64,128,256) initialised with ``torch.manual_seed(0)`` and saved to a
temporary file. Untrained weights predict no foreground, so only normalisation and the network
are compared then (the script says so and exits with status 2): use trained weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.stage_timing import StageClock, patched  # noqa: E402

DEFAULT_WEIGHTS = REPO / "tests" / "fixtures" / "cellpose3" / "tiny_cyto.pth"
FILL_FRACTION = 0.4  # default cell count: cells cover about this fraction of the image
AGREEMENT_MIN = 0.9  # AP@0.5 between the two pipelines' masks below this → exit status 2

# (row label, our stage key, cellpose stage key); None = no counterpart in that pipeline
STAGES: list[tuple[str, str | None, str | None]] = [
    ("normalize", "normalize", "normalize"),
    ("network (resize, tiles, net, blend)", "network", "network"),
    ("flow integration", "integrate", "follow_flows"),
    ("mask assembly", "assemble", "get_masks"),
    ("flow QC", "flow_qc", "flow_qc"),
    ("fill holes / min size", "cleanup", "cleanup"),
    ("flow RGB (cellpose eval output)", None, "dx_to_circ"),
]


def our_targets() -> dict[str, tuple[Any, str]]:
    import selfadapt_deploy.postprocess as post
    import selfadapt_deploy.segment as seg

    return {"normalize": (seg, "normalize_image"), "network": (seg, "predict_flows_many"),
            "integrate": (post, "integrate_batch"), "assemble": (post, "assemble_masks"),
            "flow_qc": (post, "remove_bad_flow_masks"), "cleanup": (post, "fill_holes_and_remove_small")}


def cellpose_targets(model: Any) -> dict[str, tuple[Any, str]]:
    from cellpose import dynamics, plot, transforms, utils

    return {"normalize": (transforms, "normalize_img"), "network": (model, "_run_net"),
            "follow_flows": (dynamics, "follow_flows"), "get_masks": (dynamics, "get_masks_torch"),
            "flow_qc": (dynamics, "remove_bad_flow_masks"),
            "cleanup": (utils, "fill_holes_and_remove_small_masks"), "dx_to_circ": (plot, "dx_to_circ")}


def check_calls(clock: StageClock, who: str) -> None:
    """No stage ran twice and the network ran, else the timings describe some other computation."""
    twice = {k: n for k, n in clock.calls.items() if n > 1}
    if twice or clock.calls.get("network") != 1 or clock.calls.get("normalize") != 1:
        sys.exit(f"error: {who} pipeline ran stages an unexpected number of times: {clock.calls}")


def run_ours(runner: Any, img_1yx: np.ndarray, net: Any, diameter: float | None
             ) -> tuple[np.ndarray, dict[str, float], dict[str, int]]:
    """Our pipeline, end to end: channel selection/padding, then ``segment_image``."""
    from selfadapt_deploy.io import select_channels
    from selfadapt_deploy.segment import SegmentParams, segment_image

    targets = our_targets()
    clock = StageClock()
    with patched(clock, targets):
        t0 = time.perf_counter()
        x = select_channels(img_1yx, None, net.nchan, "benchmark", pad=True)
        seg = segment_image(runner, x, SegmentParams(diameter=diameter), "cpu")
        total = time.perf_counter() - t0
    check_calls(clock, "our")
    return seg.masks, clock.summary(total), clock.calls


def run_cellpose(model: Any, img_cyx: np.ndarray, cp_diameter: float | None, bsize: int
                 ) -> tuple[np.ndarray, dict[str, float], dict[str, int]]:
    """cellpose 4.2's ``CellposeModel.eval`` on the same (channel-padded) image."""
    targets = cellpose_targets(model)
    clock = StageClock()
    img_cyx = img_cyx.copy()  # cellpose 4.2's normalize_img normalises float32 input in place
    with patched(clock, targets):
        t0 = time.perf_counter()
        masks, _, _ = model.eval(img_cyx, channel_axis=0, diameter=cp_diameter, bsize=bsize)
        total = time.perf_counter() - t0
    # _run_net was set on the instance; drop the attribute so the class method shows through again
    model.__dict__.pop("_run_net", None)
    check_calls(clock, "cellpose")
    return masks, clock.summary(total), clock.calls


def default_weights(tmp: Path) -> tuple[Path, str]:
    if DEFAULT_WEIGHTS.is_file():
        return DEFAULT_WEIGHTS, str(DEFAULT_WEIGHTS.relative_to(REPO))
    from selfadapt_deploy.models.cpnet import CPnet

    torch.manual_seed(0)
    path = tmp / "cpnet_seed0.pth"
    torch.save(CPnet().state_dict(), path)
    return path, "random CPnet() nbase 2,32,64,128,256, torch.manual_seed(0) (no tiny_cyto.pth fixture)"


def fmt_ratio(cp: float, ours: float) -> str:
    return f"{cp / ours:8.2f}" if ours > 0 else "     n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, help="Cellpose 3 CPnet weights (default: see module doc)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    ap.add_argument("--cells", type=int, default=None,
                    help=f"cells to place (default: enough to cover ~{FILL_FRACTION:.0%} of the image)")
    ap.add_argument("--diameter", type=float, default=None,
                    help="cell diameter in pixels (default: none, i.e. the model's default diameter); "
                    "cells are drawn at this size, cellpose gets 30·d/diam_mean")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each pipeline (median shown)")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenCV threads (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic image seed")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.size < 32 or args.threads < 1:
        ap.error("--repeats and --threads must be ≥ 1 and --size ≥ 32")

    import cv2
    from cellpose import models as cp_models

    from selfadapt_deploy.metrics import average_precision
    from selfadapt_deploy.models import CPnet, load_model
    from selfadapt_deploy.runtime import TorchRunner
    from selfadapt_deploy.synthetic import random_labels, render
    from tests.helpers import cellpose4_model

    # cellpose's get_masks_torch builds a sparse tensor; torch warns about invariant checks each run
    warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    cp_models.models_logger.setLevel("WARNING")

    with tempfile.TemporaryDirectory() as tmp:
        if args.weights:
            weights, weights_desc = args.weights, str(args.weights)
        else:
            weights, weights_desc = default_weights(Path(tmp))
        net = load_model(weights, "cpu")
    if not isinstance(net, CPnet):
        sys.exit(f"error: {weights} is a {net.family} model; this benchmark drives cellpose with a CPnet")
    diam_mean = float(net.diam_mean)
    # the diameter our pipeline assumes: --diameter, else the model's default (CPnet: diam_labels,
    # cellpose 3's rule). cellpose 4 rescales by 30 / diameter, so it gets 30·d/diam_mean to match.
    diam = args.diameter or float(getattr(net, "default_diameter", diam_mean))
    cp_diameter = 30.0 * diam / diam_mean

    radius = (0.4 * diam, 0.6 * diam)  # cells of the assumed diameter ± 20%
    cells = args.cells or round(FILL_FRACTION * args.size**2 / (np.pi * (diam / 2) ** 2))
    t0 = time.perf_counter()
    gt = random_labels((args.size, args.size), cells, radius=radius, seed=args.seed)
    img = render(gt, seed=args.seed)[None]  # 1×Y×X
    t_synth = time.perf_counter() - t0
    img_cp = np.concatenate([img, np.zeros_like(img)])[: net.nchan]  # what cellpose 3 channels=[0,0] fed

    print("segment_vs_cellpose: sa-deploy segment_image vs cellpose CellposeModel.eval (CPU)")
    print(f"torch {torch.__version__}  cellpose {version('cellpose')}  numpy {np.__version__}  "
          f"threads {torch.get_num_threads()}")
    print(f"weights: {weights_desc}  (diam_mean {diam_mean:g}, nchan {net.nchan}, tile {net.tile_size})")
    print(f"image: {args.size}×{args.size} synthetic, {int(gt.max())} cells placed of {cells} requested, "
          f"radius {radius[0]:.1f}-{radius[1]:.1f} px, seed {args.seed} ({t_synth:.1f}s to make)")
    print(f"diameter: ours {args.diameter or f'none (model default {diam:.4g})'}, cellpose {cp_diameter:.4g} "
          f"(rescale {diam_mean / diam:.4f}), repeats {args.repeats}")

    model = cellpose4_model(net)
    ours_runs: list[dict[str, float]] = []
    cp_runs: list[dict[str, float]] = []
    with TorchRunner(net, "cpu") as runner:
        crop = min(args.size, 256)  # warm-up: first-call allocations, lazy imports, thread pools
        run_ours(runner, img[:, :crop, :crop], net, args.diameter)
        run_cellpose(model, img_cp[:, :crop, :crop], cp_diameter, net.tile_size)
        for _ in range(args.repeats):
            cp_masks, cp_t, cp_calls = run_cellpose(model, img_cp, cp_diameter, net.tile_size)
            our_masks, our_t, our_calls = run_ours(runner, img, net, args.diameter)
            cp_runs.append(cp_t)
            ours_runs.append(our_t)

    def med(runs: list[dict[str, float]], key: str | None) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs) if key else 0.0

    rows = [(label, med(cp_runs, ck), med(ours_runs, ok)) for label, ok, ck in STAGES]
    rows.append(("other (glue, channels)", med(cp_runs, "other"), med(ours_runs, "other")))
    cp_total, our_total = med(cp_runs, "total"), med(ours_runs, "total")

    print()
    print(f"{'stage':<36} {'cellpose s':>10} {'ours s':>10} {'cp/ours':>8}")
    print("-" * 67)
    for label, cp_s, our_s in rows:
        print(f"{label:<36} {cp_s:10.3f} {our_s:10.3f} {fmt_ratio(cp_s, our_s)}")
    print("-" * 67)
    print(f"{'total (end to end)':<36} {cp_total:10.3f} {our_total:10.3f} {fmt_ratio(cp_total, our_total)}")

    agree = average_precision(cp_masks, our_masks)
    ours_gt, cp_gt = average_precision(gt, our_masks), average_precision(gt, cp_masks)
    identical = np.array_equal(cp_masks.astype(np.int64), our_masks.astype(np.int64))
    print()
    print(f"masks found: cellpose {int(cp_masks.max())}, ours {int(our_masks.max())} "
          f"(ground truth {int(gt.max())}); label images identical: {'yes' if identical else 'no'}")
    print(f"agreement ours vs cellpose: AP@0.5 {agree.ap[0]:.4f}  AP@0.9 {agree.ap[2]:.4f}")
    print(f"vs ground truth AP@0.5: cellpose {cp_gt.ap[0]:.4f}, ours {ours_gt.ap[0]:.4f}")
    status = 0
    # the post-processing stages each pipeline ran (cellpose runs its clean-up even on no foreground)
    ran = [(label, our_calls.get(ok, 0), cp_calls.get(ck, 0)) for label, ok, ck in STAGES[2:6]]
    if not (our_calls.get("integrate") and cp_calls.get("follow_flows")):
        print("WARNING: no foreground pixels (cellprob > 0) in one or both pipelines: post-processing "
              "was not exercised; use trained weights (--weights)")
        status = 2
    elif any(o != c for _, o, c in ran):
        print(f"WARNING: the pipelines ran different post-processing stages: {ran}")
        status = 2
    if cp_masks.max() == 0 and our_masks.max() == 0:
        print("WARNING: neither pipeline found a mask: post-processing was barely exercised; "
              "use trained weights (--weights)")
        status = 2
    elif not agree.ap[0] >= AGREEMENT_MIN:
        print(f"WARNING: the pipelines disagree (AP@0.5 {agree.ap[0]:.3f} < {AGREEMENT_MIN}); "
              "the timings compare different work")
        status = 2
    print(f"ratio={cp_total / our_total:.2f}")
    return status


if __name__ == "__main__":
    sys.exit(main())
