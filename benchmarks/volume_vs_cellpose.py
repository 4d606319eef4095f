"""Benchmark: 3-D flows → masks (``--do-3d`` after the network), sa-deploy against cellpose 4.2.

What is measured
    The same noisy flows of a generated volume (``--shape``, default 64×512×512, ``--cells``
    touching ellipsoids, planes ``--anisotropy`` apart): unit flows pointing to each cell's
    centre plus Gaussian noise, and a noisy cell probability (``--noise``). Then, stage by stage,

    * **cellpose 4.2**: ``dynamics.follow_flows`` (``steps_interp``: torch ``grid_sample`` in 3-D),
      ``dynamics.get_masks_torch``, ``utils.fill_holes_and_remove_small_masks`` — what
      ``compute_masks(do_3D=True)`` and ``resize_and_compute_masks`` run;
    * **sa-deploy**: ``postprocess.volume_masks.follow_flows_3d`` (the numba integrator,
      ``--integrator``), ``assemble_masks_3d``, ``postprocess.cleanup.fill_holes_and_remove_small``.

    ``--repeats`` alternating rounds, medians, both on the threads torch and numba get by default
    (``--threads`` sets both). The masks must be identical (exit code 2 otherwise).

    ``--device cuda``: both on the GPU — cellpose's ``follow_flows(device=cuda)`` and
    ``get_masks_torch`` there; ours the fused Triton kernel (``--integrator auto``, or torch) and
    the assembly on the GPU. GPU integrators do not round as the CPU does (``../shared/GPU_FACTS.md``),
    so there the masks must agree at AP@0.5 ≥ 0.99 (exit code 2 otherwise).

    **End to end** first (``--e2e-shape``, default 24×128×128; ``--e2e-shape 0 0 0`` skips it): a
    generated volume (``synthetic.random_volume_labels`` / ``render_volume``: touching
    ellipsoids, anisotropic sampling, blur along Z) segmented in 3-D by a small random
    Cellpose-SAM (``build_cpsam``) — ``volume.segment_3d`` against cellpose 4.2's own
    ``CellposeModel.eval(do_3D=True, anisotropy=…)`` running the same network (as the tests do);
    seconds, ratio and AP@0.5 of ours against cellpose's masks (a random net: this times the
    computation; quality is not the point).

Output: per stage seconds and ratio; last line ``ratio=<cellpose s ÷ sa-deploy s, flows → masks>``
(on the CPU; on the GPU with ``--device cuda``).

Run (repository root)::

    python benchmarks/volume_vs_cellpose.py --repeats 2
    python benchmarks/volume_vs_cellpose.py --shape 32 256 256 --cells 300   # a quick look
    python benchmarks/volume_vs_cellpose.py --e2e-shape 32 256 256 --shape 0 0 0   # end to end only
    python benchmarks/volume_vs_cellpose.py --device cuda --integrator auto --e2e-shape 0 0 0   # on a GPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def noisy_flows(shape: tuple[int, int, int], cells: int, anisotropy: float, noise: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(flows 3×Z×Y×X in network units, cellprob logits) of generated cells: 5 × the unit vector
    towards each cell's centre plus noise, cellprob ±3 plus noise."""
    from scipy import ndimage

    from selfadapt_deploy.synthetic import random_volume_labels

    labels = random_volume_labels(shape, cells, radius=(8, 14), anisotropy=anisotropy, seed=seed)
    centres = np.array(ndimage.center_of_mass(labels > 0, labels, np.arange(1, labels.max() + 1)))
    grid = np.indices(shape, dtype=np.float32)
    flows = np.zeros((3, *shape), np.float32)
    inside = labels > 0
    for k in range(3):
        flows[k][inside] = centres[labels[inside] - 1, k] - grid[k][inside]
    flows /= np.linalg.norm(flows, axis=0) + 1e-6
    rng = np.random.default_rng(seed)
    flows = 5 * flows + rng.normal(0, noise, flows.shape).astype(np.float32)
    cellprob = np.where(inside, 3.0, -3.0).astype(np.float32) + rng.normal(0, 1.5, shape).astype(np.float32)
    return flows.astype(np.float32), cellprob


def end_to_end(shape: tuple[int, int, int], anisotropy: float, repeats: int) -> None:
    """``segment_3d`` against cellpose 4.2's ``eval(do_3D=True)``, same small Cellpose-SAM."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stitch_vs_cellpose import alternate, print_stages

    from selfadapt_deploy.metrics import average_precision
    from selfadapt_deploy.models import build_cpsam
    from selfadapt_deploy.runtime import TorchRunner
    from selfadapt_deploy.segment import SegmentParams
    from selfadapt_deploy.synthetic import random_volume_labels, render_volume
    from selfadapt_deploy.volume import segment_3d
    from tests.helpers import cellpose4_model

    net = build_cpsam(seed=0).eval()
    cells = max(4, shape[0] * shape[1] * shape[2] // 6000)
    labels = random_volume_labels(shape, cells, radius=(8, 12), anisotropy=anisotropy, seed=0)
    gray = render_volume(labels, seed=0)
    stack = np.stack([gray, 0.5 * gray, np.zeros_like(gray)], axis=1)  # Z×C×Y×X
    params = SegmentParams(cellprob_threshold=-0.5)
    print(f"end to end: {'×'.join(map(str, shape))} volume, {cells} cells, small Cellpose-SAM "
          f"(tile {net.tile_size}), do_3D, anisotropy {anisotropy:g}", flush=True)

    def ours() -> tuple[np.ndarray, dict]:
        t0 = time.perf_counter()
        with TorchRunner(net) as runner:
            masks, _ = segment_3d(runner, stack, params, anisotropy)
        return masks, {"end to end": time.perf_counter() - t0}

    def theirs() -> tuple[np.ndarray, dict]:
        t0 = time.perf_counter()
        masks, _, _ = cellpose4_model(net).eval(
            stack.transpose(0, 2, 3, 1).copy(), channel_axis=-1, z_axis=0, do_3D=True,
            anisotropy=anisotropy, diameter=30.0 * net.default_diameter / net.diam_mean,
            bsize=net.tile_size, cellprob_threshold=params.cellprob_threshold)
        return masks, {"end to end": time.perf_counter() - t0}

    ours()  # numba compiles (or loads its cache) once
    ref, got, times = alternate(theirs, ours, repeats)
    ap = average_precision(ref, got).ap[0]
    print_stages(times, ("end to end",))
    print(f"  masks: AP@0.5 {ap:.4f} against cellpose's ({int(got.max())} masks; cellpose "
          f"{int(ref.max())}); identical: {bool((ref.astype(np.int64) == got).all())}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512])
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--anisotropy", type=float, default=2.0)
    ap.add_argument("--noise", type=float, default=0.5, help="std of the flow noise (network units)")
    ap.add_argument("--niter", type=int, default=200)
    ap.add_argument("--min-size", type=int, default=15)
    ap.add_argument("--integrator", default="numba", choices=["auto", "numba", "torch", "triton"])
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: flows → masks on the GPU, both sides")
    ap.add_argument("--threads", type=int, default=0, help="torch and numba threads (0: their defaults)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--e2e-shape", type=int, nargs=3, default=[24, 128, 128],
                    help="volume of the end-to-end comparison (0 0 0: skip it)")
    args = ap.parse_args(argv)
    import torch
    from cellpose import dynamics, utils
    from stitch_vs_cellpose import alternate, print_stages

    from selfadapt_deploy.metrics import average_precision
    from selfadapt_deploy.postprocess.cleanup import fill_holes_and_remove_small
    from selfadapt_deploy.postprocess.volume_masks import assemble_masks_3d, follow_flows_3d

    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    if all(args.e2e_shape):
        end_to_end(tuple(args.e2e_shape), args.anisotropy, args.repeats)
    if not all(args.shape):
        return 0
    shape = tuple(args.shape)
    flows, cellprob = noisy_flows(shape, args.cells, args.anisotropy, args.noise, 0)
    fg = cellprob > 0
    device = torch.device(args.device)
    print(f"volume_vs_cellpose: {'×'.join(map(str, shape))} volume, {args.cells} cells, "
          f"{int(fg.sum())} foreground voxels, {args.niter} iterations, {device}, torch threads "
          f"{torch.get_num_threads()}", flush=True)

    def synced() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def ours() -> tuple[np.ndarray, dict]:
        t0 = time.perf_counter()
        inds, pos = follow_flows_3d(flows, cellprob, 0.0, args.niter, args.integrator, device)
        t1 = synced()
        masks = assemble_masks_3d(inds, pos, shape)
        t2 = time.perf_counter()
        masks = fill_holes_and_remove_small(masks, args.min_size)
        return masks, {"follow flows": t1 - t0, "masks": t2 - t1, "clean-up": time.perf_counter() - t2}

    def theirs() -> tuple[np.ndarray, dict]:
        t0 = time.perf_counter()
        inds = np.nonzero(fg)
        p_final = dynamics.follow_flows(flows * fg / 5.0, inds=inds, niter=args.niter, device=device)
        t1 = synced()
        masks = dynamics.get_masks_torch(p_final.int(), inds, shape, max_size_fraction=0.4)
        t2 = time.perf_counter()
        masks = utils.fill_holes_and_remove_small_masks(masks, min_size=args.min_size)
        return masks, {"follow flows": t1 - t0, "masks": t2 - t1, "clean-up": time.perf_counter() - t2}

    crop = (slice(0, 16), slice(0, 64), slice(0, 64))  # numba compiles (or loads its cache) once
    warm = follow_flows_3d(flows[(slice(None), *crop)], cellprob[crop], 0.0, 2, args.integrator, device)
    fill_holes_and_remove_small(assemble_masks_3d(*warm, cellprob[crop].shape), args.min_size)
    ref, got, times = alternate(theirs, ours, args.repeats)
    identical = bool((ref.astype(np.int64) == got).all())
    agreement = average_precision(ref, got).ap[0]
    print(f"masks identical: {identical}, AP@0.5 {agreement:.4f} against cellpose's "
          f"({int(got.max())} masks; cellpose {int(ref.max())})")
    print(f"ratio={print_stages(times, ('follow flows', 'masks', 'clean-up')):.1f}")
    return 0 if identical or (device.type == "cuda" and agreement >= 0.99) else 2


if __name__ == "__main__":
    raise SystemExit(main())
