"""Shared by ``selection_real.py`` and ``selection_rules.py``: score every candidate of a finished
adaptation run, replay every selection rule on the scores, and tabulate what each rule captures.

Scoring a run (:func:`score_run`, resumable: one JSON per candidate under ``<run>/bench/``):
candidates are θ0, every snapshot, the weight averages (SWA with BatchNorm statistics averaged,
``swa-bn`` with them re-estimated on training tiles, WiSE-FT α = 0.25/0.5/0.75), and θ0 with its
BatchNorm statistics re-estimated on the training tiles (``theta0-bn``: AdaBN, Li et al. 2016,
the classic adaptation without training, for comparison); each is scored on
the labelled images (pooled AP@0.5 / AP@0.75), segments the run's held-out unlabelled images (its
predictions go to a :class:`PredictionPool`), and is segmented again under first-layer feature
dropout at each rate. The snapshots' stopping signals come from the run's ``metrics.csv``. Then
every consensus pool scores every candidate — also pools cut where a ``--stop`` rule would have
ended the run. Rules are replayed with the library's own ``trainer/selection.py``.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from selfadapt_deploy.metrics import average_precision, pooled
from selfadapt_deploy.models import load_model
from selfadapt_deploy.segment import SegmentParams, segment_images, segment_results
from selfadapt_deploy.trainer.averaging import AVERAGES, SWA, recompute_batchnorm
from selfadapt_deploy.trainer.candidates import build_average, consensus_params, score_consensus
from selfadapt_deploy.trainer.perturb import DROPOUT_RATE, dropout_disagreement
from selfadapt_deploy.trainer.pool import PredictionPool
from selfadapt_deploy.trainer.selection import (
    GUARD_MARGIN,
    GUARDS,
    RULES,
    THETA0,
    Row,
    StopRule,
    best_row,
    choose,
    consensus_members,
    consensus_pick,
    consensus_score,
    passes_guard,
    snapshot_name,
    snapshots,
    theta0,
)
from selfadapt_deploy.trainer.stopping import flow_error

SIGNALS = ("fn_rate", "d_emb", "flow_err", "tta_spread", "agree_prev")
# Feature-dropout rates scored per candidate: the library rate only (one more held-out pass per
# candidate each; 0.1 and 0.3 were also scored on the first real runs and are kept in their caches).
DROPOUT_RATES = (DROPOUT_RATE,)
POOLS = ("snapshots", "anchored", "averages")
SWA_BN, THETA0_BN = "swa-bn", "theta0-bn"
STOPS = ("fn", "emb", "both", "flow")
HARM = 0.01  # a deployed model below θ0 by more than this (AP@0.5 or AP@0.75) is harmful
MIN_GAIN = 0.01  # runs whose best snapshot gains less have no gain to capture at that IoU


def _signals(metrics_csv: Path) -> dict[int, dict]:
    out = {}
    for row in csv.DictReader(open(metrics_csv)):
        if row["d_emb"]:
            out[int(row["iteration"])] = {k: float(row[k]) for k in SIGNALS if row.get(k)}
    return out


def score_run(run: Path, labelled: Sequence[tuple[np.ndarray, np.ndarray]], val_images: Sequence[np.ndarray],
              params: SegmentParams, warmup: int, bn_tiles: torch.Tensor,
              val_index: Sequence[int] | None = None,
              report: Callable[[str], None] = print) -> list[Row]:
    """Every candidate's row (see the module docstring). ``val_index``: the held-out images are
    ``labelled[i]`` for these ``i`` (their segmentation is then reused, not repeated)."""
    work = run / "bench"
    signals = _signals(run / "metrics.csv")
    snapshot_files = {i: run / "snapshots" / f"{snapshot_name(i)}.pt" for i in sorted(signals)}
    files = {snapshot_name(i): p for i, p in snapshot_files.items()}
    for name in AVERAGES:
        files[name] = work / "averages" / f"{name}.pt"
        if not files[name].is_file():
            build_average(name, snapshot_files, warmup, files[name], torch.device("cpu"))
    files[SWA_BN] = work / "averages" / f"{SWA_BN}.pt"
    if not files[SWA_BN].is_file():
        build_average(SWA, snapshot_files, warmup, files[SWA_BN], torch.device("cpu"), bn_tiles)
    files[THETA0_BN] = work / "averages" / f"{THETA0_BN}.pt"
    if not files[THETA0_BN].is_file():  # AdaBN: θ0 with its BatchNorm statistics from target tiles
        net = load_model(snapshot_files[0], "cpu")
        recompute_batchnorm(net, bn_tiles)
        net.save(files[THETA0_BN])
    pool = PredictionPool(work / "pool", len(val_images))
    scored: dict[str, Row] = {}
    waiting = list(files)
    while waiting:  # candidates another process has claimed are waited for, or taken over
        elsewhere = []
        for name in waiting:
            cache = work / "scores" / f"{name}.json"
            if cache.is_file() and pool.has(name):
                scored[name] = json.loads(cache.read_text())
            elif _claim(work / "claims" / name):
                scored[name] = _score_candidate(name, files[name], run, labelled, val_images, params,
                                                val_index, signals, pool, cache, report)
            else:
                elsewhere.append(name)
        if elsewhere:
            time.sleep(10)
        waiting = elsewhere
    rows = [scored[name] for name in files]
    net0 = load_model(files[THETA0], "cpu")
    spec = net0.spec
    for row in rows:  # the weight averages' flow error, from their held-out predictions
        if "flow_err" not in row:
            row["flow_err"] = flow_error(pool.segmentations(row["candidate"]), spec, params)
    mask_settings = consensus_params(params, net0)
    for name in POOLS:
        tic = time.perf_counter()
        score_consensus(rows, pool, mask_settings, name, consensus_members(rows, name))
        rows[0][f"consensus_s_{name}"] = time.perf_counter() - tic  # one pool, every candidate
    for stop in STOPS:  # the pool of a run that this --stop rule would have ended early
        end = _stop_end(rows, stop)
        kept = [r for r in snapshots(rows) if r["iteration"] <= end]
        score_consensus(kept, pool, mask_settings, f"{stop}-stop", consensus_members(kept, "snapshots"))
    return rows


def _claim(marker: Path) -> bool:
    """Whether this process may score a candidate: it created ``marker`` (its pid inside), or the
    process that did has died (a killed run resumes). Lets two processes share one run's scoring."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(marker.read_text() or 0)
            if pid == os.getpid():
                return True
            os.kill(pid, 0)
            return False
        except (ValueError, ProcessLookupError, FileNotFoundError):
            marker.write_text(str(os.getpid()))  # its owner is gone (a race here scores twice: harmless)
            return True
        except PermissionError:
            return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


#: ``onnx`` (``selection_real.py --scoring-runtime``): candidates are segmented by onnxruntime on
#: their exported graphs (a graph cache in ``<run>/bench/graphs``): on two real phase-contrast
#: images 1.45x faster than torch at one thread, masks identical (AP 1.0 at every IoU, network
#: max |Δ| 1.6e-5). Every run in selection_real_curves.json records it per row (``scored_with``;
#: rows without it were scored in torch). Feature dropout always runs in torch.
def scoring_runtime() -> str:
    return os.environ.get("SELECTION_SCORING_RUNTIME", "torch")


def _segment(net, images: list[np.ndarray], params: SegmentParams, run: Path) -> tuple[list, str]:
    """The candidate's segmentations and the runtime that made them: onnxruntime when asked and
    the candidate's graph passes the export's validation, else torch."""
    if scoring_runtime() == "torch":
        return segment_results(net, images, params), "torch"
    from selfadapt_deploy.export.graph_cache import cached_graph
    from selfadapt_deploy.export.onnx_export import ExportValidationError
    from selfadapt_deploy.runtime import MODEL_GRAPH, OrtRunner

    try:
        entry = cached_graph(net, "candidate", MODEL_GRAPH, root=run / "bench" / "graphs")
    except ExportValidationError:  # e.g. an adapted net's outputs past the fp32 bound: torch
        return segment_results(net, images, params), "torch"
    with OrtRunner(entry.path / "model.onnx", net.spec, MODEL_GRAPH, "cpu") as runner:
        return segment_images(runner, images, params, "cpu"), "onnx"


def _score_candidate(name: str, path: Path, run: Path, labelled: Sequence[tuple[np.ndarray, np.ndarray]],
                     val_images: Sequence[np.ndarray], params: SegmentParams,
                     val_index: Sequence[int] | None, signals: dict[int, dict], pool: PredictionPool,
                     cache: Path, report: Callable[[str], None]) -> Row:
    """One candidate's row: AP on the labels, its held-out predictions into ``pool``, dropout."""
    tic = time.perf_counter()
    net = load_model(path, "cpu")
    segs, runtime = _segment(net, [im for im, _ in labelled], params, run)
    seg_s = time.perf_counter() - tic
    ap = pooled([average_precision(gt, s.masks) for (_, gt), s in zip(labelled, segs, strict=True)]).ap
    if val_index is not None:  # the held-out images are labelled ones: their share of the time
        val_segs = [segs[i] for i in val_index]
        val_s = seg_s * sum(im.size for im in val_images) / sum(im.size for im, _ in labelled)
    else:
        t = time.perf_counter()
        val_segs, _ = _segment(net, list(val_images), params, run)
        val_s = time.perf_counter() - t
    pool.add(name, val_segs)
    iteration = int(name[5:]) if name.startswith("iter_") else None
    row = {"candidate": name, "iteration": iteration, "ap50": float(ap[0]), "ap75": float(ap[1]),
           "scored_with": runtime,
           "segment_val_s": val_s, **(signals[iteration] if iteration is not None else {})}
    for rate in DROPOUT_RATES:
        t = time.perf_counter()
        row[f"dropout_err_{rate}"] = dropout_disagreement(net, val_images, [s.masks for s in val_segs],
                                                          params, rate=rate)
        row[f"dropout_s_{rate}"] = time.perf_counter() - t
    row["dropout_err"] = row[f"dropout_err_{DROPOUT_RATE}"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row))
    report(f"  {run.name} {name}: AP@0.5 {row['ap50']:.3f} AP@0.75 {row['ap75']:.3f} "
           f"({time.perf_counter() - tic:.0f} s)")
    return row


def _stop_end(rows: Sequence[Row], stop: str) -> int:
    """The last iteration a run under ``--stop stop`` would have evaluated."""
    monitors = StopRule(stop).monitors()
    for row in snapshots(rows):
        if any([m.update(row, row["iteration"])[0] for m in monitors]):
            return row["iteration"]
    return snapshots(rows)[-1]["iteration"]


# ---- running and summarising runs --------------------------------------------------------------
def collect_runs(collect: Callable[..., dict], todo: Callable[[], Sequence[tuple]], jobs: int,
                 load: Path | None, save: Path | None) -> list[dict]:
    """The runs saved in ``load``; else ``collect(*args)`` for every tuple ``todo()`` gives,
    ``jobs`` at a time, in order, saved to ``save``."""
    if load:
        return json.loads(load.read_text())
    # spawned workers: torch's thread pools do not survive fork (forked workers ran ~10× slower)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(collect, *zip(*todo(), strict=True)))
    if save:
        save.write_text(json.dumps(runs, indent=1))
    return runs


def print_runs(runs: Sequence[dict], label: Callable[[dict], str], header: str) -> None:
    """One line per run: θ0 → best snapshot AP (its iteration) and the last snapshot's AP."""
    print(f"\n{header} {'AP@0.5 θ0→best (it)':>22} {'AP@0.75 θ0→best':>17} {'last@0.5':>9} "
          f"{'last@0.75':>10}")
    for run in runs:
        snaps = snapshots(run["rows"])
        best = max(snaps, key=lambda r: r["ap50"])
        print(f"{label(run)} {snaps[0]['ap50']:>8.3f}→{best['ap50']:.3f} ({best['iteration']:>3}) "
              f"{snaps[0]['ap75']:>8.3f}→{max(r['ap75'] for r in snaps):.3f} {snaps[-1]['ap50']:>9.3f} "
              f"{snaps[-1]['ap75']:>10.3f}")


# ---- replaying the rules on scored runs ---------------------------------------------------------
def _named(name: str) -> Callable[[list[Row]], Row]:
    return lambda rows: next(r for r in rows if r["candidate"] == name)


def _highest(key: str, lowest: bool = False) -> Callable[[list[Row]], Row]:
    """The snapshot with the highest (lowest) finite ``key``; θ0 when none is finite."""
    return lambda rows: best_row(snapshots(rows), lambda r: r.get(key, math.nan), lowest)


def _consensus_of(label: str) -> Callable[[list[Row]], Row]:
    """The candidate agreeing best with the consensus scored under ``label`` (a truncated pool)."""
    def select(rows: list[Row]) -> Row:
        return best_row([r for r in rows if f"consensus50_{label}" in r], lambda r: consensus_score(r, label))
    return select


def _guarded_variant(pick: Callable[[list[Row]], Row], signals: Sequence[str],
                     margin: float = GUARD_MARGIN) -> Callable[[list[Row]], Row]:
    """A ``guarded-*`` rule with another choice to guard (``pick``), other guard signals (each must
    pass :func:`passes_guard`) or another margin."""
    def select(rows: list[Row]) -> Row:
        chosen, base = pick(rows), theta0(rows)
        return chosen if all(passes_guard(chosen, base, s, margin) for s in signals) else base
    return select


def replays() -> dict[str, Callable[[list[Row]], Row]]:
    """Every selection compared: the library's ``--select`` rules (``stop`` once per ``--stop``
    rule), and variants that are not (yet) rules — other dropout rates, SWA with re-estimated
    BatchNorm statistics, consensus over the pool a ``--stop`` rule would have left, the guard with
    another margin, pool or signal."""
    out: dict[str, Callable[[list[Row]], Row]] = {
        "oracle": _highest("ap50"), "theta0": theta0}
    for name in RULES:
        if name == "labelled":
            continue
        if name == "stop":
            out.update({f"stop-{s}": (lambda s_: lambda rows: choose("stop", rows, StopRule(s_)))(s)
                        for s in STOPS})
        else:
            out[name] = (lambda n: lambda rows: choose(n, rows))(name)
    out.update({f"dropout@{r}": _highest(f"dropout_err_{r}", lowest=True)
                for r in DROPOUT_RATES if r != DROPOUT_RATE})
    out[SWA_BN], out[THETA0_BN] = _named(SWA_BN), _named(THETA0_BN)
    out.update({f"consensus+{s}-stop": _consensus_of(f"{s}-stop") for s in STOPS})

    def consensus(rows: list[Row]) -> Row:
        return consensus_pick(rows, "snapshots")

    for guard, signal in GUARDS.items():
        out[f"guarded-{guard}@0"] = _guarded_variant(consensus, (signal,), margin=0.0)
        out[f"guarded-{guard}@5%"] = _guarded_variant(consensus, (signal,), margin=0.05)
        out[f"guarded-{guard}-anchored"] = _guarded_variant(lambda rows: consensus_pick(rows, "anchored"),
                                                            (signal,))
        out[f"guarded-{guard}+both-stop"] = _guarded_variant(_consensus_of("both-stop"), (signal,))
    out["guarded-flow+dropout"] = _guarded_variant(consensus, ("flow_err", "dropout_err"))
    return out


def evaluate_rules(runs: Sequence[dict], rules: dict[str, Callable[[list[Row]], Row]] | None = None
                   ) -> dict[str, dict]:
    """Per rule over ``runs`` (each ``{"rows": [...]}``): mean and worst fraction of the best
    snapshot's gain over θ0 captured at AP@0.5 and AP@0.75 (over runs where that gain is at least
    :data:`MIN_GAIN`), harmful runs (deployed model below θ0 by more than :data:`HARM` at either
    IoU) and the worst AP difference to θ0 over all runs at each IoU."""
    rules = rules or replays()
    out = {}
    for name, select in rules.items():
        fractions: dict[str, list[float]] = {"ap50": [], "ap75": []}
        deltas: dict[str, list[float]] = {"ap50": [], "ap75": []}
        harmful = 0
        for run in runs:
            rows = run["rows"]
            base = theta0(rows)
            chosen = select(rows)
            harmful += any(chosen[k] < base[k] - HARM for k in ("ap50", "ap75"))
            for k in fractions:
                deltas[k].append(chosen[k] - base[k])
                best = max(r[k] for r in snapshots(rows))
                if best - base[k] >= MIN_GAIN:
                    fractions[k].append((chosen[k] - base[k]) / (best - base[k]))
        out[name] = {"harmful": harmful, **{
            f"{stat}_{k}": (fn(v) if v else math.nan) for k, v in fractions.items()
            for stat, fn in (("mean", lambda x: sum(x) / len(x)), ("worst", min))},
            **{f"worst_delta_{k}": min(v, default=math.nan) for k, v in deltas.items()}}
    return out


def print_rule_table(title: str, runs: Sequence[dict], costs: dict[str, float] | None = None,
                     rules: dict[str, Callable[[list[Row]], Row]] | None = None) -> dict:
    """The per-rule table (``rules``: default :func:`replays`); ``costs``: extra seconds per
    evaluation by rule name."""
    scores = evaluate_rules(runs, rules)
    print(f"\n{title}: {len(runs)} runs")
    print(f"{'rule':<26} {'gain@0.5':>8} {'worst':>6} {'gain@0.75':>9} {'worst':>6} {'harmful':>7} "
          f"{'worst Δ@0.5':>11} {'worst Δ@0.75':>12} {'extra s/eval':>12}")
    for name, s in scores.items():
        cost = (costs or {}).get(name)
        print(f"{name:<26} {s['mean_ap50']:>8.2f} {s['worst_ap50']:>6.2f} {s['mean_ap75']:>9.2f} "
              f"{s['worst_ap75']:>6.2f} {s['harmful']:>7} {s['worst_delta_ap50']:>+11.3f} "
              f"{s['worst_delta_ap75']:>+12.3f} {'' if cost is None else f'{cost:.1f}':>12}")
    return scores


def pick_default(real: dict[str, dict], synthetic: dict[str, dict] | None, candidates: Sequence[str]
                 ) -> tuple[str, str]:
    """The pre-registered choice (issue 18): among ``candidates`` (label-free rules) with no harmful
    real run — and none on the synthetic runs when given — the highest mean AP@0.5 gain captured;
    if none reaches 0.7, the fewest harmful runs, then the highest gain. Where no real run has a
    gain to capture (every rule's real gain undefined), the gain is the synthetic runs'.
    Returns (rule, why)."""
    def gain(name: str) -> float:
        for scores in (real, synthetic or {}):
            g = scores.get(name, {}).get("mean_ap50", math.nan)
            if math.isfinite(g):
                return g
        return -math.inf

    safe = [n for n in candidates if real[n]["harmful"] == 0
            and (synthetic is None or synthetic[n]["harmful"] == 0)]
    best = max(safe, key=gain, default=None)
    if best is not None and gain(best) >= 0.7:
        return best, f"no harmful run; highest mean AP@0.5 gain captured ({gain(best):.3f})"
    best = min(candidates, key=lambda n: (real[n]["harmful"] + (synthetic or {}).get(n, {}).get("harmful", 0),
                                          -gain(n)))
    return best, (f"no rule reaches 0.7 without harm; fewest harmful runs "
                  f"({real[best]['harmful']} real), then highest gain ({gain(best):.3f})")
