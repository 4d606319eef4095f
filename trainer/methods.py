"""Adaptation methods behind one loop (``loop.adapt``): a method owns its networks, optimisers and
step; the loop owns data, schedule, evaluation, snapshots, checkpoints, stopping and selection.

* :class:`SelfAdaptMethod` — SelfAdapt (EMA teacher, confidence masks, strong augmentation,
  L2-SP), and ACTIS when labelled target tiles join the batch (``step.train_step``).
* :class:`CulpicoMethod` — cooperative two-network adaptation: each network's binarised cell
  probability is the other's pseudo-label, weighted per pixel by 1 − |p_a − p_b|; flows are pulled
  towards each other with the same weight; labelled *source* tiles, when given, add cellpose's
  supervised loss to both; L2-SP towards each network's start is the source-free anchor. Network A
  starts from θ0 and is the one deployed; B is its partner (a second model, or θ0 with its read-out
  perturbed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.tiling import d4_transform
from selfadapt_deploy.trainer.augment import StrongAugment, random_d4
from selfadapt_deploy.trainer.losses import l2sp_penalty
from selfadapt_deploy.trainer.source import cellpose_loss
from selfadapt_deploy.trainer.step import Adaptation, mixed_precision, train_step

METHODS = ("selfadapt", "actis", "culpico")


class Method(Protocol):
    """What the loop needs from a method."""

    name: str
    optimizers: list[torch.optim.Optimizer]

    @property
    def deployed(self) -> SegmentationNet: ...  # evaluated, snapshotted and selected

    def step(self, x: torch.Tensor, step: int, g: torch.Generator,
             labelled: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SelfAdaptMethod:
    """SelfAdapt / ACTIS over an :class:`Adaptation`; the EMA teacher is deployed."""

    def __init__(self, state: Adaptation, name: str = "selfadapt"):
        self.state, self.name = state, name
        self.optimizers = [state.optimizer]

    @property
    def deployed(self) -> SegmentationNet:
        return self.state.teacher.module

    def step(self, x, step, g, labelled):
        return train_step(self.state, x, step, g, labelled)

    def state_dict(self) -> dict:
        s = self.state
        return {"student": s.student.state_dict(), "teacher": s.teacher.module.state_dict(),
                "optimizer": s.optimizer.state_dict(), "anchors": s.anchors,
                "masks": s.masks.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        s = self.state
        s.student.load_state_dict(state["student"])
        s.teacher.module.load_state_dict(state["teacher"])
        s.optimizer.load_state_dict(state["optimizer"])
        s.anchors[:] = state["anchors"]
        s.masks.load_state_dict(state["masks"])


def cooperative_weight(p_a: torch.Tensor, p_b: torch.Tensor) -> torch.Tensor:
    """CULPICO's pixel-level weight 1 − |p_a − p_b| (no gradient): pixels the two networks agree
    on count fully, pixels they disagree on count little — no confidence threshold to tune."""
    return (1.0 - (p_a - p_b).abs()).detach()


def cooperative_losses(y_a: torch.Tensor, y_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of A, loss of B) on the same unlabelled tiles (B×3×H×W each): BCE towards the other
    network's binarised cell probability and MSE towards its flows, both weighted per pixel."""
    p_a, p_b = torch.sigmoid(y_a[:, 2].float()), torch.sigmoid(y_b[:, 2].float())
    w = cooperative_weight(p_a, p_b)

    def towards(y: torch.Tensor, other: torch.Tensor, p_other: torch.Tensor) -> torch.Tensor:
        target = (p_other > 0.5).float().detach()
        bce = F.binary_cross_entropy_with_logits(y[:, 2].float(), target, reduction="none")
        mse = ((y[:, :2].float() - other[:, :2].float().detach()) ** 2).mean(dim=1)
        return (w * bce).mean() + (w * mse).mean()

    return towards(y_a, y_b, p_b), towards(y_b, y_a, p_a)


def perturbed_readout(net: SegmentationNet, scale: float = 0.1, seed: int = 0) -> SegmentationNet:
    """A copy of ``net`` whose read-out (its last trainable convolution) gets Gaussian noise of
    ``scale`` × that weight's std: CULPICO's second network when no second model is given."""
    partner = copy.deepcopy(net)
    convs = [m for m in partner.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    weight = convs[-1].weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        noise = torch.randn(weight.shape, generator=g).to(weight)
        weight.add_(scale * float(weight.std()) * noise)
    return partner


@dataclass
class Cooperative:
    """The state a CULPICO step reads and changes."""

    net_a: SegmentationNet
    net_b: SegmentationNet
    optimizer_a: torch.optim.Optimizer
    optimizer_b: torch.optim.Optimizer
    anchors_a: list[torch.Tensor]
    anchors_b: list[torch.Tensor]
    augment: StrongAugment | None
    lambda_l2sp: float = 1e-2
    amp: torch.dtype | None = None

    def autocast(self):
        return mixed_precision(self.net_a.device, self.amp)


def cooperative_step(c: Cooperative, x: torch.Tensor, step: int, g: torch.Generator,
                     labelled: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """One CULPICO step: both networks on the same augmented view of the unlabelled tiles (and the
    labelled source tiles), cooperative losses + supervised loss + L2-SP, both optimisers step."""
    device = c.net_a.device
    k, flip = random_d4(g)
    view = d4_transform(x.to(device), k, flip)
    if c.augment is not None:
        view = c.augment(view, g)
    n = len(view)
    if labelled is not None:
        view = torch.cat([view, labelled[0].to(device)])
    c.net_a.train()
    c.net_b.train()
    with c.autocast():
        y_a, y_b = c.net_a(view), c.net_b(view)
    coop_a, coop_b = cooperative_losses(y_a[:n], y_b[:n])
    terms = {"loss_coop_a": coop_a, "loss_coop_b": coop_b}
    losses = []
    for name, net, y, coop, anchors in (("a", c.net_a, y_a, coop_a, c.anchors_a),
                                        ("b", c.net_b, y_b, coop_b, c.anchors_b)):
        l2sp = l2sp_penalty([p for p in net.parameters() if p.requires_grad], anchors)
        loss = coop + c.lambda_l2sp * l2sp
        if labelled is not None:
            sup = cellpose_loss(y[n:].float(), labelled[1].to(device))
            loss = loss + sup
            terms[f"loss_sup_{name}"] = sup
        terms[f"loss_l2sp_{name}"] = l2sp
        losses.append(loss)
    for optimizer in (c.optimizer_a, c.optimizer_b):
        optimizer.zero_grad(set_to_none=True)
    (losses[0] + losses[1]).backward()  # the two graphs are separate: each net gets its own loss
    for optimizer in (c.optimizer_a, c.optimizer_b):
        optimizer.step()
    with torch.no_grad():
        p_a, p_b = torch.sigmoid(y_a[:n, 2].float()), torch.sigmoid(y_b[:n, 2].float())
        agreement = cooperative_weight(p_a, p_b)
    terms.update(loss=losses[0], loss_b=losses[1], agreement=agreement.mean())
    return {name: float(value.detach()) for name, value in terms.items()}


class CulpicoMethod:
    """CULPICO over a :class:`Cooperative`; network A (started from θ0) is deployed."""

    name = "culpico"

    def __init__(self, state: Cooperative):
        self.state = state
        self.optimizers = [state.optimizer_a, state.optimizer_b]

    @property
    def deployed(self) -> SegmentationNet:
        return self.state.net_a

    def step(self, x, step, g, labelled):
        return cooperative_step(self.state, x, step, g, labelled)

    def state_dict(self) -> dict:
        s = self.state
        return {"net_a": s.net_a.state_dict(), "net_b": s.net_b.state_dict(),
                "optimizer_a": s.optimizer_a.state_dict(), "optimizer_b": s.optimizer_b.state_dict(),
                "anchors_a": s.anchors_a, "anchors_b": s.anchors_b}

    def load_state_dict(self, state: dict) -> None:
        s = self.state
        s.net_a.load_state_dict(state["net_a"])
        s.net_b.load_state_dict(state["net_b"])
        s.optimizer_a.load_state_dict(state["optimizer_a"])
        s.optimizer_b.load_state_dict(state["optimizer_b"])
        s.anchors_a[:] = state["anchors_a"]
        s.anchors_b[:] = state["anchors_b"]
