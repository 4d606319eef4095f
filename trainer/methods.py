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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.tiling import d4_transform
from selfadapt_deploy.trainer.augment import StrongAugment, random_d4
from selfadapt_deploy.trainer.confidence import ConfidenceMasks
from selfadapt_deploy.trainer.ema import EMA
from selfadapt_deploy.trainer.losses import l2sp_penalty
from selfadapt_deploy.trainer.source import cellpose_loss
from selfadapt_deploy.trainer.step import Adaptation, Backprop, train_step
from selfadapt_deploy.trainer.teacher import PseudoLabeler


class Method(Protocol):
    """What the loop needs from a method."""

    name: str
    optimizers: list[torch.optim.Optimizer]
    deployed_description: str  # which network is deployed, in run.json's words
    has_teacher: bool  # an EMA teacher whose pseudo-labels an exported graph can serve

    @property
    def deployed(self) -> SegmentationNet: ...  # evaluated, snapshotted and selected

    def step(self, x: torch.Tensor, step: int, g: torch.Generator,
             labelled: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SelfAdaptMethod:
    """SelfAdapt / ACTIS over an :class:`Adaptation`; the EMA teacher is deployed."""

    deployed_description = "the EMA teacher"
    has_teacher = True

    def __init__(self, state: Adaptation, name: str = "selfadapt"):
        self.state, self.name = state, name
        self.optimizers = [state.optimizer]

    def use_pseudo_labeler(self, labeler: PseudoLabeler) -> None:
        """Pseudo-labels from ``labeler`` (the teacher's exported graph) instead of torch's."""
        self.state.pseudo_labeler = labeler

    @property
    def deployed(self) -> SegmentationNet:
        return self.state.teacher.module

    def step(self, x, step, g, labelled):
        return train_step(self.state, x, step, g, labelled)

    def state_dict(self) -> dict:
        s = self.state
        return {"student": s.student.state_dict(), "teacher": s.teacher.module.state_dict(),
                "optimizer": s.optimizer.state_dict(), "anchors": s.anchors,
                "masks": s.masks.state_dict(), "backprop": s.backprop.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        s = self.state
        s.student.load_state_dict(state["student"])
        s.teacher.module.load_state_dict(state["teacher"])
        s.optimizer.load_state_dict(state["optimizer"])
        s.anchors[:] = state["anchors"]
        s.masks.load_state_dict(state["masks"])
        s.backprop.load_state_dict(state.get("backprop", {}))


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
    backprop: Backprop | None = None  # None: fp32

    def __post_init__(self) -> None:
        if self.backprop is None:
            self.backprop = Backprop(self.net_a.device)

    def autocast(self):
        return self.backprop.autocast()


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
    # the two graphs are separate: each net gets its own loss's gradients
    c.backprop.step(losses[0] + losses[1], [c.optimizer_a, c.optimizer_b])
    with torch.no_grad():
        p_a, p_b = torch.sigmoid(y_a[:n, 2].float()), torch.sigmoid(y_b[:n, 2].float())
        agreement = cooperative_weight(p_a, p_b)
    terms.update(loss=losses[0], loss_b=losses[1], agreement=agreement.mean())
    return {name: float(value.detach()) for name, value in terms.items()}


class CulpicoMethod:
    """CULPICO over a :class:`Cooperative`; network A (started from θ0) is deployed."""

    name = "culpico"
    deployed_description = "network A (started from the pretrained model)"
    has_teacher = False

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
                "anchors_a": s.anchors_a, "anchors_b": s.anchors_b, "backprop": s.backprop.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        s = self.state
        s.net_a.load_state_dict(state["net_a"])
        s.net_b.load_state_dict(state["net_b"])
        s.optimizer_a.load_state_dict(state["optimizer_a"])
        s.optimizer_b.load_state_dict(state["optimizer_b"])
        s.backprop.load_state_dict(state.get("backprop", {}))
        s.anchors_a[:] = state["anchors_a"]
        s.anchors_b[:] = state["anchors_b"]

    def use_pseudo_labeler(self, labeler: PseudoLabeler) -> None:
        raise SaDeployError("CULPICO has no EMA teacher whose pseudo-labels a graph could serve")


def _trainable(net: nn.Module) -> list[torch.Tensor]:
    return [p for p in net.parameters() if p.requires_grad]


def _adamw(cfg, net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_trainable(net), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_selfadapt(cfg, student: SegmentationNet, has_labelled: bool,
                    partner: SegmentationNet | None, backprop: Backprop) -> SelfAdaptMethod:
    """SelfAdapt, or ACTIS when labelled target tiles join the batches (``has_labelled``)."""
    cuda = student.device.type == "cuda"
    state = Adaptation(student=student, teacher=EMA(student, cfg.ema_decay), optimizer=_adamw(cfg, student),
                       anchors=[p.detach().clone() for p in _trainable(student)],
                       masks=ConfidenceMasks(use_prob_mask=cfg.prob_mask, use_flow_mask=cfg.flow_mask),
                       augment=StrongAugment() if cfg.augment else None, lambda_bal=cfg.lambda_bal,
                       lambda_l2sp=cfg.l2sp, ema_every=cfg.ema_every, backprop=backprop,
                       batched_teacher=cuda if cfg.batched_teacher is None else cfg.batched_teacher)
    if cfg.compile_teacher:
        state.compiled_teacher = torch.compile(state.teacher.module)
    return SelfAdaptMethod(state, "actis" if has_labelled else "selfadapt")


def build_culpico(cfg, student: SegmentationNet, has_labelled: bool,
                  partner: SegmentationNet | None, backprop: Backprop) -> CulpicoMethod:
    """CULPICO over ``student`` and ``partner`` (or ``student`` with its read-out perturbed)."""
    net_b = (partner or perturbed_readout(student, seed=cfg.seed)).to(student.device)
    return CulpicoMethod(Cooperative(
        net_a=student, net_b=net_b, optimizer_a=_adamw(cfg, student), optimizer_b=_adamw(cfg, net_b),
        anchors_a=[p.detach().clone() for p in _trainable(student)],
        anchors_b=[p.detach().clone() for p in _trainable(net_b)],
        augment=StrongAugment() if cfg.augment else None, lambda_l2sp=cfg.l2sp, backprop=backprop))


#: every adaptation method, by ``--method`` name: its factory
#: (AdaptConfig, student, has labelled tiles, partner network, Backprop) → Method
METHODS: dict[str, Callable[..., Method]] = {
    "selfadapt": build_selfadapt,
    "actis": build_selfadapt,  # ACTIS is SelfAdapt with labelled target tiles in every batch
    "culpico": build_culpico,
}
