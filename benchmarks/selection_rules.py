"""Benchmark: label-free snapshot selection rules against the labelled truth, over controlled shifts.

What is measured
    For each model family (``cpnet``: the demo's small Cellpose 3 U-Net; ``cpsam``: its small
    Cellpose-SAM variant), each controlled shift (``synthetic.SHIFTS``: 6× noise, 3 px blur,
    gamma 3) and each seed, the demo trains a source model on clean labelled cells and adapts it
    with label-free SelfAdapt to the shifted domain for the whole budget (``--stop none``),
    evaluating every ``--eval-every`` iterations. At every evaluation the run logs its label-free
    signals (``metrics.csv``: FN rate, D_emb, flow error, TTA spread, agreement with the previous
    snapshot), and this script scores every snapshot on held-out labelled target images that the
    run never sees (pooled AP@0.5 / AP@0.75): the *curves*.

    After the run every candidate — θ0, each snapshot, the weight averages (SWA, WiSE-FT) — is
    scored and measured label-free on the run's held-out images (``selection_common.score_run``:
    dropout consistency, the consensus pools), and every ``--select`` rule of
    ``trainer/selection.py`` (``stop-<rule>`` for each ``--stop`` rule, with the loop's own
    monitors) is replayed on the candidates. Per rule:

    * gain captured: (AP(selected) − AP(θ0)) ÷ (AP(best snapshot) − AP(θ0)), mean and worst over
      runs where the best snapshot gains ≥ 0.01 (AP@0.5; the AP@0.75 columns likewise);
    * harmful runs: the selected candidate is below θ0 by more than 0.01 at AP@0.5 or AP@0.75.

    ``oracle`` (the best snapshot by AP@0.5), ``theta0`` and ``last`` bracket the rules.
    ``--variants`` adds selections that are not rules (flow error with other tolerances or
    patience, the snapshot before the flow error rises 5/10/20 % above its running minimum,
    lowest TTA spread, knees of D_emb and flow error, first snapshot agreeing ≥ 95/98 % with the
    previous), replayed on the same candidates.

Output: the per-run summary, one table per family and one over all runs; the last line is
``ratio=<gain captured at AP@0.5 by the default label-free rule ÷ the best of the paper's rules
(stop-fn, stop-emb, stop-both)>`` over all runs. ``--save FILE`` keeps every run's candidate rows
(JSON); ``--load FILE`` re-scores them without training.

Run (repository root; 10–20 minutes per run on one CPU core next to other jobs, ``--jobs`` runs
in parallel; the committed ``selection_curves.json`` holds the seed-0 runs, one per invocation,
concatenated)::

    python benchmarks/selection_rules.py --jobs 2 --threads 1 --save selection_curves.json
    python benchmarks/selection_rules.py --load selection_curves.json --variants
    python benchmarks/selection_rules.py --families cpnet --shifts noise --seeds 0 --iterations 40
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


# the demo at the integration test's sizes (its 160² images, 96² tiles), with 6 test images per run
SIZES = {"n_source": 8, "n_target": 4, "n_val": 2, "n_test": 6, "size": 160, "tile": 96}


def collect(family: str, shift: str, seed: int, lr_factor: float, iterations: int, eval_every: int,
            threads: int) -> dict:
    """One adaptation run's candidates, scored: label-free signals and labelled test AP of θ0,
    every snapshot and the weight averages (``selection_common.score_run``)."""
    import torch
    from selection_common import score_run

    from selfadapt_deploy.models.families import family_class
    from selfadapt_deploy.segment import SegmentParams
    from selfadapt_deploy.synthetic import SHIFTS
    from selfadapt_deploy.trainer.data import TileSampler, prepare_image
    from selfadapt_deploy.trainer.demo import DemoConfig, run_demo

    torch.set_num_threads(threads)
    config = DemoConfig.for_family(family, target=SHIFTS[shift], **SIZES)
    lr = (config.adapt.lr or family_class(family).adapt_defaults["lr"]) * lr_factor
    config = replace(config, adapt=replace(config.adapt, iterations=iterations, eval_every=eval_every,
                                           stop="none", select="last", lr=lr))
    shape = (config.size, config.size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_demo(out, config, "cpu", seed=seed, report=lambda _: None)
        tests = config.target.sample(config.n_test, shape, seed=seed + 20_000)
        # the demo's target images: adapted on the first n_target, the rest held out (label-free)
        target = config.target.sample(config.n_target + config.n_val, shape, seed=seed + 10_000)
        bn_tiles = TileSampler([prepare_image(im, 1.0) for im, _ in target[: config.n_target]], config.tile
                               ).sample(64, torch.Generator().manual_seed(0))
        rows = score_run(out / "adapt", tests, [im for im, _ in target[config.n_target:]], SegmentParams(),
                         config.adapt.warmup_steps, bn_tiles, report=lambda _: None)
    return {"family": family, "shift": shift, "seed": seed, "lr": lr, "rows": rows}


# ---- variants that are not --stop rules, replayed on the same curves (--variants) ----------------
def lowest(key: str, min_delta: float = 0.0, patience: int | None = None) -> Callable[[list[dict]], int]:
    """The snapshot with the lowest ``key`` (improving by > ``min_delta`` relative), stopping after
    ``patience`` evaluations without improvement."""
    def select(evals: list[dict]) -> int:
        best, wait = 0, 0
        for i in range(1, len(evals)):
            value = evals[i].get(key, math.nan)
            if math.isfinite(value) and value < evals[best].get(key, math.inf) * (1 - min_delta):
                best, wait = i, 0
            else:
                wait += 1
                if patience is not None and wait >= patience:
                    break
        return best
    return select


def before_rise(key: str, rise: float) -> Callable[[list[dict]], int]:
    """The snapshot before ``key`` first rises ``rise`` (relative) above its running minimum."""
    def select(evals: list[dict]) -> int:
        low = evals[0][key]
        for i in range(1, len(evals)):
            if evals[i][key] > low * (1 + rise):
                return i - 1
            low = min(low, evals[i][key])
        return len(evals) - 1
    return select


def first_stable(threshold: float) -> Callable[[list[dict]], int]:
    """The first snapshot whose masks agree (F1@0.5) ≥ ``threshold`` with the previous one's."""
    def select(evals: list[dict]) -> int:
        return next((i for i in range(1, len(evals)) if evals[i].get("agree_prev", 0) >= threshold),
                    len(evals) - 1)
    return select


def knee(key: str) -> Callable[[list[dict]], int]:
    """The knee of ``key`` over iterations: farthest above the chord from first to last point."""
    def select(evals: list[dict]) -> int:
        x = [e["iteration"] for e in evals]
        y = [e[key] for e in evals]
        if y[-1] == y[0]:
            return len(evals) - 1
        return max(range(len(evals)), key=lambda i: (y[i] - y[0]) / (y[-1] - y[0])
                   - (x[i] - x[0]) / (x[-1] - x[0]))
    return select


VARIANTS: dict[str, Callable[[list[dict]], int]] = {
    "flow-d0": lowest("flow_err"), "flow-d5%": lowest("flow_err", 0.05),
    "flow-d2%-p2": lowest("flow_err", 0.02, 2), "flow-rise5%": before_rise("flow_err", 0.05),
    "flow-rise10%": before_rise("flow_err", 0.10), "flow-rise20%": before_rise("flow_err", 0.20),
    "tta-lowest": lowest("tta_spread"), "stable-.98": first_stable(0.98),
    "stable-.95": first_stable(0.95), "emb-knee": knee("d_emb"), "flow-knee": knee("flow_err"),
}


def variant_rules() -> dict[str, Callable[[list[dict]], dict]]:
    """The variants as rules over a run's candidate rows (they see θ0 and the snapshots)."""
    from selfadapt_deploy.trainer.selection import snapshots

    return {name: (lambda v: lambda rows: snapshots(rows)[v(snapshots(rows))])(variant)
            for name, variant in VARIANTS.items()}


def main(argv: list[str] | None = None) -> int:
    from selection_common import collect_runs, print_rule_table, print_runs, replays

    from selfadapt_deploy.trainer.selection import DEFAULT_LABEL_FREE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="cpnet,cpsam")
    ap.add_argument("--shifts", default="noise,blur,gamma")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lr-factors", default="1,10", help="adaptation lr ÷ the family default, one "
                    "run each (a high lr over-trains within the budget)")
    ap.add_argument("--iterations", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    ap.add_argument("--save", type=Path, help="write the curves to this JSON file")
    ap.add_argument("--load", type=Path, help="score curves saved by --save instead of training")
    ap.add_argument("--variants", action="store_true", help="also score the variants that are not "
                    "rules (flow-error tolerances, rise guards, TTA spread, knees, stability)")
    args = ap.parse_args(argv)

    def todo() -> list[tuple]:
        jobs = [(f, s, int(seed), float(lr), args.iterations, args.eval_every, args.threads)
                for f in args.families.split(",") for s in args.shifts.split(",")
                for seed in args.seeds.split(",") for lr in args.lr_factors.split(",")]
        print(f"selection_rules: {len(jobs)} runs of {args.iterations} iterations, an evaluation every "
              f"{args.eval_every}", flush=True)
        return jobs

    runs = collect_runs(collect, todo, args.jobs, args.load, args.save)
    print_runs(runs, lambda r: f"{r['family']:<7} {r['shift']:<6} {r['seed']:>4} {r['lr']:>7.0e}",
               f"{'family':<7} {'shift':<6} {'seed':>4} {'lr':>7}")
    rules = {**replays(), **(variant_rules() if args.variants else {})}
    for family in sorted({r["family"] for r in runs}):
        print_rule_table(family, [r for r in runs if r["family"] == family], rules=rules)
    scores = print_rule_table("all runs", runs, rules=rules)
    paper = max(scores[r]["mean_ap50"] for r in ("stop-fn", "stop-emb", "stop-both"))
    print(f"default rule: {DEFAULT_LABEL_FREE}")
    gain = scores[DEFAULT_LABEL_FREE]["mean_ap50"]
    print(f"ratio={gain / paper if paper > 0 else float('inf'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
