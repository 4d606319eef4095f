"""Confidence masks for pseudo-labels (ACTIS thresholds, DESIGN.md §2 step 2).

Cell probability: hard label = p > 0.5; confidence = p for cells, 1 − p for background; per class,
keep pixels whose confidence exceeds an EMA (momentum 0.99) of that class's k-th quantile (k=0.2).
Flows: per component, keep pixels whose TTA standard deviation is below an EMA of its 80th
percentile. Each mask can be switched off (then it keeps every pixel) for ablations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTILE_MAX = 2**24  # torch.quantile's input limit; larger inputs are strided


def _quantile(values: torch.Tensor, q: float) -> float:
    values = values.flatten()
    if values.numel() > QUANTILE_MAX:
        values = values[:: -(-values.numel() // QUANTILE_MAX)]
    return float(torch.quantile(values, q))


def _ema(old: float | None, new: float, momentum: float) -> float:
    return new if old is None else momentum * old + (1.0 - momentum) * new


@dataclass
class PseudoLabels:
    """Hard cell label B×H×W, its mask M_p (B×H×W) and the flow mask M_f (B×2×H×W), all float."""

    cell: torch.Tensor
    mask_prob: torch.Tensor
    mask_flows: torch.Tensor


class ConfidenceMasks:
    """Stateful thresholds (EMA across steps); ``state_dict`` for resuming."""

    def __init__(self, k: float = 0.2, flow_percentile: float = 80.0, momentum: float = 0.99,
                 use_prob_mask: bool = True, use_flow_mask: bool = True):
        if not 0 < k < 1 or not 0 < flow_percentile < 100:
            raise ValueError("k must be in (0, 1) and flow_percentile in (0, 100)")
        self.k, self.flow_q, self.momentum = k, flow_percentile / 100.0, momentum
        self.use_prob_mask, self.use_flow_mask = use_prob_mask, use_flow_mask
        self.prob_thresholds: list[float | None] = [None, None]  # background, cell
        self.flow_thresholds: list[float | None] = [None, None]  # dY, dX

    @torch.no_grad()
    def __call__(self, prob: torch.Tensor, flows_std: torch.Tensor) -> PseudoLabels:
        cell = (prob > 0.5).float()
        mask_prob = torch.ones_like(prob)
        if self.use_prob_mask:
            confidence = torch.where(cell > 0, prob, 1.0 - prob).float()
            for c in (0, 1):
                values = confidence[cell == c]
                if values.numel():
                    q = _quantile(values, self.k)
                    self.prob_thresholds[c] = _ema(self.prob_thresholds[c], q, self.momentum)
            for c in (0, 1):
                if self.prob_thresholds[c] is not None:
                    mask_prob[(cell == c) & (confidence <= self.prob_thresholds[c])] = 0
        mask_flows = torch.ones_like(flows_std)
        if self.use_flow_mask:
            for j in (0, 1):
                std = flows_std[:, j].float()
                q = _quantile(std, self.flow_q)
                self.flow_thresholds[j] = _ema(self.flow_thresholds[j], q, self.momentum)
                mask_flows[:, j] = (std < self.flow_thresholds[j]).float()
        return PseudoLabels(cell=cell, mask_prob=mask_prob, mask_flows=mask_flows)

    def state_dict(self) -> dict:
        return {"prob_thresholds": list(self.prob_thresholds),
                "flow_thresholds": list(self.flow_thresholds)}

    def load_state_dict(self, state: dict) -> None:
        self.prob_thresholds = list(state["prob_thresholds"])
        self.flow_thresholds = list(state["flow_thresholds"])
