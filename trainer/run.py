"""``sa-deploy adapt``: images on disk → prepared tiles and validation set → ``adapt`` → report.

The run's inputs and settings are written to ``settings.json`` before training starts, so
``--resume RUN`` needs nothing else.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.readers import read_network_images
from selfadapt_deploy.io.writers import atomic_path
from selfadapt_deploy.models import load_model
from selfadapt_deploy.models.base import ModelSpec
from selfadapt_deploy.trainer.averaging import batchnorms
from selfadapt_deploy.trainer.candidates import AVERAGES_DIR, SELECTION_CSV
from selfadapt_deploy.trainer.config import respelled
from selfadapt_deploy.trainer.data import TileSampler, as_planes, prepare_image
from selfadapt_deploy.trainer.labelled import find_pairs, labels_at_scale, read_pairs
from selfadapt_deploy.trainer.loop import (
    SNAPSHOTS,
    AdaptConfig,
    Validation,
    adapt,
    split_indices,
)
from selfadapt_deploy.trainer.pool import POOL
from selfadapt_deploy.trainer.report import plot_curves
from selfadapt_deploy.trainer.source import LabelledTiles
from selfadapt_deploy.volume import NO_SMOOTHING, Sigmas3, check_flow3d_smooth

SETTINGS = "settings.json"


@dataclass(frozen=True)
class RunInputs:
    """What an adaptation run is started on: saved as ``settings.json`` (``asdict``) before training
    starts and read back with ``cls(**data)`` by ``--resume``, so a run needs nothing else. Runs
    written before a field existed resume with its default."""

    images: tuple[str, ...]
    model: str
    config: AdaptConfig
    diameter: float | None = None
    channels: tuple[int, ...] | None = None
    channel_axis: int | None = None
    series: int | None = None
    val_images: tuple[str, ...] = ()
    val_fraction: float = 0.2
    keep_snapshots: bool = True
    labelled: tuple[str, ...] = ()  # ACTIS: labelled target images (folders or file pairs)
    val_labelled: tuple[str, ...] = ()  # held-out labelled images that score every candidate
    source: tuple[str, ...] = ()  # CULPICO: labelled source images
    model2: str | None = None  # CULPICO: its second network
    z_axis: int | None = None  # Z-stacks whose axes are not recorded
    anisotropy: float = 1.0  # Z-stacks: Z step ÷ Y/X pixel size (ZX/ZY planes resized by it)
    flow3d_smooth: Sigmas3 = NO_SMOOTHING  # held-out stacks' 3-D flow smoothing

    def __post_init__(self) -> None:
        """Sequences from callers and JSON become tuples (paths as strings), so the inputs are
        frozen and ``asdict`` writes them as plain JSON lists."""
        for name in ("images", "val_images", "labelled", "val_labelled", "source"):
            object.__setattr__(self, name, tuple(str(p) for p in getattr(self, name)))
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "model", str(self.model))
        if self.model2 is not None:
            object.__setattr__(self, "model2", str(self.model2))
        object.__setattr__(self, "flow3d_smooth", check_flow3d_smooth(self.flow3d_smooth))

    def save(self, run: Path) -> None:
        with atomic_path(Path(run) / SETTINGS) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run: Path) -> RunInputs:
        """The inputs a run was started with (for ``--resume``)."""
        path = Path(run) / SETTINGS
        if not path.is_file():
            raise SaDeployError(f"{run}: not an adaptation run directory (no {SETTINGS})")
        data = respelled(json.loads(path.read_text()))
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise SaDeployError(f"{path}: unknown settings {', '.join(unknown)} (written by a newer "
                                "sa-deploy?)")
        return cls(**{**data, "config": AdaptConfig(**respelled(data["config"]))})


def run_adapt(inputs: RunInputs, out: Path, device: torch.device, resume: bool = False,
              report: Callable[[str], None] = print,
              progress: Callable[[int, dict], None] | None = None,
              before_reading: Callable[[ModelSpec], None] | None = None) -> dict:
    """Adapt ``inputs.model`` to ``inputs.images`` — without labels (SelfAdapt), with a few
    labelled target images in every batch (ACTIS, ``labelled``), or with two cooperating networks
    (CULPICO, ``config.method``; ``model2`` its second network, ``source`` its labelled source
    images); ``val_labelled`` images score every snapshot by AP. Results in the run directory ``out``.
    ``before_reading(the model's spec)`` runs once the model is loaded, before any image is read
    (``api``: the memory check of held-out stacks)."""
    out = Path(out)
    images, model, config, diameter = inputs.images, inputs.model, inputs.config, inputs.diameter
    channels = list(inputs.channels) if inputs.channels is not None else None
    channel_axis, series, val_images = inputs.channel_axis, inputs.series, inputs.val_images
    labelled, val_labelled, source, model2 = (inputs.labelled, inputs.val_labelled, inputs.source,
                                            inputs.model2)
    culpico = config.method == "culpico"
    if culpico and labelled:
        raise SaDeployError("CULPICO learns from labelled *source* images (--source); --labelled gives "
                            "ACTIS its labelled target images")
    if (source or model2) and not culpico:
        raise SaDeployError("--source and --model2 belong to --method culpico")
    net = load_model(model, device)
    config.resolved(net)  # a --train-tile the family cannot run fails before any image is read
    if before_reading is not None:
        before_reading(net.spec)
    partner = load_model(model2, device) if model2 else None
    if partner is not None and (partner.family, partner.nchan) != (net.family, net.nchan):
        raise SaDeployError(f"--model2 {model2} is a {partner.family} with {partner.nchan} channels; "
                            f"CULPICO's two networks must match {model} ({net.family}, {net.nchan})")
    pad = net.pads_missing_channels
    labelled_pairs = read_pairs(find_pairs(source if culpico else labelled), net.nchan, pad, channels,
                                channel_axis, series)
    val_pairs = read_pairs(find_pairs(val_labelled), net.nchan, pad, channels, channel_axis, series)
    # Z-stacks train as their YX, ZX and ZY planes and are held out whole (scored in 3-D)
    data = read_network_images(images, net.nchan, pad, channels, channel_axis, series, report, True,
                               inputs.z_axis)
    held_out = read_network_images(val_images, net.nchan, pad, channels, channel_axis, series, report,
                                   True, inputs.z_axis)
    if not data:
        raise SaDeployError("no readable training images; check the paths and formats above")
    if ((inputs.anisotropy != 1.0 or inputs.flow3d_smooth != NO_SMOOTHING)
            and not any(image.ndim == 4 for image in [*data, *held_out])):
        raise SaDeployError("--anisotropy and --flow3d-smooth apply to Z-stacks, and none of the "
                            "images is one (a Z axis comes from the file's recorded axes, or "
                            "--z-axis); drop them for 2-D images")
    if held_out:
        train_idx, val = list(range(len(data))), held_out
    else:
        train_idx, val_idx = split_indices(len(data), inputs.val_fraction, config.seed)
        val = [data[i] for i in val_idx]
    rescale = net.diam_mean / (diameter or net.default_diameter)
    planes = as_planes([data[i] for i in train_idx], inputs.anisotropy)
    stack_shapes = [(data[i].shape[0], *data[i].shape[2:]) for i in train_idx if data[i].ndim == 4]
    stacks = bool(stack_shapes)
    # auto BatchNorm statistics depend on the data: kept at θ0's when training on stack planes
    config = config.resolved(net, stacks=stacks)
    tile = config.training_tile(net, stack_shapes, inputs.anisotropy, rescale)
    config = replace(config, train_tile=tile)  # run.json records the tile trained on
    train = TileSampler([prepare_image(plane, rescale) for plane in planes], tile)
    validation = Validation.from_images(val, rescale, tile, diameter, inputs.anisotropy,
                                        inputs.flow3d_smooth)
    validation.labelled = val_pairs
    tiles = None
    if labelled_pairs:
        tiles = LabelledTiles([prepare_image(im, rescale) for im, _ in labelled_pairs],
                              [labels_at_scale(lab, rescale) for _, lab in labelled_pairs], tile)
    if not resume:
        inputs.save(out)
    report(f"{net.family}: {len(train_idx)} training / {len(val)} validation images"
           + (f" ({len(planes)} training planes from the stacks; held-out stacks are segmented in 3-D)"
              if stacks else "")
           + (" (held out: --val)" if held_out
              else f" (of {len(data)} image{'s' * (len(data) != 1)} read)")
           + (f", {len(labelled_pairs)} labelled {'source' if culpico else 'target (ACTIS)'}"
              if labelled_pairs else "")
           + (f", {len(val_pairs)} held-out labelled" if val_pairs else "")
           + f", rescale {rescale:.3f}, tiles {tile}×{tile}")
    if len(data) == 1 and not held_out:
        report("note: the one image is both the training and the validation image, so the label-free "
               "signals measure it on what it trains on; give --val IMAGE for a held-out one")
    if config.batchnorm_stats == "keep" and batchnorms(net):
        report("BatchNorm running statistics stay the pretrained model's (--batchnorm-stats "
               f"{inputs.config.batchnorm_stats}{': training on stack planes' * stacks})")
    summary = adapt(net, train, validation, out, config, resume=resume, progress=progress,
                    labelled=tiles, partner=partner)
    cfg = summary["config"]
    plot_curves(out / "metrics.csv", out / "curves.png", cfg["tau_fn"], cfg["tau_emb"],
                summary["selected_iteration"], out / SELECTION_CSV)
    if not inputs.keep_snapshots:  # model.pt is a copy of the selected candidate; its file stays too
        keep = f"{summary['selected']}.pt"
        for snap in [*(out / SNAPSHOTS).iterdir(), *(out / AVERAGES_DIR).glob("*.pt")]:
            if snap.name != keep:
                snap.unlink()
        shutil.rmtree(out / POOL, ignore_errors=True)
    return summary
