"""Benchmark: adaptation methods on the demo's controlled domain shift, same budget for all.

What is measured
    The offline demo's setting (``trainer/demo.py``): a small Cellpose 3 U-Net trained with labels
    on clean generated cells (the *source* model), adapted to the same kind of cells under 6× the
    noise (the *target*), scored on held-out labelled target images that no method ever sees.
    One source model per seed is trained once and copied into every method's folder; every method
    then runs ``run_demo`` with the same iteration budget, tiles and seed:

    * source model (no adaptation)
    * SelfAdapt (label-free)
    * ACTIS with 1 and with 3 labelled target images (a quarter of each batch)
    * CULPICO with the labelled source images (its L_s), and source-free (L2-SP anchor only)

    For each: pooled AP@0.5 / AP@0.75 on the target test images of the deployed (selected)
    snapshot and of the last one (the whole budget), the selected iteration, and whether each
    label-free criterion (FN rate > τ_FN, D_emb > τ_emb) fired during the run.

Output: one table per seed (means over seeds when several); the last line is
``ratio=<best method's AP@0.5 ÷ the source model's AP@0.5>`` (first seed).

Run (repository root; about 5 minutes per seed on 2 CPU cores)::

    python benchmarks/methods_compare.py
    python benchmarks/methods_compare.py --seeds 0,1,2 --iterations 80
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_NAME = "target (6× noise)"


def fired(metrics_csv: Path, tau_fn: float, tau_emb: float) -> str:
    """Which label-free criteria crossed their threshold at some evaluation: fn, emb, both, none."""
    rows = [r for r in csv.DictReader(open(metrics_csv)) if r["d_emb"]]
    fn = any(float(r["fn_rate"]) > tau_fn for r in rows)
    emb = any(float(r["d_emb"]) > tau_emb for r in rows)
    return {(True, True): "both", (True, False): "fn", (False, True): "emb"}.get((fn, emb), "none")


def last_snapshot_ap(out: Path, config, seed: int) -> tuple[float, float]:
    """Pooled target-test AP@0.5 / AP@0.75 of the run's last snapshot (the demo's test images)."""
    from selfadapt_deploy.models import load_model
    from selfadapt_deploy.synthetic import TARGET
    from selfadapt_deploy.trainer.demo import pooled_ap

    last = sorted((out / "adapt" / "snapshots").glob("iter_*.pt"))[-1]
    tests = TARGET.sample(config.n_test, (config.size, config.size), seed=seed + 20_000)
    ap = pooled_ap(load_model(last, "cpu"), tests)[0].ap
    return float(ap[0]), float(ap[1])


def main(argv: list[str] | None = None) -> int:
    from selfadapt_deploy.trainer.demo import SOURCE_MODEL, DemoConfig, run_demo

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--iterations", type=int, default=None, help="adaptation steps (default: the demo's)")
    ap.add_argument("--quick", action="store_true", help="the integration test's smaller demo")
    args = ap.parse_args(argv)
    base = DemoConfig.quick() if args.quick else DemoConfig()
    if args.iterations:
        base = replace(base, adapt=replace(base.adapt, iterations=args.iterations))
    methods = [("SelfAdapt", replace(base, method="selfadapt")),
               ("ACTIS, 1 labelled target", replace(base, method="actis", n_labelled=1)),
               ("ACTIS, 3 labelled target", replace(base, method="actis", n_labelled=3)),
               ("CULPICO + labelled source", replace(base, method="culpico", culpico_source=True)),
               ("CULPICO, source-free", replace(base, method="culpico", culpico_source=False))]
    tau_fn, tau_emb = base.adapt.tau_fn, base.adapt.tau_emb
    print(f"methods_compare: demo shift (source clean → target 6× noise), {base.adapt.iterations} "
          f"iterations, batch {base.adapt.batch_size}, {base.n_target} unlabeled target images, "
          f"{base.n_test} labelled test images per domain")
    first_ratio = None
    for seed in map(int, args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            rows = []
            for name, config in methods:
                out = tmp / name.replace(" ", "_").replace(",", "")
                if rows:  # the same source model for every method
                    out.mkdir(parents=True)
                    shutil.copyfile(tmp / "source" / SOURCE_MODEL, out / SOURCE_MODEL)
                else:
                    out = tmp / "source"
                result = run_demo(out, config, "cpu", seed=seed, report=lambda _: None)
                if not rows:
                    before = result.before[TARGET_NAME].ap
                    rows.append(("source model (no adaptation)", before[0], before[1], before[0],
                                 before[1], "-", "-"))
                after = result.after[TARGET_NAME].ap
                rows.append((name, after[0], after[1], *last_snapshot_ap(out, config, seed),
                             result.selected,
                             fired(out / "adapt" / "metrics.csv", tau_fn, tau_emb)))
        print(f"\nseed {seed}   (deployed = the snapshot the label-free rule selected; last = end of budget)")
        print(f"{'method':<30} {'AP@0.5':>7} {'AP@0.75':>8} {'last@0.5':>9} {'last@0.75':>10} "
              f"{'selected':>9} {'label-free fired':>17}")
        for name, ap50, ap75, last50, last75, selected, crossed in rows:
            print(f"{name:<30} {ap50:>7.3f} {ap75:>8.3f} {last50:>9.3f} {last75:>10.3f} {selected:>9} "
                  f"{crossed:>17}", flush=True)
        best = max(rows[1:], key=lambda r: r[1])
        print(f"best: {best[0]} ({best[1]:.3f} vs source {rows[0][1]:.3f})")
        first_ratio = first_ratio or best[1] / rows[0][1]
    print(f"ratio={first_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
