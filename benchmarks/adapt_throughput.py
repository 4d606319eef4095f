"""Benchmark: SelfAdapt iterations per second, batched teacher TTA vs one teacher forward per view.

What is measured
    Full optimisation steps (``selfadapt_deploy.trainer.step.train_step``: teacher TTA → confidence
    masks → augmented student → loss + L2-SP → AdamW → EMA) on random tiles cut from synthetic
    cell images, for each model below, in two modes that differ only in the teacher:

    * **batched**: the 8 D4 views of the batch go through the teacher in *one* forward (B·8 tiles);
    * **per view**: 8 forwards of B tiles each (``teacher_predict(..., batched=False)``).

    Both modes give the same pseudo-labels (tests/test_trainer_parts.py asserts it), so the
    difference is launch/parallelism overhead only. Each mode runs ``--warmup`` steps, then
    ``--steps`` timed steps; the modes alternate per repeat and medians are reported. The teacher
    forward alone is timed too (the part that changes).

Models (``--models``, comma-separated)
    ``cpnet``        Cellpose 3 U-Net of cyto3's size (nbase 2,32,64,128,256), 224² tiles
    ``cpnet-demo``   the demo's small CPnet (nbase 1,16,32,64), 112² tiles
    ``cpsam-small``  a small Cellpose-SAM-family ViT (``build_cpsam()``), 64² tiles
    ``cpsam``        full Cellpose-SAM (ViT-L, 300 M parameters), 256² tiles — GPU only in practice

Output
    One row per model: steps/s batched, steps/s per view, teacher ms both ways; the last line is
    ``ratio=<batched steps/s ÷ per-view steps/s>`` of the first model (> 1: batching helps).

Run (repository root)::

    python benchmarks/adapt_throughput.py                              # CPU, cpnet + cpsam-small
    python benchmarks/adapt_throughput.py --device cuda --models cpnet,cpsam --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from selfadapt_deploy.models import CPnet, build_cpsam
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.synthetic import TARGET
from selfadapt_deploy.trainer.augment import StrongAugment
from selfadapt_deploy.trainer.confidence import ConfidenceMasks
from selfadapt_deploy.trainer.data import TileSampler, prepare_image
from selfadapt_deploy.trainer.ema import EMA
from selfadapt_deploy.trainer.step import Adaptation, Backprop, train_step
from selfadapt_deploy.trainer.teacher import teacher_predict


def build(name: str) -> SegmentationNet:
    torch.manual_seed(0)
    if name == "cpnet":
        return CPnet((2, 32, 64, 128, 256))
    if name == "cpnet-demo":
        return CPnet((1, 16, 32, 64))
    if name == "cpsam-small":
        return build_cpsam()
    if name == "cpsam":
        from cellpose.vit import CPSAM

        from selfadapt_deploy.models.cpsam import CellposeSAM

        return CellposeSAM(CPSAM())
    raise SystemExit(f"unknown model '{name}' (cpnet, cpnet-demo, cpsam-small, cpsam)")


def tile_size(name: str, net: SegmentationNet) -> int:
    return 112 if name == "cpnet-demo" else net.tile_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(net: SegmentationNet, sampler: TileSampler, batched: bool, args) -> float:
    """Seconds per optimisation step (median over the timed steps)."""
    params = [p for p in net.parameters() if p.requires_grad]
    cuda = net.device.type == "cuda"
    state = Adaptation(student=net, teacher=EMA(net), optimizer=torch.optim.AdamW(params, lr=1e-5),
                       anchors=[p.detach().clone() for p in params], masks=ConfidenceMasks(),
                       augment=StrongAugment(), batched_teacher=batched,
                       # bf16 autocast on CUDA: the trainer's CUDA default
                       backprop=Backprop(net.device, torch.bfloat16 if cuda else None))
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(args.warmup + args.steps):
        x = sampler.sample(args.batch_size, g)
        sync(net.device)
        tic = time.perf_counter()
        train_step(state, x, step, g)  # ends in .item(): synchronous
        times.append(time.perf_counter() - tic)
    return statistics.median(times[args.warmup:])


@torch.no_grad()
def time_teacher(net: SegmentationNet, x: torch.Tensor, batched: bool, repeats: int) -> float:
    net.eval()
    x = x.to(net.device)
    times = []
    for _ in range(repeats + 1):
        sync(net.device)
        tic = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=net.device.type == "cuda"):
            teacher_predict(net, x, batched)
        sync(net.device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cpnet,cpsam-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds of both modes")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {args.threads} threads") + f", batch {args.batch_size} tiles, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    images = [im for im, _ in TARGET.sample(4, (320, 320), n_cells=120, seed=0)]
    print(f"{'model':<12} {'tile':>5} {'batched it/s':>13} {'per-view it/s':>14} "
          f"{'teacher ms (batched / per view)':>32} {'ratio':>6}")
    ratios = []
    for name in args.models.split(","):
        net = build(name).to(device)
        tile = tile_size(name, net)
        nchan = net.nchan
        sampler = TileSampler([prepare_image(im, 1.0)[:1].repeat(nchan, 0) for im in images], tile)
        batched, per_view = [], []
        for _ in range(args.repeats):
            batched.append(time_steps(net, sampler, True, args))
            per_view.append(time_steps(net, sampler, False, args))
        x = sampler.sample(args.batch_size, torch.Generator().manual_seed(1))
        t_b, t_v = (time_teacher(net, x, b, args.steps) for b in (True, False))
        sb, sv = statistics.median(batched), statistics.median(per_view)
        ratios.append(sv / sb)
        print(f"{name:<12} {tile:>5} {1 / sb:>13.2f} {1 / sv:>14.2f} "
              f"{1e3 * t_b:>15.1f} / {1e3 * t_v:<14.1f} {sv / sb:>6.2f}")
    print(f"ratio={ratios[0]:.2f}")


if __name__ == "__main__":
    main()
