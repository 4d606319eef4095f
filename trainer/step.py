"""One SelfAdapt optimisation step, in the order of the method (DESIGN.md §2)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.tiling import d4_transform
from selfadapt_deploy.trainer.augment import StrongAugment, move_flow_mask, move_map, random_d4
from selfadapt_deploy.trainer.confidence import ConfidenceMasks
from selfadapt_deploy.trainer.ema import EMA
from selfadapt_deploy.trainer.losses import cellprob_loss, flow_loss, l2sp_penalty
from selfadapt_deploy.trainer.source import cellpose_loss
from selfadapt_deploy.trainer.teacher import PseudoLabeler, teacher_predict


@dataclass
class Backprop:
    """Autocast, backward and optimiser step, as every method runs them: under fp16 autocast on
    CUDA the loss is scaled (``GradScaler``), and the scaler's state goes into the checkpoint with
    :meth:`state_dict`, so an fp16 run resumes exactly. bf16 and fp32 need no scaling."""

    device: torch.device
    amp: torch.dtype | None = None  # autocast dtype on CUDA; None: fp32
    scaler: torch.amp.GradScaler | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.amp is torch.float16 and torch.device(self.device).type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    def autocast(self):
        return mixed_precision(torch.device(self.device), self.amp)

    def step(self, loss: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Gradients of ``loss`` (scaled if needed), then every optimiser's step."""
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            return
        self.scaler.scale(loss).backward()
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:  # older checkpoints have none
            self.scaler.load_state_dict(state["scaler"])


@dataclass
class Adaptation:
    """The state one step reads and changes: networks, optimiser, anchors θ0, mask thresholds."""

    student: SegmentationNet
    teacher: EMA
    optimizer: torch.optim.Optimizer
    anchors: list[torch.Tensor]  # θ0 of every trainable parameter, same order as parameters()
    masks: ConfidenceMasks
    augment: StrongAugment | None  # None only for the no-augmentation ablation
    lambda_bal: float = 0.5
    lambda_l2sp: float = 1e-2
    ema_every: int = 1
    backprop: Backprop | None = None  # None: fp32 (autocast and loss scaling: Backprop)
    batched_teacher: bool = True  # False: one teacher forward per D4 view (benchmarks only)
    pseudo_labeler: PseudoLabeler | None = None  # None: the torch EMA teacher itself
    compiled_teacher: torch.nn.Module | None = None  # torch.compile of the EMA module, if asked

    def __post_init__(self) -> None:
        if self.backprop is None:
            self.backprop = Backprop(self.student.device)

    def autocast(self):
        return self.backprop.autocast()


def mixed_precision(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on CUDA; nothing on the CPU or without a dtype (fp32)."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def train_step(state: Adaptation, x: torch.Tensor, step: int, g: torch.Generator,
               labelled: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """Teacher pseudo-labels → masks → strongly augmented student → loss + L2-SP → AdamW → EMA.

    ``labelled`` (ACTIS): labelled tiles and their cellpose targets join the student's batch;
    their supervised loss (cellpose's) is added to the consistency loss of the unlabelled tiles.
    Without them the step is SelfAdapt's, operation for operation."""
    student, device = state.student, state.student.device
    x = x.to(device)
    # (1) teacher: 8 D4 views in one forward, mapped back and averaged; TTA std = uncertainty
    extra: dict[str, float] = {}
    if state.pseudo_labeler is None:
        with state.autocast():
            teacher_out = teacher_predict(state.compiled_teacher or state.teacher, x,
                                          state.batched_teacher)
    else:  # the same ensemble as an exported graph in onnxruntime / TensorRT
        teacher_out, extra = state.pseudo_labeler(x, step)
    # (2) confidence masks: hard cell label, M_p from EMA'd class quantiles, M_f from EMA'd std
    labels = state.masks(teacher_out.prob.float(), teacher_out.flows_std.float())
    # (3) student view: one random D4 for image, targets and masks; intensity augmentation
    k, flip = random_d4(g)
    x_student = d4_transform(x, k, flip)
    if state.augment is not None:
        x_student = state.augment(x_student, g)  # on the device
    target_flows = d4_transform(teacher_out.flows.float(), k, flip, vector=True)
    cell, mask_p = move_map(labels.cell, k, flip), move_map(labels.mask_prob, k, flip)
    mask_f = move_flow_mask(labels.mask_flows, k, flip)
    # (4) L = BCE·M_p + λ_bal·MSE·M_f + λ_L2SP·Σ(w − w0)²  [+ cellpose's loss on labelled tiles]
    student.train()
    n = len(x_student)
    if labelled is not None:
        x_student = torch.cat([x_student, labelled[0].to(device)])
    with state.autocast():
        y = student(x_student)
    y, y_labelled = y[:n], y[n:]
    loss_prob = cellprob_loss(y[:, 2].float(), cell, mask_p)
    loss_flow = flow_loss(y[:, :2].float(), target_flows, mask_f)
    trainable = [p for p in student.parameters() if p.requires_grad]
    loss_l2sp = l2sp_penalty(trainable, state.anchors)
    loss = loss_prob + state.lambda_bal * loss_flow + state.lambda_l2sp * loss_l2sp
    extra_terms = {}
    if labelled is not None:
        loss_sup = cellpose_loss(y_labelled.float(), labelled[1].to(device))
        loss = loss + loss_sup
        extra_terms["loss_sup"] = loss_sup
    # (5) AdamW step (decoupled weight decay), with loss scaling under CUDA fp16 autocast
    state.backprop.step(loss, [state.optimizer])
    # (6) teacher ← EMA of the student, in place
    if (step + 1) % state.ema_every == 0:
        state.teacher.update_(student, step)
    terms = {"loss": loss, "loss_prob": loss_prob, "loss_flow": loss_flow, "loss_l2sp": loss_l2sp,
             "kept_prob": labels.mask_prob.mean(), "kept_flow": labels.mask_flows.mean(), **extra_terms}
    return {**{name: value.item() for name, value in terms.items()}, **extra}  # a CPU-GPU sync point
