"""``adapt``: orchestrates SelfAdapt over a run directory; the step itself is ``step.train_step``.

Run directory: ``checkpoint.pt`` (everything needed to resume, written atomically at every
evaluation), ``snapshots/iter_XXXXXX.pt`` (teacher weights at every evaluation, in the family's
cellpose format), ``pool/`` (each snapshot's predictions on the held-out images),
``metrics.csv``, ``selection.csv`` (every candidate and its signals), ``run.json`` and
``model.pt`` (the candidate the ``--select`` rule chose, ``trainer/selection.py``).
The deployed network is the EMA teacher.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from selfadapt_deploy import __version__
from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.writers import atomic_path
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.models.loading import load_plain
from selfadapt_deploy.runtime.graphs import PRECISIONS
from selfadapt_deploy.trainer.averaging import keep_batchnorm_statistics
from selfadapt_deploy.trainer.candidates import MODEL, select_candidate
from selfadapt_deploy.trainer.config import AdaptConfig
from selfadapt_deploy.trainer.data import TileSampler, keeps_global_rng
from selfadapt_deploy.trainer.engine_teacher import ENGINE_DIR, open_engine_teacher
from selfadapt_deploy.trainer.methods import (
    METHODS,
    Method,
)
from selfadapt_deploy.trainer.pool import POOL, PredictionPool
from selfadapt_deploy.trainer.schedule import lr_at
from selfadapt_deploy.trainer.selection import RULES, StopRule, resolve_rule, snapshot_name
from selfadapt_deploy.trainer.source import LabelledTiles
from selfadapt_deploy.trainer.step import Backprop
from selfadapt_deploy.trainer.stopping import monitors_for
from selfadapt_deploy.trainer.validation import Validation, embed, evaluate_drift

__all__ = ["MODEL", "AdaptConfig", "Validation", "adapt", "split_indices"]

# Per-family defaults (README "Defaults" has the sweep, benchmarks/adapt_sweep.py). CPnet: lr 1e-4
# with L2-SP 1e-2 helped within ~150 iterations of batch 4 on real labelled data, where lr 1e-3
# with L2-SP 1e-4 drifted (issue 3); the sweep agrees it helps and stays inside the stopping
# thresholds. CPSAM: 1e-5 is cellpose 4's own fine-tuning default for the 300 M-parameter network.
CHECKPOINT, SNAPSHOTS, METRICS, RUN_JSON = "checkpoint.pt", "snapshots", "metrics.csv", "run.json"


def autocast_dtype(amp: str) -> torch.dtype | None:
    """``--amp`` → the autocast dtype on CUDA (None: fp32, no autocast)."""
    return None if amp == "fp32" else PRECISIONS[amp]


def labelled_per_batch(cfg: AdaptConfig, labelled: LabelledTiles | None) -> int:
    """ACTIS: labelled tiles per batch — round(fraction × batch), at least one of each kind."""
    if labelled is None:
        if cfg.method == "actis":
            raise SaDeployError("--method actis adapts with labelled target images: give --labelled")
        return 0
    if not 0 < cfg.labelled_fraction < 1 or cfg.batch_size < 2:
        raise SaDeployError("ACTIS needs 0 < --labelled-fraction < 1 and --batch-size ≥ 2 (every batch "
                            "holds labelled and unlabelled tiles)")
    return min(cfg.batch_size - 1, max(1, round(cfg.labelled_fraction * cfg.batch_size)))


def _tensors(masks: list[np.ndarray]) -> list[torch.Tensor]:
    """Label images as int64 tensors, so that checkpoints load with ``weights_only=True``."""
    return [torch.from_numpy(m.astype(np.int64)) for m in masks]


def _write_metrics(path: Path, rows: list[dict]) -> None:
    keys = ["iteration", "loss", "loss_prob", "loss_flow", "loss_l2sp", "loss_sup", "lr", "kept_prob",
            "kept_flow", "teacher_err", "fn_rate", "d_emb", "flow_err", "tta_spread", "agree_prev",
            "dropout_err", "ap50_labelled", "ap75_labelled"]
    keys += sorted({k for row in rows for k in row} - set(keys))  # a method's own terms (CULPICO)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in keys} for row in rows)


def build_method(cfg: AdaptConfig, student: SegmentationNet, has_labelled: bool,
                 partner: SegmentationNet | None = None) -> Method:
    """The method ``cfg.method`` over ``student`` (CULPICO: and its partner network — ``partner``,
    or ``student`` with a perturbed read-out), built by its factory in :data:`METHODS`. With
    ``batchnorm_stats`` keep, the networks' BatchNorm running statistics stay θ0's for good
    (the student is trained in place: the run consumes it)."""
    if cfg.batchnorm_stats == "keep":
        for net in (student, partner):
            if net is not None:
                keep_batchnorm_statistics(net)
    return METHODS[cfg.method](cfg, student, has_labelled, partner,
                               Backprop(student.device, autocast_dtype(cfg.amp)))


@keeps_global_rng
def adapt(student: SegmentationNet, train: TileSampler, val: Validation, out: Path,
          config: AdaptConfig, resume: bool = False,
          progress: Callable[[int, dict], None] | None = None,
          labelled: LabelledTiles | None = None, partner: SegmentationNet | None = None) -> dict:
    """Run (or resume) an adaptation — SelfAdapt; ACTIS with ``labelled`` target tiles in every
    batch; CULPICO (``config.method``) with ``partner`` as its second network and ``labelled``
    as its labelled source tiles — and return the run summary also written to ``run.json``."""
    run = Run(config.resolved(student), student, train, val, Path(out), labelled, partner, progress)
    run.restore(resume)
    if not run.rows:  # θ0's evaluation (a run resumed before its first step has it already)
        run.evaluate()
        run.checkpoint()
    run.train()
    return run.select()


class Run:
    """One adaptation run's state and its phases — restore (from ``checkpoint.pt``), train,
    evaluate (snapshot, label-free signals, stopping rules), select (the ``--select`` rule,
    ``run.json``) — which :func:`adapt` runs in that order."""

    def __init__(self, cfg: AdaptConfig, student: SegmentationNet, train: TileSampler,
                 val: Validation, out: Path, labelled: LabelledTiles | None,
                 partner: SegmentationNet | None, progress: Callable[[int, dict], None] | None):
        self.cfg, self.student, self.data, self.val, self.out = cfg, student, train, val, out
        self.labelled, self.progress = labelled, progress
        self.n_labelled = labelled_per_batch(cfg, labelled)
        self.rule = resolve_rule(cfg.select, bool(val.labelled))
        self.pool = PredictionPool(out / POOL, len(val.images))
        out.mkdir(parents=True, exist_ok=True)
        (out / SNAPSHOTS).mkdir(exist_ok=True)
        self.g = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the global stream (a ViT's layer drop); adapt forks it
        self.method = build_method(cfg, student, self.n_labelled > 0, partner)
        self.monitors = monitors_for(cfg.stop, cfg.tau_fn, cfg.tau_emb)
        self.rows: list[dict] = []
        self.eval_seconds: list[float] = []
        self.step, self.stopped, self.reason, self.seconds_before = 0, False, "", 0.0
        self.tic = time.perf_counter()

    def restore(self, resume: bool) -> None:
        """Everything ``checkpoint`` saved, when resuming one; else θ0's reference masks and
        embedding (the label-free signals measure drift from them)."""
        val, device = self.val, self.student.device
        if resume and (self.out / CHECKPOINT).is_file():
            ckpt = load_plain(self.out / CHECKPOINT, "checkpoint")
            self.method.load_state_dict(ckpt)
            for m, s in zip(self.monitors, ckpt["monitors"], strict=True):
                m.load_state_dict(s)
            self.g.set_state(ckpt["generator"])
            if "torch_rng" in ckpt:  # the global stream (ViT layer drop) continues where it stopped
                torch.set_rng_state(ckpt["torch_rng"])
            if "cuda_rng" in ckpt and device.type == "cuda":
                torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
            self.rows, self.step = ckpt["rows"], ckpt["step"]
            self.stopped, self.reason = ckpt["stopped"], ckpt["reason"]
            self.seconds_before, self.eval_seconds = ckpt["seconds"], ckpt.get("eval_seconds", [])
            val.reference_embedding = ckpt["ref_embedding"]
            val.reference_masks = [m.numpy() for m in ckpt["ref_masks"]]
            val.previous_masks = [m.numpy() for m in ckpt["previous_masks"]]
        else:
            val.reference_masks = [seg.masks for seg in val.segment(self.method.deployed)]
            val.reference_embedding = embed(self.method.deployed, val.tiles)
        self.tic = time.perf_counter()

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.tic

    def checkpoint(self) -> None:
        """Everything needed to resume at ``self.step``, atomically; and ``metrics.csv``."""
        device, val = self.student.device, self.val
        cuda_rng = {"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
        with atomic_path(self.out / CHECKPOINT) as tmp:
            torch.save({**self.method.state_dict(),
                        "monitors": [m.state_dict() for m in self.monitors],
                        "generator": self.g.get_state(), "torch_rng": torch.get_rng_state(), **cuda_rng,
                        "rows": self.rows, "step": self.step, "stopped": self.stopped,
                        "reason": self.reason, "ref_masks": _tensors(val.reference_masks),
                        "previous_masks": _tensors(val.previous_masks), "seconds": self.seconds(),
                        "eval_seconds": self.eval_seconds, "ref_embedding": val.reference_embedding}, tmp)
        _write_metrics(self.out / METRICS, self.rows)

    def evaluate(self) -> None:
        """Snapshot the deployed network, measure the label-free signals (its predictions go to
        the pool), and let the stopping rules see them."""
        t0, name = time.perf_counter(), snapshot_name(self.step)
        deployed = self.method.deployed
        deployed.save(self.out / SNAPSHOTS / f"{name}.pt")
        drift, segs = evaluate_drift(deployed, self.val, dropout=RULES[self.rule].dropout)
        self.pool.add(name, segs)  # the predictions the evaluation made anyway
        self.rows.append({"iteration": self.step, **drift})
        self.eval_seconds.append(time.perf_counter() - t0)  # to run.json, not metrics.csv: not reproducible
        for m in self.monitors:
            should_stop, why = m.update(drift, self.step)
            # the label-free criteria are always logged; they end the run unless labels select
            if should_stop and not self.stopped and self.rule != "labelled":
                self.stopped, self.reason = True, why

    def train(self) -> None:
        """Steps until ``iterations`` or a stopping rule; evaluation and checkpoint every
        ``eval_every`` steps (and at the last)."""
        cfg, method = self.cfg, self.method
        engine = None
        if cfg.teacher_runtime != "torch":
            if not method.has_teacher:
                raise SaDeployError(f"--teacher-runtime {cfg.teacher_runtime} serves SelfAdapt's EMA "
                                    f"teacher; {method.name} has none")
            engine = open_engine_teacher(method.deployed, cfg.teacher_runtime, cfg.teacher_precision,
                                         self.out / ENGINE_DIR, self.student.device, cfg.teacher_sync,
                                         cfg.batch_size)
            method.use_pseudo_labeler(engine)
        n = self.n_labelled
        try:
            while self.step < cfg.iterations and not self.stopped:
                lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.iterations)
                for optimizer in method.optimizers:
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                x = self.data.sample(cfg.batch_size - n, self.g)
                terms = method.step(x, self.step, self.g, self.labelled.sample(n, self.g) if n else None)
                self.step += 1
                self.rows.append({"iteration": self.step, "lr": lr, **terms})
                if self.progress is not None:
                    self.progress(self.step, terms)
                if self.step % cfg.eval_every == 0 or self.step == cfg.iterations:
                    self.evaluate()
                    self.checkpoint()
        finally:
            if engine is not None:
                engine.close()

    def select(self) -> dict:
        """The ``--select`` rule over every candidate → ``model.pt``; the summary → ``run.json``."""
        cfg, method = self.cfg, self.method
        evaluated = [r for r in self.rows if "d_emb" in r]
        selection = select_candidate(self.rule, evaluated, self.val, self.pool, self.out,
                                     self.out / SNAPSHOTS, method.deployed, cfg.warmup_steps,
                                     StopRule(cfg.stop, cfg.tau_fn, cfg.tau_emb))
        if self.rule == "stop":
            selection["why"] += (f"; {self.reason}" if self.stopped else "; the run ended without stopping: "
                                 + "; ".join(m.summary() for m in self.monitors) if self.monitors else "")
        summary = {"selected": selection["candidate"], "selected_iteration": selection["iteration"],
                   "stopped_early": self.stopped, "stop_reason": self.reason,
                   "method": method.name, "labelled_per_batch": self.n_labelled,
                   "deployed": method.deployed_description, "selection": selection,
                   "iterations_run": self.step, "config": asdict(cfg), "family": self.student.family,
                   "seconds": self.seconds(),
                   "seconds_per_evaluation": sum(self.eval_seconds) / max(1, len(self.eval_seconds)),
                   "sa_deploy": __version__, "torch": torch.__version__}
        with atomic_path(self.out / RUN_JSON) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        return summary


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) image indices: a seeded split with at least one image on each side
    when there are two or more; a single image serves both."""
    if n == 1:
        return [0], [0]
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(fraction * n)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())
