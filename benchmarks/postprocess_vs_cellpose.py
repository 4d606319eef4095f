"""Benchmark: flows → masks, ours vs cellpose 4.2's post-processing, on the same flows.

What is measured
    Flows and cell probabilities are made from a synthetic label image (``random_labels``: ~5 000
    cells on 2048², radii 8–12 px; flows = 5 × flows-from-masks + Gaussian noise σ=1, cellprob
    logits ±3 + noise σ=1.5 — what a good network produces, with noise so that flow QC has work).
    On each device present the same inputs go through

    * **cellpose**: ``dynamics.compute_masks`` (follow_flows → get_masks_torch →
      remove_bad_flow_masks) + ``utils.fill_holes_and_remove_small_masks``, cellpose defaults
      (niter 200, cellprob 0, flow threshold 0.4, max size fraction 0.4, min size 15);
    * **ours**: on the CPU ``selfadapt_deploy.postprocess.flows_to_masks`` (numba kernels); on CUDA
      the device-resident ``flows_to_masks_on_device`` (Triton integrator, assembly and flow QC
      on the GPU, one transfer of the labels), upload included; same settings.

    Stages are timed inside the end-to-end call (``stage_timing``); each pipeline runs once to
    warm up (numba compilation, CUDA context) on a small crop. The script prints per-stage times,
    object counts and AP@0.5 between the two label images (agreement), and on CUDA the Triton
    integrator's effective memory bandwidth (8 field reads of 4 bytes per pixel per step).
    It exits with status 2 if the agreement is below 0.99.

Output: the last line is ``ratio=<cellpose s / ours s>`` for the whole flows → masks step on CPU
at the first size.

Run (repository root)::

    python benchmarks/postprocess_vs_cellpose.py                 # 2048² and 4096², 2 threads
    python benchmarks/postprocess_vs_cellpose.py --sizes 1024 --threads 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.stage_timing import StageClock, patched  # noqa: E402

STAGES = [("flow integration", "integrate", "follow_flows"), ("mask assembly", "assemble", "get_masks"),
          ("flow QC", "flow_qc", "flow_qc"), ("fill holes / min size", "cleanup", "cleanup")]
AGREEMENT_MIN = 0.99


def make_flows(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from selfadapt_deploy.postprocess.flow_qc import masks_to_flows
    from selfadapt_deploy.synthetic import random_labels

    n_cells = int(5000 * (size / 2048) ** 2)
    labels = random_labels((size, size), n_cells, radius=(8, 12), seed=seed)
    rng = np.random.default_rng(seed)
    flows = (5 * masks_to_flows(labels) + rng.normal(0, 1.0, (2, size, size))).astype(np.float32)
    cellprob = (np.where(labels > 0, 3.0, -3.0) + rng.normal(0, 1.5, (size, size))).astype(np.float32)
    return labels, flows, cellprob


def run_cellpose(flows, cellprob, device) -> tuple[np.ndarray, dict[str, float]]:
    from cellpose import dynamics, utils

    clock = StageClock()
    targets = {"follow_flows": (dynamics, "follow_flows"), "get_masks": (dynamics, "get_masks_torch"),
               "flow_qc": (dynamics, "remove_bad_flow_masks"),
               "cleanup": (utils, "fill_holes_and_remove_small_masks")}
    with patched(clock, targets):
        tic = time.perf_counter()
        masks = dynamics.compute_masks(flows, cellprob, niter=200, cellprob_threshold=0.0,
                                       flow_threshold=0.4, max_size_fraction=0.4, device=device)
        masks = utils.fill_holes_and_remove_small_masks(masks, min_size=15)
        sync(device)
        total = time.perf_counter() - tic
    return masks, clock.summary(total)


def run_ours(flows, cellprob, device) -> tuple[np.ndarray, dict[str, float]]:
    """The host path on the CPU; on a GPU the device-resident path (upload included, as cellpose
    uploads its numpy flows itself), which ``sa-deploy segment --device cuda`` runs."""
    import selfadapt_deploy.postprocess as post

    clock = StageClock()
    if device.type == "cpu":
        targets = {"integrate": (post, "integrate_batch"), "assemble": (post, "assemble_masks"),
                   "flow_qc": (post, "remove_bad_flow_masks"),
                   "cleanup": (post, "fill_holes_and_remove_small")}
    else:
        targets = {"integrate": (post, "integrate_tensors"), "assemble": (post, "assemble_masks_torch"),
                   "flow_qc": (post, "flow_errors_torch"),
                   "cleanup": (post, "fill_holes_and_remove_small")}
    with patched(clock, targets):
        tic = time.perf_counter()
        if device.type == "cpu":
            masks = post.flows_to_masks(flows, cellprob, post.MaskParams(), device)
        else:
            masks = post.flows_to_masks_on_device(torch.from_numpy(flows[None]).to(device),
                                                  torch.from_numpy(cellprob[None]).to(device))[0]
        sync(device)
        total = time.perf_counter() - tic
    return masks, clock.summary(total)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_bandwidth(flows, cellprob, device) -> str:
    """Effective bandwidth of the Triton integrator alone (field reads it issues / time)."""
    from selfadapt_deploy.postprocess.integrate import _run_triton, prepare

    problem = prepare(torch.from_numpy(flows[None]).to(device), torch.from_numpy(cellprob[None]).to(device),
                      0.0)
    _run_triton(problem, 200)
    sync(device)
    tic = time.perf_counter()
    _run_triton(problem, 200)
    sync(device)
    seconds = time.perf_counter() - tic
    n = len(problem.start)
    gbytes = n * 200 * 8 * 4 / 1e9
    return (f"triton integrator alone: {n} pixels x 200 steps in {seconds * 1e3:.1f} ms = "
            f"{gbytes / seconds:.0f} GB/s of field reads (mostly served by L1/L2)")


def compare(size: int, device: torch.device) -> float:
    from selfadapt_deploy.metrics import average_precision

    labels, flows, cellprob = make_flows(size)
    crop = (slice(0, 256), slice(0, 256))
    run_cellpose(flows[:, crop[0], crop[1]], cellprob[crop], device)  # warm-up
    run_ours(flows[:, crop[0], crop[1]], cellprob[crop], device)
    theirs, t_cp = run_cellpose(flows, cellprob, device)
    ours, t_us = run_ours(flows, cellprob, device)
    print(f"\n{size}x{size}, {labels.max()} true cells, device {device}")
    print(f"{'stage':<24} {'cellpose s':>11} {'ours s':>9} {'cp/ours':>8}")
    for label, ours_key, cp_key in STAGES:
        a, b = t_cp.get(cp_key, 0.0), t_us.get(ours_key, 0.0)
        print(f"{label:<24} {a:>11.3f} {b:>9.3f} {a / max(b, 1e-9):>8.1f}")
    print(f"{'other':<24} {t_cp['other']:>11.3f} {t_us['other']:>9.3f}")
    ratio = t_cp["total"] / t_us["total"]
    print(f"{'total (flows → masks)':<24} {t_cp['total']:>11.3f} {t_us['total']:>9.3f} {ratio:>8.1f}")
    agreement = average_precision(theirs, ours).ap[0]
    print(f"masks: cellpose {theirs.max()}, ours {ours.max()}; AP@0.5 ours vs cellpose {agreement:.4f}")
    if device.type == "cuda":
        print(kernel_bandwidth(flows, cellprob, device))
    if agreement < AGREEMENT_MIN:
        print(f"agreement below {AGREEMENT_MIN}: the comparison is not valid")
        sys.exit(2)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, numba {numba.__version__}, {args.threads} CPU threads"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"))
    ratios = {}
    for device in devices:
        for size in map(int, args.sizes.split(",")):
            ratios[device.type, size] = compare(size, device)
    print("\nsummary: " + ", ".join(f"{d} {s}²: {r:.1f}x" for (d, s), r in ratios.items()))
    first = int(args.sizes.split(",")[0])
    print(f"ratio={ratios['cpu', first]:.2f}")


if __name__ == "__main__":
    main()
