"""The end of a run: the candidate table, the weight averages a rule asks for, consensus scores,
and the rule's choice copied to ``model.pt`` (the loop calls :func:`select_candidate`).

Files: ``averages/<name>.pt`` (weight averages, the family's cellpose format),
``pool/<candidate>/`` (predictions on the held-out images, :mod:`pool`) and ``selection.csv``
(every candidate with every signal measured on it).
"""

from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from selfadapt_deploy.io.writers import atomic_path
from selfadapt_deploy.models import load_model
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.postprocess import MaskParams
from selfadapt_deploy.segment import SegmentParams, mask_params, rescale_factor
from selfadapt_deploy.trainer.averaging import average_state, recompute_batchnorm
from selfadapt_deploy.trainer.pool import PredictionPool
from selfadapt_deploy.trainer.selection import (
    RULES,
    THETA0,
    Row,
    StopRule,
    choose,
    consensus_members,
    explain,
    snapshot_name,
)
from selfadapt_deploy.trainer.validation import Validation, evaluate_drift

MODEL, AVERAGES_DIR, SELECTION_CSV = "model.pt", "averages", "selection.csv"
TABLE_POOL = "snapshots"  # the consensus every run's table reports, whatever the rule


def build_average(name: str, snapshots: dict[int, Path], warmup: int, out: Path,
                  device: torch.device, bn_tiles: torch.Tensor | None = None) -> SegmentationNet:
    """The weight average ``name`` of the snapshot files, saved to ``out`` (strictly loadable
    wherever a model is accepted) and returned; with ``bn_tiles``, BatchNorm statistics are
    re-estimated on them instead of averaged."""
    with atomic_path(out) as tmp:
        torch.save(average_state(name, snapshots, warmup), tmp)
    net = load_model(out, device)
    if bn_tiles is not None and recompute_batchnorm(net, bn_tiles):
        net.save(out)
    return net


def consensus_params(params: SegmentParams, net: SegmentationNet) -> MaskParams:
    """How consensus outputs become masks: as the candidates' own outputs did."""
    return mask_params(params, rescale_factor(net.spec, params.diameter))


def score_consensus(rows: Sequence[Row], pool: PredictionPool, params: MaskParams, label: str,
                    members: Mapping[str, float]) -> None:
    """Add each row's agreement with the consensus of ``members`` (name → weight) to it, as
    ``consensus50_<label>`` and ``consensus75_<label>``."""
    scores = pool.consensus_scores(members, [r["candidate"] for r in rows], params)
    for row in rows:
        row[f"consensus50_{label}"], row[f"consensus75_{label}"] = scores[row["candidate"]]


def write_table(path: Path, rows: Sequence[Row]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in keys} for row in rows)


def select_candidate(rule: str, evaluated: Sequence[dict], val: Validation, pool: PredictionPool,
                     out: Path, snapshots_dir: Path, deployed: SegmentationNet, warmup: int,
                     stop: StopRule, bn_tiles: torch.Tensor | None = None) -> dict:
    """Build the candidates ``rule`` needs, score them, copy its choice to ``out/model.pt``;
    returns the ``selection`` block of ``run.json``."""
    tic = time.perf_counter()
    rows = [{"candidate": snapshot_name(r["iteration"]), **r} for r in evaluated]
    snapshot_files = {r["iteration"]: snapshots_dir / f"{r['candidate']}.pt" for r in rows}
    files = {r["candidate"]: snapshot_files[r["iteration"]] for r in rows}
    for name in RULES[rule].averages:
        files[name] = out / AVERAGES_DIR / f"{name}.pt"
        net = build_average(name, snapshot_files, warmup, files[name], deployed.device, bn_tiles)
        signals, segs = evaluate_drift(net, val, snapshot=False, dropout=RULES[rule].dropout)
        pool.add(name, segs)
        rows.append({"candidate": name, "iteration": None, **signals})
    params = consensus_params(val.params, deployed)
    for name in dict.fromkeys([TABLE_POOL, RULES[rule].pool or TABLE_POOL]):
        score_consensus(rows, pool, params, name, consensus_members(rows, name))
    chosen = choose(rule, rows, stop)
    with atomic_path(out / MODEL) as tmp:
        shutil.copyfile(files[chosen["candidate"]], tmp)
    write_table(out / SELECTION_CSV, rows)
    return {"rule": rule, "candidate": chosen["candidate"], "iteration": chosen["iteration"],
            "why": explain(rule, chosen, rows),
            "pretrained_deployed": chosen["candidate"] == THETA0, "candidates": len(rows),
            "seconds": time.perf_counter() - tic}
