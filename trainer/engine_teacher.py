"""The teacher's pseudo-labels from an optimised runtime (``adapt --teacher-runtime onnx|tensorrt``).

The teacher-TTA graph (``runtime.graphs.TeacherTTAGraph``: exactly ``teacher_predict``'s
ensemble) is exported once from the EMA teacher into ``<run>/teacher_engine/``. Every
``sync_every`` steps the EMA's current weights go into the live runner — onnxruntime: a new
session from the updated initialisers; TensorRT: a refit of the engine, never a rebuild — and the
torch teacher's pseudo-labels on that step's tiles are computed as the reference: their largest
difference is logged as ``teacher_err`` in ``metrics.csv``. Between syncs the runner's teacher
lags the EMA by up to ``sync_every − 1`` updates: that is the trade-off the option sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.export.onnx_export import export_onnx, tolerance
from selfadapt_deploy.io.writers import atomic_path
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.runtime.base import TEACHER_GRAPH, Runner
from selfadapt_deploy.runtime.graphs import graph_module
from selfadapt_deploy.runtime.ort_runner import OrtRunner
from selfadapt_deploy.trainer.teacher import TeacherOutput, teacher_predict

ENGINE_DIR = "teacher_engine"
TEACHER_RUNTIMES = ("torch", "onnx", "tensorrt")


class RunnerTeacher:
    """A :class:`~selfadapt_deploy.trainer.teacher.PseudoLabeler` over an active teacher-TTA runner.
    A runner that disagrees with the torch teacher at a sync point beyond what its precision and
    device allow (the export's validation tolerance) stops the run: training on wrong pseudo-labels
    would not announce itself."""

    def __init__(self, runner: Runner, teacher: SegmentationNet, sync_every: int,
                 precision: str = "fp32"):
        if sync_every < 1:
            raise SaDeployError(f"--teacher-sync must be ≥ 1, got {sync_every}")
        self.runner, self.teacher, self.sync_every = runner, teacher, sync_every
        self.tolerance = tolerance(precision, runner.device)
        # at fp32 the graph module shares the EMA's parameters: its state_dict is always current,
        # named as the exported graph's initializers
        self.weights = graph_module(teacher, TEACHER_GRAPH)
        self.synced = False

    def __call__(self, x: torch.Tensor, step: int) -> tuple[TeacherOutput, dict[str, float]]:
        if self.synced and step % self.sync_every:
            return TeacherOutput.from_graph(self.runner.run(x)), {}
        self.runner.update_weights(self.weights.state_dict())
        self.synced = True
        out = TeacherOutput.from_graph(self.runner.run(x))
        reference = teacher_predict(self.teacher, x)
        err = out.max_abs_diff(reference)
        bound = self.tolerance * max(1.0, float(reference.flows.abs().max()))
        if not err <= bound:
            raise SaDeployError(f"{self.runner.name}'s teacher disagrees with the torch teacher at step "
                                f"{step} (max |Δ| {err:.3g} > {bound:.3g}); its pseudo-labels cannot "
                                "be trusted — use --teacher-runtime torch")
        return out, {"teacher_err": err}

    def close(self) -> None:
        self.runner.deactivate()


def open_engine_teacher(teacher: SegmentationNet, runtime: str, precision: str, directory: Path,
                        device: torch.device, sync_every: int, max_batch: int) -> RunnerTeacher:
    """Export the teacher graph into ``directory`` and open it in ``runtime`` on ``device``."""
    if runtime not in TEACHER_RUNTIMES[1:]:
        raise SaDeployError(f"--teacher-runtime must be one of {', '.join(TEACHER_RUNTIMES)}, got "
                            f"'{runtime}'")
    onnx_path = Path(directory) / f"{TEACHER_GRAPH.name}.onnx"
    onnx_bytes = export_onnx(teacher, TEACHER_GRAPH, precision).SerializeToString()
    with atomic_path(onnx_path) as tmp:
        tmp.write_bytes(onnx_bytes)
    spec = teacher.spec
    if runtime == "onnx":
        runner: Runner = OrtRunner(onnx_path, spec, TEACHER_GRAPH, device)
    else:
        runner = _tensorrt_teacher(onnx_bytes, teacher, precision, Path(directory), device, max_batch)
    runner.activate()
    return RunnerTeacher(runner, teacher, sync_every, precision)


def _tensorrt_teacher(onnx_bytes: bytes, teacher: SegmentationNet, precision: str, directory: Path,
                      device: torch.device, max_batch: int) -> Runner:
    """The refittable engine of the teacher graph; a resumed run reuses its engine when it was
    built here (its weights are replaced at the first sync anyway)."""
    from selfadapt_deploy.export.tensorrt import build_engine, needs_fp32_graph
    from selfadapt_deploy.runtime.trt_runner import TrtRunner, engine_mismatch

    plan, record_path = directory / f"{TEACHER_GRAPH.name}.plan", directory / "engine.json"
    spec = teacher.spec
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if not (plan.is_file() and record and record.get("precision") == precision
            and record.get("max_batch", 0) >= max_batch and not engine_mismatch(record, device)):
        if needs_fp32_graph(precision):
            onnx_bytes = export_onnx(teacher, TEACHER_GRAPH, "fp32").SerializeToString()
        build = build_engine(onnx_bytes, TEACHER_GRAPH, spec, teacher.nchan, precision, max_batch,
                             directory / "timing.cache", device)
        with atomic_path(plan) as tmp:
            tmp.write_bytes(build.plan)
        record = {**build.record, "precision": precision}
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
    return TrtRunner(plan, spec, TEACHER_GRAPH, device, record)
