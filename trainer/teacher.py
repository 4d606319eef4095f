"""Teacher pseudo-labels: predict on the 8 D4 views, map each back, average; TTA spread = uncertainty."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from selfadapt_deploy.tiling import D4, d4_ensemble, d4_transform, d4_views


@dataclass
class TeacherOutput:
    """Ensemble of the 8 views in the input frame: flows B×2×H×W, cell probability B×H×W, and the
    per-pixel standard deviation across views of each (flows_std B×2×H×W, prob_std B×H×W)."""

    flows: torch.Tensor
    prob: torch.Tensor
    flows_std: torch.Tensor
    prob_std: torch.Tensor

    @classmethod
    def from_graph(cls, outputs: dict[str, torch.Tensor]) -> TeacherOutput:
        """From the outputs of the exported teacher-TTA graph (``runtime.base.TEACHER_GRAPH``)."""
        return cls(flows=outputs["flows"], prob=outputs["prob"][:, 0],
                   flows_std=outputs["flows_std"], prob_std=outputs["prob_std"][:, 0])

    def max_abs_diff(self, other: TeacherOutput) -> float:
        return max(float((getattr(self, f) - getattr(other, f).to(getattr(self, f).device)).abs().max())
                   for f in ("flows", "prob", "flows_std", "prob_std"))


class PseudoLabeler(Protocol):
    """Teacher pseudo-labels from somewhere other than the torch EMA module (an exported graph in
    onnxruntime or TensorRT): ``(square tiles B×C×S×S, step) → (TeacherOutput, metrics)``."""

    def __call__(self, x: torch.Tensor, step: int) -> tuple[TeacherOutput, dict[str, float]]: ...


@torch.no_grad()
def teacher_predict(teacher: nn.Module, x: torch.Tensor, batched: bool = True) -> TeacherOutput:
    """Pseudo-labels for square tiles ``x`` (B×C×H×W). ``batched`` runs all 8 views in one forward;
    otherwise one forward per view (the same numbers, for comparison in benchmarks)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"D4 views need square tiles, got {tuple(x.shape[-2:])}")
    if batched:
        y = teacher(d4_views(x))
    else:
        y = torch.cat([teacher(d4_transform(x, k, flip)) for k, flip in D4])
    flows, prob, flows_std, prob_std = d4_ensemble(y)
    return TeacherOutput(flows=flows, prob=prob[:, 0], flows_std=flows_std, prob_std=prob_std[:, 0])
