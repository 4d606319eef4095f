"""Benchmark: sa-deploy's GPU path against cellpose 4.2 on one GPU, in one run, both families.

What is measured (every figure of ours next to cellpose's, same process, same GPU)
    1. **Network alone, tiles/s** on device tensors (no host copies on either side):
       Cellpose-SAM ViT-L (full size, 256² tiles) and a cyto-size CPnet (nbase 2,32,64,128,256,
       224² tiles). cellpose: the network as cellpose 4.2 runs it on a GPU — weights cast to bf16,
       eager. ours: ``TorchRunner`` at ``--precision auto`` (Cellpose-SAM bf16 with SDPA
       attention, CPnet fp16 channels-last), eager and ``--compile``. Batches of 8 and 32, and
       the peak GPU memory each tile batch takes (to size ``--batch-size``).
    2. **Flows → masks** on 2048² (~5k cells) and 4096² (~20k cells) synthetic flows:
       cellpose's ``dynamics.compute_masks`` on the GPU vs our device-resident
       ``flows_to_masks_on_device`` (``benchmarks/postprocess_vs_cellpose.py``'s comparison).
    3. **End to end** on one 2048² image (tiled from a real bbbc047 frame when ../shared/data is
       present, else synthetic): ``CellposeModel.eval`` with its defaults (bf16 network, numpy
       tiles, its GPU dynamics) vs ``segment_images`` (device pipeline, ``--precision auto``,
       ``--compile`` unless ``--no-compile``), per stage, and the AP@0.5 agreement of the masks.

Weights: full-size networks built in-process from ``torch.manual_seed(0)`` (identical weights on
both sides), unless real ones are given (``--cpsam-weights``, ``--cpnet-weights``; cellpose's
cache ``~/.cellpose/models/cpsam`` is used when present). Random weights measure the network
fairly; their masks are not meaningful, so the agreement is printed, not required.

Output: tables per section; the last line is ``ratio=<cellpose s / ours s>``, end to end, the
smaller of the two families (> 1: ours is faster).

Run (repository root; cellpose 4.2 installed)::

    python benchmarks/gpu_vs_cellpose.py                     # on a CUDA machine
    python benchmarks/gpu_vs_cellpose.py --device cpu --small  # checks the script itself (tiny nets)

On a machine without CUDA (and without ``--device cpu``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "bbbc047" / "cdp2bioactives_h23.ome.tif"
CELLPOSE_CACHE_CPSAM = Path.home() / ".cellpose" / "models" / "cpsam"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_nets(small: bool, cpsam_weights: Path | None, cpnet_weights: Path | None):
    """(Cellpose-SAM wrapper, CPnet, description) with the weights both sides use."""
    from selfadapt_deploy.models import CPnet, build_cpsam, load_model
    from selfadapt_deploy.models.cpsam import VITL, CellposeSAM, _cpsam_class

    torch.manual_seed(0)
    if cpsam_weights is not None:
        cpsam, what_sam = load_model(str(cpsam_weights)), str(cpsam_weights)
    elif small:
        cpsam, what_sam = build_cpsam(seed=0), "small random CPSAM (--small)"
    else:
        cpsam, what_sam = CellposeSAM(_cpsam_class()(dtype=torch.float32)), f"random ViT-L {VITL}"
    if cpnet_weights is not None:
        cpnet, what_net = load_model(str(cpnet_weights)), str(cpnet_weights)
    else:
        nbase = (2, 8, 16, 32) if small else (2, 32, 64, 128, 256)
        cpnet, what_net = CPnet(nbase), f"random CPnet nbase {nbase}"
    return cpsam.eval(), cpnet.eval(), f"Cellpose-SAM: {what_sam}; CPnet: {what_net}"


def tiles_per_second(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device,
                     repeats: int) -> tuple[float, float]:
    """(tiles/s, peak GPU MiB of one call) after two warm-up calls (compilation, autotuning)."""
    with torch.inference_mode():
        fn(x)
        fn(x)
        sync(device)
        peak = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn(x)
            sync(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x)
        sync(device)
    return repeats * len(x) / (time.perf_counter() - t0), peak


def cellpose_network(net, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network as cellpose 4.2 runs it on a GPU: a bf16 copy, eager (CPSAM: its own forward)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from selfadapt_deploy.models import CellposeSAM

    is_cpsam = isinstance(net, CellposeSAM)
    inner = copy.deepcopy(net.net if is_cpsam else net).to(device, dtype).eval()
    if is_cpsam:
        return lambda x: inner(x.to(dtype))[0].float()
    return lambda x: inner(x.to(dtype)).float()


def network_section(nets, device: torch.device, batches: list[int], repeats: int, compile: bool) -> None:
    from selfadapt_deploy.runtime import TorchRunner

    print("\n1. network alone, tiles/s on device tensors (peak GPU MiB per batch)")
    print(f"{'model':<8} {'batch':>5} {'cellpose bf16':>14} {'ours auto':>14} {'ours compiled':>14} "
          f"{'ours/cp':>8} {'best/cp':>8}")
    for net in nets:
        net = net.to(device)
        cp = cellpose_network(net, device)
        runners = [TorchRunner(net, device, "auto")]
        if compile:
            runners.append(TorchRunner(net, device, "auto", compile=True))
        for r in runners:
            r.activate()
        for b in batches:
            x = torch.rand(b, net.nchan, net.tile_size, net.tile_size, device=device)
            t_cp, m_cp = tiles_per_second(cp, x, device, repeats)
            ours = [tiles_per_second(r.infer, x, device, repeats) for r in runners]
            best = max(t for t, _ in ours)
            cells = [f"{t:8.1f} ({m:5.0f})" for t, m in [(t_cp, m_cp), *ours]]
            cells += [""] * (3 - len(cells))
            print(f"{net.family:<8} {b:>5} " + " ".join(f"{c:>14}" for c in cells)
                  + f" {ours[0][0] / t_cp:>8.2f} {best / t_cp:>8.2f}")
        for r in runners:
            r.deactivate()
        print(f"{'':<8} ours: {runners[0].name}")


def postprocess_section(sizes: list[int], device: torch.device) -> None:
    from benchmarks.postprocess_vs_cellpose import compare

    print("\n2. flows → masks (cellpose dynamics.compute_masks vs ours on the device)")
    for size in sizes:
        compare(size, device)


def test_image(size: int) -> np.ndarray:
    """1×size×size float32: a real Cell Painting frame mirrored to size, or synthetic cells."""
    if DATA.is_file():
        from selfadapt_deploy.io import read_images

        frame = read_images(DATA, series=1)[0].data[0].astype(np.float32)
        reps = (-(-size // frame.shape[0]), -(-size // frame.shape[1]))
        tiled = np.block([[frame if (i + j) % 2 == 0 else frame[::-1, ::-1] for j in range(reps[1])]
                          for i in range(reps[0])])
        return tiled[None, :size, :size].copy()
    from selfadapt_deploy.synthetic import random_labels, render

    return render(random_labels((size, size), int(5000 * (size / 2048) ** 2), seed=0), seed=0)[None]


def cellpose_model(net, device: torch.device):
    """``cellpose.models.CellposeModel`` running ``net`` as cellpose 4.2 would on ``device``: bf16
    weights on a GPU; Cellpose-SAM as its own ``CPSAM`` module, CPnet through the test adapter."""
    from tests.helpers import cellpose4_model

    model = cellpose4_model(net)  # CellposeNetAdapter: .device/.dtype and (outputs, style)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.net.net = copy.deepcopy(net).to(device, dtype).eval()
    model.net.dtype = dtype
    model.device, model.gpu = device, device.type == "cuda"
    return model


def end_to_end_section(nets, device: torch.device, size: int, compile: bool) -> list[float]:
    from selfadapt_deploy.io import select_channels
    from selfadapt_deploy.metrics import average_precision
    from selfadapt_deploy.runtime import TorchRunner
    from selfadapt_deploy.segment import SegmentParams, segment_images

    img = test_image(size)
    print(f"\n3. end to end, one {size}² image ({'real frame, mirrored' if DATA.is_file() else 'synthetic'})")
    print(f"{'model':<8} {'cellpose s':>11} {'ours s':>9} {'cp/ours':>8}  ours per stage (s)"
          "   masks cp/ours  AP@0.5")
    ratios = []
    for net in nets:
        net = net.to(device)
        x = select_channels(img, None, net.nchan, "benchmark", pad=True)
        params = SegmentParams(pipeline="device")
        model = cellpose_model(net, device)
        with TorchRunner(net, device, "auto", compile=compile) as runner:
            crop = x[:, : net.tile_size * 2, : net.tile_size * 2]
            segment_images(runner, [crop], params)  # warm-up: compilation, CUDA context, numba
            model.eval(crop.copy(), channel_axis=0, diameter=30.0 * net.default_diameter / net.diam_mean,
                       bsize=net.tile_size)
            sync(device)
            t0 = time.perf_counter()
            cp_diameter = 30.0 * net.default_diameter / net.diam_mean  # cellpose 4 assumes 30
            theirs = model.eval(x.copy(), channel_axis=0, diameter=cp_diameter, bsize=net.tile_size)[0]
            sync(device)
            t_cp = time.perf_counter() - t0
            t0 = time.perf_counter()
            seg = segment_images(runner, [x], params)[0]
            t_us = time.perf_counter() - t0
        stages = " ".join(f"{k[:4]} {v:.3f}" for k, v in seg.timings.items())
        found = theirs.max() > 0 and seg.masks.max() > 0
        agreement = average_precision(theirs, seg.masks).ap[0] if found else float("nan")
        print(f"{net.family:<8} {t_cp:>11.3f} {t_us:>9.3f} {t_cp / t_us:>8.2f}  {stages}  "
              f"{theirs.max()}/{seg.masks.max()}  {agreement:.3f}")
        ratios.append(t_cp / t_us)
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda",
                    help="cuda (default) or cpu (with --small: a check of the script)")
    ap.add_argument("--small", action="store_true", help="tiny networks and sizes")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--cpsam-weights", type=Path, default=None)
    ap.add_argument("--cpnet-weights", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_vs_cellpose: no CUDA device on this machine; nothing measured "
              "(run it on a GPU, or with --device cpu --small to check the script)")
        return 0
    device = torch.device(args.device)
    if args.cpsam_weights is None and CELLPOSE_CACHE_CPSAM.is_file() and not args.small:
        args.cpsam_weights = CELLPOSE_CACHE_CPSAM
    cpsam, cpnet, what = build_nets(args.small, args.cpsam_weights, args.cpnet_weights)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import cellpose

    print(f"gpu_vs_cellpose on {gpu}: torch {torch.__version__}, cellpose {cellpose.version}")
    print(f"weights: {what}")
    network_section([cpsam, cpnet], device, [2, 4] if args.small else [8, 32], args.repeats, args.compile)
    postprocess_section([256] if args.small else [2048, 4096], device)
    ratios = end_to_end_section([cpsam, cpnet], device, 256 if args.small else 2048, args.compile)
    print(f"ratio={min(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
