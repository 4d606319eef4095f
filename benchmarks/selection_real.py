"""Benchmark: label-free snapshot selection on real images with a real pretrained model.

What is measured
    For each labelled set (default: every folder under ``../shared/data/labelled/``; any folder
    of ``images/`` + ``masks/<stem>_masks.tif``, or of cellpose's ``<stem>.tif`` +
    ``<stem>_masks.tif`` pairs, can be passed), the real Cellpose weights (``--model``, default
    ``../shared/models/cyto0_cp3.pth``) are adapted label-free exactly as a user would:
    ``sa-deploy adapt <the set's images> --diameter <the set's median> --stop none`` (every
    snapshot kept), at the default learning rate and at ``--lr-factors`` times it (3×, to expose
    over-training), ``--iterations`` steps with a snapshot every ``--eval-every``. The run never
    sees a label. Afterwards every candidate — θ0, each snapshot, the weight averages — is scored
    on all of the set's labels (pooled AP@0.5 and AP@0.75) and measured label-free on the run's
    held-out images (``benchmarks/selection_common.py``), and every selection rule is replayed:

    * gain captured: (AP(deployed) − AP(θ0)) ÷ (AP(best snapshot) − AP(θ0)), mean and worst
      over the runs where the best snapshot gains ≥ 0.01, at AP@0.5 and at AP@0.75;
    * harmful runs: the deployed model is below θ0 by more than 0.01 at AP@0.5 or AP@0.75;
    * extra seconds per evaluation the rule costs on top of the evaluation itself.

    RGB sets (H&E) are fed to the 2-channel model as their red channel (``--channels 0``): the
    channel where hematoxylin-stained nuclei contrast most with eosin (θ0 AP@0.5 on the H&E set:
    red .227, green .102, blue .103); grey sets as cellpose's ``channels=[0, 0]``.

    The pre-registered default (issue 18): the label-free rule with the highest mean AP@0.5 gain
    captured among those with no harmful real run and none on the synthetic runs
    (``selection_rules.py --load``); if none reaches 0.7, the fewest harmful runs, then gain.

Output: per-run θ0 / best / last AP, the per-rule table, the pre-registered choice; last line
``ratio=<mean AP@0.5 gain captured by the library's default rule over the real runs>``.
``--save`` writes the curves (every candidate's row of every run, JSON); ``--load`` re-scores
them without training. Runs and scores live under ``--work`` and resume where they stopped.

Run (repository root; on 2 CPU cores a 150-iteration run trains in 40–75 minutes and its 17
candidates score in 20 minutes (nuclei) to 2.5 hours (H&E, 1.8× upsampled): 6 runs take ~12 hours;
``--no-train`` scores only the runs already trained)::

    python benchmarks/selection_real.py --jobs 2 --save benchmarks/selection_real_curves.json
    python benchmarks/selection_real.py --load benchmarks/selection_real_curves.json
    python benchmarks/selection_real.py --sets ../shared/data/labelled/coelho2009_u2os_nuclei \\
        --iterations 30 --eval-every 15 --lr-factors 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SHARED = REPO.parent / "shared"
DEFAULT_SETS = SHARED / "data" / "labelled"
DEFAULT_MODEL = SHARED / "models" / "cyto0_cp3.pth"


def set_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, masks) files of a labelled set: ``images/`` + ``masks/``, or cellpose's pairs."""
    from selfadapt_deploy.io.readers import expand_inputs, image_stem
    from selfadapt_deploy.trainer.labelled import find_pairs

    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        masks = {image_stem(p): p for p in expand_inputs([folder / "masks"])}
        return [(p, masks[f"{image_stem(p)}_masks"]) for p in expand_inputs([folder / "images"])
                if f"{image_stem(p)}_masks" in masks]
    return find_pairs([str(folder)])


def set_facts(folder: Path) -> tuple[float, list[int] | None]:
    """(median object diameter of the labels, pooled — cellpose's convention 2·√(area/π) —,
    the ``--channels`` an RGB set is fed with)."""
    import numpy as np
    import tifffile

    from selfadapt_deploy.io.readers import read_images

    pairs = set_pairs(folder)
    diameters = []
    for _, masks in pairs:
        counts = np.bincount(tifffile.imread(masks).ravel())[1:]
        diameters.append(2 * np.sqrt(counts[counts > 0] / np.pi))
    rgb = read_images(pairs[0][0])[0].data.shape[0] == 3
    return float(np.median(np.concatenate(diameters))), [0] if rgb else None


def train(run: Path, folder: Path, model: Path, lr: float, seed: int, iterations: int, eval_every: int,
          threads: int) -> None:
    """``sa-deploy adapt`` as a user runs it (resumed if interrupted); nothing if finished."""
    if (run / "run.json").is_file():
        return
    diameter, channels = set_facts(folder)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "NUMBA_NUM_THREADS": str(threads)}
    if (run / "settings.json").is_file():
        cmd = ["sa-deploy", "adapt", "--resume", str(run), "--device", "cpu"]
    else:
        images = folder / "images" if (folder / "images").is_dir() else None
        inputs = [str(images)] if images else [str(p) for p, _ in set_pairs(folder)]
        cmd = ["sa-deploy", "adapt", *inputs, "--model", str(model), "--out", str(run),
               "--diameter", f"{diameter:.2f}", "--stop", "none", "--select", "last",
               "--eval-every", str(eval_every), "--iterations", str(iterations), "--lr", f"{lr:g}",
               "--seed", str(seed), "--device", "cpu",
               *(["--channels", ",".join(map(str, channels))] if channels else [])]
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.with_suffix(".log"), "a") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def score(run: Path, folder: Path) -> list[dict]:
    """Every candidate of a finished run, scored (``selection_common.score_run``)."""
    import torch
    from selection_common import score_run

    from selfadapt_deploy.models import load_model
    from selfadapt_deploy.segment import SegmentParams
    from selfadapt_deploy.trainer.data import TileSampler, prepare_image
    from selfadapt_deploy.trainer.labelled import read_pairs
    from selfadapt_deploy.trainer.loop import AdaptConfig, split_indices

    settings = json.loads((run / "settings.json").read_text())
    config = AdaptConfig(**settings["config"])
    net = load_model(run / "snapshots" / "iter_000000.pt", "cpu")
    labelled = read_pairs(set_pairs(folder), net.nchan, True, settings["channels"], None, None)
    train_idx, val_idx = split_indices(len(labelled), settings["val_fraction"], config.seed)
    rescale = net.diam_mean / settings["diameter"]
    bn_tiles = TileSampler([prepare_image(labelled[i][0], rescale) for i in train_idx], net.tile_size
                           ).sample(64, torch.Generator().manual_seed(0))
    params = SegmentParams(diameter=settings["diameter"])
    return score_run(run, labelled, [labelled[i][0] for i in val_idx], params, config.warmup_steps,
                     bn_tiles, val_index=val_idx)


def run_dir(work: Path, folder: Path, factor: float, seed: int) -> Path:
    return work / f"{folder.name}-lr{factor:g}x-s{seed}"


def collect(folder: str, model: str, factor: float, seed: int, iterations: int, eval_every: int,
            work: str, threads: int) -> dict:
    import torch

    from selfadapt_deploy.models import CPnet

    torch.set_num_threads(threads)
    # the real model is a Cellpose 3 U-Net: its family's adaptation lr, times the factor
    folder_, lr = Path(folder), CPnet.adapt_defaults["lr"] * factor
    run = run_dir(Path(work), folder_, factor, seed)
    train(run, folder_, Path(model), lr, seed, iterations, eval_every, threads)
    return {"set": folder_.name, "lr": lr, "lr_factor": factor, "seed": seed, "method": "selfadapt",
            "rows": score(run, folder_)}


def costs(runs: list[dict]) -> dict[str, float]:
    """Extra seconds per evaluation each rule costs, averaged over runs: the consensus is computed
    once at the end (spread over the run's evaluations), dropout consistency segments the held-out
    images once more at every evaluation, a weight average is one more evaluation at the end."""
    from selection_common import DROPOUT_RATES, STOPS

    from selfadapt_deploy.trainer.averaging import AVERAGES
    from selfadapt_deploy.trainer.perturb import DROPOUT_RATE
    from selfadapt_deploy.trainer.selection import GUARDS

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    out: dict[str, list[float]] = {}
    for run in runs:
        rows = run["rows"]
        evals = [r for r in rows if r["iteration"] is not None]
        eval_s = mean([r["segment_val_s"] for r in evals])  # an average's extra evaluation
        for pool in ("snapshots", "anchored", "averages"):
            out.setdefault(f"consensus{'' if pool == 'snapshots' else '-' + pool}", []).append(
                rows[0][f"consensus_s_{pool}"] / len(evals))
        for rate in DROPOUT_RATES:
            out.setdefault(f"dropout@{rate}", []).append(mean([r[f"dropout_s_{rate}"] for r in evals]))
        for name in (*AVERAGES, "swa-bn", "theta0-bn"):
            out.setdefault(name, []).append(eval_s / len(evals))
        out["consensus-averages"][-1] += len(AVERAGES) * eval_s / len(evals)
        for stop in STOPS:
            out.setdefault(f"consensus+{stop}-stop", []).append(out["consensus"][-1])
        dropout = out[f"dropout@{DROPOUT_RATE}"][-1]
        for guard in GUARDS:  # the flow error: every evaluation has it; dropout: one more pass
            extra = dropout if guard == "dropout" else 0.0
            for suffix in ("", "@0", "@5%", "+both-stop"):
                out.setdefault(f"guarded-{guard}{suffix}", []).append(out["consensus"][-1] + extra)
            out.setdefault(f"guarded-{guard}-anchored", []).append(out["consensus-anchored"][-1] + extra)
        out.setdefault("guarded-flow+dropout", []).append(out["consensus"][-1] + dropout)
        out.setdefault("guarded-dropout-averages", []).append(  # + each average's dropout pass
            out["consensus-averages"][-1] + dropout * (1 + len(AVERAGES) / len(evals)))
    result = {k: mean(v) for k, v in out.items()}
    result["dropout"] = result[f"dropout@{DROPOUT_RATE}"]
    return result


def main(argv: list[str] | None = None) -> int:
    from selection_common import collect_runs, pick_default, print_rule_table, print_runs

    from selfadapt_deploy.trainer.selection import DEFAULT_LABEL_FREE, RULES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", nargs="*", type=Path, help="labelled set folders (default: every set "
                    f"under {DEFAULT_SETS})")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--lr-factors", default="1,3")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--work", type=Path, default=Path("selection_real_runs"),
                    help="where the runs and their scores live (resumable)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    ap.add_argument("--no-train", action="store_true", help="score only the runs already trained "
                    "under --work (the others are listed, not started)")
    ap.add_argument("--save", type=Path, help="write the curves to this JSON file")
    ap.add_argument("--load", type=Path, help="score curves saved by --save instead of training")
    ap.add_argument("--scoring-runtime", choices=("torch", "onnx"), default="torch",
                    help="segment the candidates in torch or in onnxruntime (their exported graphs: "
                    "~2x faster on the CPU, same masks; selection_common.scoring_runtime)")
    ap.add_argument("--synthetic", type=Path, default=REPO / "benchmarks" / "selection_curves.json",
                    help="selection_rules.py curves for the pre-registered check")
    args = ap.parse_args(argv)
    os.environ["SELECTION_SCORING_RUNTIME"] = args.scoring_runtime  # the spawned scorers read it
    sets = args.sets or sorted(p for p in DEFAULT_SETS.iterdir() if p.is_dir())
    if not args.load and (not sets or not args.model.is_file()):
        print(f"selection_real: needs labelled sets and {args.model} (see ../shared/); nothing run")
        return 0

    def todo() -> list[tuple]:
        runs = [(str(s), str(args.model), float(f), int(seed), args.iterations, args.eval_every,
                 str(args.work), args.threads) for seed in seeds for f in factors for s in sets]
        if args.no_train:
            dirs = {r: run_dir(args.work, Path(r[0]), r[2], r[3]) for r in runs}
            for r in runs:
                if not (dirs[r] / "run.json").is_file():
                    print(f"selection_real: not trained, skipped (--no-train): {dirs[r]}")
            runs = [r for r in runs if (dirs[r] / "run.json").is_file()]
        print(f"selection_real: {len(runs)} runs of {args.iterations} iterations (snapshot every "
              f"{args.eval_every}) under {args.work}", flush=True)
        return runs

    factors, seeds = args.lr_factors.split(","), args.seeds.split(",")
    runs = collect_runs(collect, todo, args.jobs, args.load, args.save)
    print_runs(runs, lambda r: f"{r['set']:<30} {r['lr']:>7.0e} {r['seed']:>4}",
               f"{'set':<30} {'lr':>7} {'seed':>4}")
    real = print_rule_table("real runs", runs, costs(runs))
    synthetic = None
    if args.synthetic.is_file():
        synthetic_runs = json.loads(args.synthetic.read_text())
        if synthetic_runs and "rows" in synthetic_runs[0]:
            synthetic = print_rule_table("synthetic runs (selection_rules.py)", synthetic_runs)
    label_free = [n for n in real if n not in ("oracle", "theta0")]
    rule, why = pick_default(real, synthetic, label_free)
    print(f"\npre-registered choice: {rule} ({why}); the library's default: {DEFAULT_LABEL_FREE}")
    default = DEFAULT_LABEL_FREE if DEFAULT_LABEL_FREE in real else next(iter(RULES))
    print(f"ratio={real[default]['mean_ap50']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
