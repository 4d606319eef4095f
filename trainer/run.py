"""``sa-deploy adapt``: images on disk → prepared tiles and validation set → ``adapt`` → report.

The run's inputs and settings are written to ``settings.json`` before training starts, so
``--resume RUN`` needs nothing else.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.readers import read_network_images
from selfadapt_deploy.io.writers import atomic_path
from selfadapt_deploy.models import load_model
from selfadapt_deploy.trainer.candidates import AVERAGES_DIR, SELECTION_CSV
from selfadapt_deploy.trainer.data import TileSampler, prepare_image
from selfadapt_deploy.trainer.labelled import find_pairs, labels_at_scale, read_pairs
from selfadapt_deploy.trainer.loop import SNAPSHOTS, AdaptConfig, Validation, adapt, split_indices
from selfadapt_deploy.trainer.pool import POOL
from selfadapt_deploy.trainer.report import plot_curves
from selfadapt_deploy.trainer.source import LabelledTiles

SETTINGS = "settings.json"


def run_adapt(images: Sequence[str], model: str, out: Path, config: AdaptConfig,
              device: torch.device, diameter: float | None = None,
              channels: list[int] | None = None, channel_axis: int | None = None,
              series: int | None = None, val_images: Sequence[str] = (),
              val_fraction: float = 0.2, keep_snapshots: bool = True, resume: bool = False,
              report: Callable[[str], None] = print,
              progress: Callable[[int, dict], None] | None = None,
              labeled: Sequence[str] = (), val_labeled: Sequence[str] = (),
              source: Sequence[str] = (), model2: str | None = None) -> dict:
    """Adapt ``model`` to ``images`` — without labels (SelfAdapt), with a few labelled target
    images in every batch (ACTIS, ``labeled``), or with two cooperating networks (CULPICO,
    ``config.method``; ``model2`` its second network, ``source`` its labelled source images);
    ``val_labeled`` images score every snapshot by AP. Results in the run directory ``out``."""
    out = Path(out)
    culpico = config.method == "culpico"
    if culpico and labeled:
        raise SaDeployError("CULPICO learns from labelled *source* images (--source); --labeled gives "
                            "ACTIS its labelled target images")
    if (source or model2) and not culpico:
        raise SaDeployError("--source and --model2 belong to --method culpico")
    net = load_model(model, device)
    partner = load_model(model2, device) if model2 else None
    if partner is not None and (partner.family, partner.nchan) != (net.family, net.nchan):
        raise SaDeployError(f"--model2 {model2} is a {partner.family} with {partner.nchan} channels; "
                            f"CULPICO's two networks must match {model} ({net.family}, {net.nchan})")
    pad = net.pads_missing_channels
    labelled_pairs = read_pairs(find_pairs(source if culpico else labeled), net.nchan, pad, channels,
                                channel_axis, series, report)
    val_pairs = read_pairs(find_pairs(val_labeled), net.nchan, pad, channels, channel_axis, series,
                           report)
    data = read_network_images(images, net.nchan, pad, channels, channel_axis, series, report)
    held_out = read_network_images(val_images, net.nchan, pad, channels, channel_axis, series, report)
    if not data:
        raise SaDeployError("no readable training images; check the paths and formats above")
    if held_out:
        train_idx, val = list(range(len(data))), held_out
    else:
        train_idx, val_idx = split_indices(len(data), val_fraction, config.seed)
        val = [data[i] for i in val_idx]
    rescale = net.diam_mean / (diameter or net.default_diameter)
    tile = net.tile_size
    train = TileSampler([prepare_image(data[i], rescale) for i in train_idx], tile)
    validation = Validation.from_images(val, rescale, tile, diameter)
    validation.labelled = val_pairs
    labelled = None
    if labelled_pairs:
        labelled = LabelledTiles([prepare_image(im, rescale) for im, _ in labelled_pairs],
                                 [labels_at_scale(lab, rescale) for _, lab in labelled_pairs], tile)
    if not resume:
        with atomic_path(out / SETTINGS) as tmp:
            tmp.write_text(json.dumps({
                "images": [str(p) for p in images], "model": str(model), "diameter": diameter,
                "channels": channels, "channel_axis": channel_axis, "series": series,
                "val_images": [str(p) for p in val_images], "val_fraction": val_fraction,
                "keep_snapshots": keep_snapshots, "labeled": list(labeled),
                "val_labeled": list(val_labeled), "source": list(source), "model2": model2,
                "config": asdict(config)}, indent=2))
    report(f"{net.family}: {len(train_idx)} training / {len(val)} validation images"
           + (f", {len(labelled_pairs)} labelled {'source' if culpico else 'target (ACTIS)'}"
              if labelled_pairs else "")
           + (f", {len(val_pairs)} held-out labelled" if val_pairs else "")
           + f", rescale {rescale:.3f}, tiles {tile}×{tile}")
    summary = adapt(net, train, validation, out, config, resume=resume, progress=progress,
                    labelled=labelled, partner=partner)
    cfg = summary["config"]
    plot_curves(out / "metrics.csv", out / "curves.png", cfg["tau_fn"], cfg["tau_emb"],
                summary["selected_iteration"], out / SELECTION_CSV)
    if not keep_snapshots:  # model.pt is a copy of the selected candidate; its file stays too
        keep = f"{summary['selected']}.pt"
        for snap in [*(out / SNAPSHOTS).iterdir(), *(out / AVERAGES_DIR).glob("*.pt")]:
            if snap.name != keep:
                snap.unlink()
        shutil.rmtree(out / POOL, ignore_errors=True)
    return summary


def resume_settings(run: Path) -> dict:
    """The settings a run was started with (for ``--resume``)."""
    path = Path(run) / SETTINGS
    if not path.is_file():
        raise SaDeployError(f"{run}: not an adaptation run directory (no {SETTINGS})")
    settings = json.loads(path.read_text())
    settings["config"] = AdaptConfig(**settings["config"])
    return settings
