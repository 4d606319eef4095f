"""Sweep: learning rate × λ_L2SP of SelfAdapt, per model family, on the demo's domain shift.

What is measured
    A small source model of the family is trained on clean generated cells (``synthetic.SOURCE``,
    cellpose's loss), then adapted without labels to noisy target images (``synthetic.TARGET``,
    noise ``--noise``) for ``--iterations`` steps with every (lr, λ_L2SP) of the grid, with
    label-free stopping off (``stop=none``) so every run is compared at the same length. For each
    run it prints pooled AP@0.5 / AP@0.75 on held-out *labelled* target images and AP@0.5 on
    held-out source images (forgetting), plus the final FN rate and D_emb (the stopping metrics).

    Families: ``cpnet`` = the demo's CPnet (nbase 1,16,32,64; 112² tiles); ``cpsam`` = a small
    Cellpose-SAM-family ViT (embed 64, depth 4; 64² tiles). These are small networks trained from
    scratch in seconds, not cyto3 / cpsam: the sweep ranks settings on a controlled shift; real
    pretrained networks were checked separately (see the README, "Defaults").

Run (repository root; about 8 minutes per family on 2 CPU cores)::

    python benchmarks/adapt_sweep.py --family cpnet
    python benchmarks/adapt_sweep.py --family cpsam --noise 0.45
"""

from __future__ import annotations

import argparse
import csv
import itertools
import tempfile
import time
from pathlib import Path

import torch

from selfadapt_deploy.models import CPnet, build_cpsam, load_model
from selfadapt_deploy.synthetic import SOURCE, Domain
from selfadapt_deploy.trainer.data import TileSampler, prepare_image
from selfadapt_deploy.trainer.demo import DIAMETER, pooled_ap
from selfadapt_deploy.trainer.loop import AdaptConfig, Validation, adapt
from selfadapt_deploy.trainer.source import SourceConfig, train_source

FAMILIES = {  # network, tile, source training
    "cpnet": (lambda: CPnet((1, 16, 32, 64), diam_mean=DIAMETER), 112,
              SourceConfig(iterations=200)),
    "cpsam": (lambda: build_cpsam(embed_dim=64, depth=4, num_heads=4, bsize=64), 64,
              SourceConfig(iterations=2000, tile=64, batch_size=16, lr=2e-3)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="cpnet")
    parser.add_argument("--lrs", default="1e-5,1e-4,1e-3")
    parser.add_argument("--l2sps", default="1e-4,1e-2,1")
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--noise", type=float, default=0.30, help="target-domain noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build, tile, source_config = FAMILIES[args.family]
    target_domain = Domain(f"target (noise {args.noise:g})", noise=args.noise)
    source = SOURCE.sample(12, seed=args.seed)
    target = target_domain.sample(8, seed=args.seed + 10_000)
    tests = {d.name: d.sample(6, seed=args.seed + 20_000) for d in (SOURCE, target_domain)}

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        net = build()
        tic = time.perf_counter()
        train_source(net, [im for im, _ in source], [lab for _, lab in source], source_config)
        net.save(Path(tmp) / "source.pt")
        before = {name: pooled_ap(net, pairs)[0] for name, pairs in tests.items()}
        print(f"{args.family}: source model trained in {time.perf_counter() - tic:.0f} s; "
              f"target AP@0.5 {before[target_domain.name].ap[0]:.3f} "
              f"AP@0.75 {before[target_domain.name].ap[1]:.3f}, source AP@0.5 "
              f"{before[SOURCE.name].ap[0]:.3f}; {args.iterations} iterations per run")
        train = TileSampler([prepare_image(im, 1.0) for im, _ in target[:6]], tile)
        print(f"{'lr':>8} {'l2sp':>8} {'tgt AP@0.5':>11} {'tgt AP@0.75':>12} {'src AP@0.5':>11} "
              f"{'FN rate':>8} {'D_emb':>7} {'s':>5}")
        for lr, l2sp in itertools.product(map(float, args.lrs.split(",")),
                                          map(float, args.l2sps.split(","))):
            student = load_model(Path(tmp) / "source.pt", "cpu")
            val = Validation.from_images([im for im, _ in target[6:]], 1.0, tile, None)
            run = Path(tmp) / f"run_{lr:g}_{l2sp:g}"
            config = AdaptConfig(iterations=args.iterations, eval_every=args.iterations, lr=lr,
                                 l2sp=l2sp, stop="none", seed=args.seed)
            summary = adapt(student, train, val, run, config)
            adapted = load_model(run / "model.pt", "cpu")
            after = {name: pooled_ap(adapted, pairs)[0] for name, pairs in tests.items()}
            with open(run / "metrics.csv", newline="") as f:
                last = [r for r in csv.DictReader(f) if r["d_emb"]][-1]
            fn, d_emb = last["fn_rate"], last["d_emb"]
            t = after[target_domain.name]
            print(f"{lr:>8.0e} {l2sp:>8.0e} {t.ap[0]:>11.3f} {t.ap[1]:>12.3f} "
                  f"{after[SOURCE.name].ap[0]:>11.3f} {float(fn):>8.3f} {float(d_emb):>7.3f} "
                  f"{summary['seconds']:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
