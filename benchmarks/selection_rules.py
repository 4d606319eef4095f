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

    Each ``--stop`` rule of ``trainer/stopping.py`` is then replayed on each run's curves with the
    loop's own monitors and selection (a rule that would have stopped the run early selects what
    it would have selected then). Per rule:

    * gain captured: (AP(selected) − AP(θ0)) ÷ (AP(best snapshot) − AP(θ0)), averaged over runs
      where the best snapshot gains ≥ 0.01 (AP@0.5; the AP@0.75 column likewise);
    * worse than θ0: runs whose selected snapshot has a lower AP than the pretrained model
      (by more than 0.005) at AP@0.5, and at AP@0.75.

    ``oracle`` (the best snapshot by AP@0.5) and ``none`` (the last snapshot) bracket the rules.
    ``--variants`` adds selections that are not ``--stop`` rules (flow error with other tolerances
    or patience, the snapshot before the flow error rises 5/10/20 % above its running minimum,
    lowest TTA spread, knees of D_emb and flow error, first snapshot agreeing ≥ 95/98 % with the
    previous), replayed on the same curves.

Output: the per-run curves summary, one table per family and one over all runs; the last line is
``ratio=<gain captured at AP@0.5 by the flow rule ÷ the best of the paper's rules (fn, emb,
both)>`` over all runs (the flow rule would become the default only above 1, with no more runs
worse than θ0). ``--save FILE`` keeps the curves (JSON); ``--load FILE`` re-scores them
without training.

Run (repository root; about 2 minutes per run on one CPU core, ``--jobs`` runs in parallel;
the 24 default runs took 26 minutes with ``--jobs 2 --threads 1``)::

    python benchmarks/selection_rules.py --jobs 2 --threads 1 --save selection_curves.json
    python benchmarks/selection_rules.py --load selection_curves.json --variants
    python benchmarks/selection_rules.py --families cpnet --shifts noise --seeds 0 --iterations 40
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIGNALS = ("fn_rate", "d_emb", "flow_err", "tta_spread", "agree_prev")
WORSE = 0.005  # AP below θ0's by more than this counts as worse
MIN_GAIN = 0.01  # runs whose best snapshot gains less have no gain to capture


# the demo at the integration test's sizes (its 160² images, 96² tiles), with 6 test images per run
SIZES = {"n_source": 8, "n_target": 4, "n_val": 2, "n_test": 6, "size": 160, "tile": 96}


def collect(family: str, shift: str, seed: int, lr_factor: float, iterations: int, eval_every: int,
            threads: int) -> dict:
    """One adaptation run's curves: label-free signals and labelled test AP at every evaluation."""
    import torch

    from selfadapt_deploy.models import load_model
    from selfadapt_deploy.synthetic import SHIFTS
    from selfadapt_deploy.trainer.demo import DemoConfig, pooled_ap, run_demo
    from selfadapt_deploy.trainer.loop import FAMILY_DEFAULTS

    torch.set_num_threads(threads)
    config = DemoConfig.for_family(family, target=SHIFTS[shift], **SIZES)
    lr = (config.adapt.lr or FAMILY_DEFAULTS[family]["lr"]) * lr_factor
    config = replace(config, adapt=replace(config.adapt, iterations=iterations, eval_every=eval_every,
                                           stop="none", lr=lr))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_demo(out, config, "cpu", seed=seed, report=lambda _: None)
        tests = config.target.sample(config.n_test, (config.size, config.size), seed=seed + 20_000)
        evals = []
        for row in csv.DictReader(open(out / "adapt" / "metrics.csv")):
            if not row["d_emb"]:
                continue
            step = int(row["iteration"])
            net = load_model(out / "adapt" / "snapshots" / f"iter_{step:06d}.pt", "cpu")
            ap = pooled_ap(net, tests)[0].ap
            evals.append({"iteration": step, "ap50": float(ap[0]), "ap75": float(ap[1]),
                          **{k: float(row[k]) for k in SIGNALS if row.get(k)}})
    return {"family": family, "shift": shift, "seed": seed, "lr": lr, "evals": evals}


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


def replay(rule: str, evals: list[dict]) -> int:
    """Index of the snapshot that ``--stop rule`` selects on these curves (the loop's monitors),
    or that a variant selects."""
    from selfadapt_deploy.trainer.stopping import monitors_for, selected_iteration

    if rule == "oracle":
        return max(range(len(evals)), key=lambda i: evals[i]["ap50"])
    if rule in VARIANTS:
        return VARIANTS[rule](evals)
    monitors = monitors_for(rule)
    last = 0
    for i, row in enumerate(evals):
        last = i
        if any([m.update(row, row["iteration"])[0] for m in monitors]):  # every monitor sees it
            break
    step = selected_iteration(monitors, evals[last]["iteration"])
    return next(i for i, row in enumerate(evals) if row["iteration"] == step)


def score(rule: str, runs: list[dict]) -> dict:
    """Gain captured (mean over runs with gain) and counts of runs worse than θ0, at both IoUs."""
    out = {}
    for key in ("ap50", "ap75"):
        fractions, worse = [], 0
        for run in runs:
            evals = run["evals"]
            base, best = evals[0][key], max(e[key] for e in evals)
            chosen = evals[replay(rule, evals)][key]
            worse += chosen < base - WORSE
            if best - base >= MIN_GAIN:
                fractions.append((chosen - base) / (best - base))
        out[key] = (sum(fractions) / len(fractions) if fractions else float("nan"), worse)
    return out


def print_table(title: str, rules: list[str], runs: list[dict]) -> dict:
    print(f"\n{title}: {len(runs)} runs")
    print(f"{'rule':<12} {'gain@0.5':>9} {'worse@0.5':>10} {'gain@0.75':>10} {'worse@0.75':>11}")
    scores = {}
    for rule in rules:
        s = scores[rule] = score(rule, runs)
        print(f"{rule:<12} {s['ap50'][0]:>9.2f} {s['ap50'][1]:>10} {s['ap75'][0]:>10.2f} {s['ap75'][1]:>11}")
    return scores


def main(argv: list[str] | None = None) -> int:
    from selfadapt_deploy.trainer.stopping import DEFAULT_STOP, STOP_RULES

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
                    "--stop rules (flow-error tolerances, rise guards, TTA spread, knees, stability)")
    args = ap.parse_args(argv)
    if args.load:
        runs = json.loads(args.load.read_text())
    else:
        todo = [(f, s, int(seed), float(lr), args.iterations, args.eval_every, args.threads)
                for f in args.families.split(",") for s in args.shifts.split(",")
                for seed in args.seeds.split(",") for lr in args.lr_factors.split(",")]
        print(f"selection_rules: {len(todo)} runs of {args.iterations} iterations, an evaluation every "
              f"{args.eval_every}", flush=True)
        # spawned workers: torch's thread pools do not survive fork (forked workers ran ~10× slower)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(collect, *zip(*todo, strict=True)))
        if args.save:
            args.save.write_text(json.dumps(runs, indent=1))
    print(f"\n{'family':<7} {'shift':<6} {'seed':>4} {'lr':>7} {'AP@0.5 θ0→best (it)':>22} "
          f"{'AP@0.75 θ0→best':>17} {'last@0.5':>9} {'last@0.75':>10}")
    for run in runs:
        e = run["evals"]
        best = max(e, key=lambda r: r["ap50"])
        print(f"{run['family']:<7} {run['shift']:<6} {run['seed']:>4} {run['lr']:>7.0e} "
              f"{e[0]['ap50']:>8.3f}→{best['ap50']:.3f} ({best['iteration']:>3}) "
              f"{e[0]['ap75']:>8.3f}→{max(r['ap75'] for r in e):.3f} {e[-1]['ap50']:>9.3f} "
              f"{e[-1]['ap75']:>10.3f}")
    rules = ["oracle", "none", *STOP_RULES, *(VARIANTS if args.variants else ())]
    for family in sorted({r["family"] for r in runs}):
        print_table(family, rules, [r for r in runs if r["family"] == family])
    scores = print_table("all runs", rules, runs)
    paper = max(scores[r]["ap50"][0] for r in ("fn", "emb", "both"))
    print(f"default rule: {DEFAULT_STOP}")
    print(f"ratio={scores['flow']['ap50'][0] / paper if paper > 0 else float('inf'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
