"""Settings of an adaptation run (``AdaptConfig``), their validation rules and their defaults.

Torch-free on import: the CLI builds ``sa-deploy adapt``'s option defaults from
:data:`ADAPT_DEFAULTS` (the dataclass's own field defaults) without importing torch, so ``--help``
stays fast and the defaults exist once. The choices (methods, stopping and selection rules, teacher
runtimes, precisions) are checked against their registries when a config is made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import TYPE_CHECKING

from selfadapt_deploy.rules import check_fields, count, one_of, real
from selfadapt_deploy.trainer.stop_rules import DEFAULT_STOP, STOP_RULES, TAU_EMB, TAU_FN

if TYPE_CHECKING:
    from selfadapt_deploy.models.base import SegmentationNet

#: how BatchNorm running statistics evolve while adapting (``--batchnorm-stats``): auto (keep when
#: training on Z-stack planes, else update), update (follow the training batches) or keep (θ0's)
BATCHNORM_STATS = ("auto", "update", "keep")


def config_rules() -> dict[str, tuple]:
    """The rule of every checked AdaptConfig field: (test, what the error says it must be). Choices
    come from their registries, imported here (not at module import: this module stays torch-free,
    so the CLI reads the defaults below without importing torch)."""
    from selfadapt_deploy.runtime.graphs import PRECISIONS
    from selfadapt_deploy.trainer.engine_teacher import TEACHER_RUNTIMES
    from selfadapt_deploy.trainer.methods import METHODS
    from selfadapt_deploy.trainer.selection import SELECTIONS

    return {
        "iterations": (count, "an integer ≥ 1"),
        "batch_size": (count, "an integer ≥ 1"),
        "lr": (lambda v: v is None or real(v, 0, open_lo=True),
               "a number > 0 (or unset: the family default)"),
        "l2sp": (lambda v: v is None or real(v, 0), "a number ≥ 0 (or unset: the family default)"),
        "weight_decay": (lambda v: real(v, 0), "a number ≥ 0"),
        "warmup_fraction": (lambda v: real(v, 0, 1), "a number in [0, 1)"),
        "lambda_bal": (lambda v: real(v, 0), "a number ≥ 0"),
        "ema_decay": (lambda v: real(v, 0, 1, open_hi=False), "a number in [0, 1]"),
        "ema_every": (count, "an integer ≥ 1"),
        "eval_every": (count, "an integer ≥ 1"),
        "stop": one_of((*STOP_RULES, "none")),
        "tau_fn": (lambda v: real(v, 0, open_lo=True), "a number > 0"),
        "tau_emb": (lambda v: real(v, 0, open_lo=True), "a number > 0"),
        "teacher_runtime": one_of(TEACHER_RUNTIMES),
        "teacher_sync": (count, "an integer ≥ 1"),
        "teacher_precision": one_of(tuple(PRECISIONS)),
        "amp": one_of(tuple(PRECISIONS)),
        "method": one_of(METHODS),
        "labelled_fraction": (lambda v: real(v, 0, 1, open_lo=True), "a number in (0, 1)"),
        "select": one_of(SELECTIONS),
        "batchnorm_stats": one_of(BATCHNORM_STATS),
        "train_tile": (lambda v: v is None or (count(v, 32) and v % 16 == 0),
                       "a multiple of 16 ≥ 32 (or unset: the family's tile)"),
        "seed": (lambda v: count(v, 0), "an integer ≥ 0"),
    }


#: older spellings still accepted (settings of earlier runs, API keywords): old → current
SPELLING_ALIASES = {"labeled_fraction": "labelled_fraction", "labeled": "labelled",
                    "val_labeled": "val_labelled"}


def respelled(data: dict) -> dict:
    """``data`` with older spellings of setting names (:data:`SPELLING_ALIASES`) replaced."""
    return {SPELLING_ALIASES.get(k, k): v for k, v in data.items()}


@dataclass(frozen=True)
class AdaptConfig:
    """Settings of one adaptation run (defaults: the paper's, scaled to CPU budgets)."""

    iterations: int = 150  # optimisation steps (paper: 25 000)
    batch_size: int = 4  # tiles per step (paper: 8)
    lr: float | None = None  # None → the family default
    l2sp: float | None = None  # λ_L2SP; None → the family default
    weight_decay: float = 1e-3  # AdamW
    warmup_fraction: float = 0.1  # linear warm-up, then cosine
    lambda_bal: float = 0.5
    ema_decay: float = 0.99
    ema_every: int = 1
    eval_every: int = 25  # K: stopping metrics and snapshots
    stop: str = DEFAULT_STOP  # flow | fn | emb | both | none (trainer/stopping.py)
    tau_fn: float = TAU_FN
    tau_emb: float = TAU_EMB
    prob_mask: bool = True
    flow_mask: bool = True
    augment: bool = True
    # teacher TTA: the 8 views in one forward (the method) or one forward per view (same numbers).
    # None = batched on CUDA, per view on CPU, where one 8×-larger batch measured 1.5–2× slower
    # (benchmarks/adapt_throughput.py).
    batched_teacher: bool | None = None
    # where the teacher's pseudo-labels come from: the torch EMA module, or its exported TTA graph
    # in onnxruntime / TensorRT with the EMA's weights pushed in every teacher_sync steps
    teacher_runtime: str = "torch"
    teacher_sync: int = 10
    teacher_precision: str = "fp32"  # of the exported teacher graph (onnx / tensorrt only)
    # mixed precision of teacher and student on CUDA: bf16 autocast (fp16 risks overflow in
    # Cellpose-SAM's ViT and needs loss scaling), fp16, or fp32; the CPU always runs fp32
    amp: str = "bf16"
    compile_teacher: bool = False  # torch.compile the EMA teacher's forward (tracks EMA updates)
    # selfadapt (label-free) | actis (every batch also holds labelled target tiles; implied by them)
    method: str = "selfadapt"
    labelled_fraction: float = 0.25  # ACTIS: share of each batch taken from labelled tiles (≥ 1 tile)
    # which candidate is deployed (trainer/selection.py): auto (labelled when held-out labelled
    # images are given, else the label-free default) | label-free (that default) | a rule's name
    select: str = "auto"
    # BatchNorm running statistics (CPnet; Cellpose-SAM has none): update (the student's follow its
    # training batches, the teacher averages them), keep (θ0's; in training each batch is still
    # normalised by its own statistics) or auto: keep when the training tiles include Z-stack
    # planes — updated from YX, ZX and ZY planes alike, they cost 3-D AP (README: Adapt → Z-stacks)
    batchnorm_stats: str = "auto"
    # side of the training tiles (pixels at the model's scale); None → the family's tile, or on
    # Z-stacks one their ZX/ZY planes fill a third of (stack_train_tile). Planes smaller than
    # a tile are zero-padded, and with BatchNorm kept the padding skews the batch statistics
    # training normalises by (README: Adapt → Z-stacks); only families without a fixed tile
    # (CPnet, Cellpose-DINO) accept another side
    train_tile: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        """Every field checked against its rule (:func:`config_rules`) before anything is read or
        written: one error naming the option, what it must be and what it got."""
        check_fields(self, config_rules())

    @property
    def warmup_steps(self) -> int:
        """Steps of linear learning-rate warm-up (SWA averages the snapshots after them)."""
        return max(1, int(self.warmup_fraction * self.iterations))

    def resolved(self, family: type[SegmentationNet] | SegmentationNet,
                 stacks: bool = False) -> AdaptConfig:
        """lr and l2sp left unset take the family's ``adapt_defaults`` (a family with a fixed tile
        refuses another ``train_tile``); ``batchnorm_stats`` auto becomes keep when
        the training tiles come from Z-stacks (``stacks``), else update. Idempotent: a resolved
        config resolves to itself."""
        from selfadapt_deploy.errors import SaDeployError

        d = family.adapt_defaults
        bn = self.batchnorm_stats
        if bn == "auto":
            bn = "keep" if stacks else "update"
        tile = self.train_tile
        if tile is not None and family.fixed_tile and tile != family.tile_size:
            raise SaDeployError(f"--train-tile {tile}: {family.family} runs on {family.tile_size}-px "
                                f"tiles only; drop --train-tile")
        return AdaptConfig(**{**asdict(self), "lr": self.lr or d["lr"],
                              "l2sp": d["l2sp"] if self.l2sp is None else self.l2sp,
                              "batchnorm_stats": bn})

    def training_tile(self, family: type[SegmentationNet] | SegmentationNet,
                      stacks: Sequence[tuple[int, int, int]] = (), anisotropy: float = 1.0,
                      rescale: float = 1.0) -> int:
        """The side of the tiles a run trains on: ``train_tile``, else on Z-stacks (their Z×Y×X
        ``shapes``) :func:`stack_train_tile` where the family takes any side, else the family's."""
        if self.train_tile is not None:
            return self.train_tile
        if stacks and not family.fixed_tile:
            return stack_train_tile(stacks, anisotropy, rescale, family.tile_size, family.diam_mean)
        return family.tile_size


Z_PLANE_SHARE = 3  # a stack's default tile is at most this many times its ZX/ZY planes' height


def stack_train_tile(shapes: Sequence[tuple[int, int, int]], anisotropy: float, rescale: float,
                     family_tile: int, diam_mean: float) -> int:
    """The default training tile on Z-stacks (Z×Y×X ``shapes``, at the network's scale after
    ``rescale`` and the Z resize by ``anisotropy``): at most :data:`Z_PLANE_SHARE` × the ZX/ZY
    planes' height, so a Z-plane fills at least a third of its zero-padded tile (mostly padding,
    the tiles skew the batch statistics training normalises by: README, Adapt → Z-stacks); at
    least two cell diameters; never above the YX planes or the family's tile; a multiple of 16."""
    def down(v: float) -> int:
        return max(32, 16 * int(v // 16))

    height = min(max(1, round(z * anisotropy)) * rescale for z, _, _ in shapes)
    upper = min(family_tile, down(min(min(y, x) for _, y, x in shapes) * rescale))
    lower = min(upper, 16 * math.ceil(2 * diam_mean / 16))
    return max(lower, min(upper, down(Z_PLANE_SHARE * height)))


#: every AdaptConfig field's default, for the CLI's option defaults (no second copy)
ADAPT_DEFAULTS = {f.name: f.default for f in fields(AdaptConfig) if f.default is not MISSING}
