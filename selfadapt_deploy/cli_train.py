"""``sa-deploy adapt`` and ``sa-deploy demo``: the adaptation commands (registered in ``cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from selfadapt_deploy.cli_options import (
    ChannelAxisOpt,
    ChannelsOpt,
    DeviceOpt,
    SeriesOpt,
    ZAxisOpt,
    console,
    err_console,
    fail,
    parse_channels,
    parse_floats,
    plain,
)
from selfadapt_deploy.trainer.config import ADAPT_DEFAULTS as D  # torch-free: --help stays fast


def adapt(
    images: Annotated[list[Path] | None, typer.Argument(help="Unlabeled TIFF / OME-TIFF / PNG "
                                                        "images, or folders of them.")] = None,
    model: Annotated[str | None, typer.Option(help="Pretrained model: weights file, run or export directory "
                                              "or Cellpose name.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory to create.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run directory "
                                                "(its settings are reused).")] = None,
    diameter: Annotated[float, typer.Option(help="Cell diameter in pixels; 0 = the model's "
                                            "default, as in segment.")] = 0.0,
    iterations: Annotated[int, typer.Option(help="Optimisation steps.")] = D["iterations"],
    batch_size: Annotated[int, typer.Option(help="Tiles per step.")] = D["batch_size"],
    lr: Annotated[float, typer.Option(help="Peak learning rate; 0 = family default (CPnet 1e-4, "
                                      "Cellpose-SAM 1e-5).")] = 0.0,
    l2sp: Annotated[float, typer.Option(help="λ of the L2-SP pull towards the pretrained weights; "
                                        "-1 = family default (1e-2).")] = -1.0,
    ema_every: Annotated[int, typer.Option(help="Update the EMA teacher every N steps.")] = D["ema_every"],
    eval_every: Annotated[int, typer.Option(help="Evaluate stopping metrics and snapshot every K "
                                            "steps.")] = D["eval_every"],
    stop: Annotated[str, typer.Option(help="End the run early by a label-free criterion: flow (no "
                                      "lower flow error for 4 evaluations), fn, emb, both (the "
                                      "paper's thresholds) or none (the whole budget; --select "
                                      "chooses among every snapshot).")
                    ] = D["stop"],
    val_fraction: Annotated[float, typer.Option(help="Share of the images held out for "
                                                "stopping.")] = 0.2,
    val: Annotated[list[Path] | None, typer.Option(help="Held-out images for stopping (instead of "
                                                   "a split).")] = None,
    keep_snapshots: Annotated[bool, typer.Option(help="Keep every snapshot for manual "
                                                 "choice.")] = True,
    prob_mask: Annotated[bool, typer.Option(help="Confidence mask on cell probability.")] = D["prob_mask"],
    flow_mask: Annotated[bool, typer.Option(help="Confidence mask on flows.")] = D["flow_mask"],
    augment: Annotated[bool, typer.Option(help="Strong student augmentation.")] = D["augment"],
    teacher_runtime: Annotated[str, typer.Option(help="Teacher pseudo-labels from torch, or from its "
                                                 "exported TTA graph in onnx (onnxruntime) or "
                                                 "tensorrt.")] = D["teacher_runtime"],
    teacher_sync: Annotated[int, typer.Option(help="Push the EMA teacher's weights into the onnx / "
                                              "tensorrt teacher every N steps.")] = D["teacher_sync"],
    teacher_precision: Annotated[str, typer.Option(help="Precision of the exported teacher graph: "
                                                   "fp32, fp16 or bf16.")] = D["teacher_precision"],
    amp: Annotated[str, typer.Option(help="Mixed precision of teacher and student on CUDA: bf16 "
                                     "(autocast), fp16 (autocast + loss scaling) or fp32. The "
                                     "CPU runs fp32.")] = D["amp"],
    compile_teacher: Annotated[bool, typer.Option(help="torch.compile the torch teacher (first "
                                                  "steps compile).")] = D["compile_teacher"],
    method: Annotated[str, typer.Option(help="selfadapt (label-free), actis (labelled target tiles in "
                                        "every batch; implied by --labelled) or culpico (two "
                                        "cooperating networks).")] = D["method"],
    model2: Annotated[str | None, typer.Option(help="CULPICO: its second network (same family); "
                                               "default: the model with a perturbed read-out.")] = None,
    source: Annotated[list[str] | None, typer.Option(help="CULPICO: labelled source images (a folder of "
                                                     "<stem>.tif + <stem>_masks.tif, or IMAGE=MASKS); "
                                                     "without them it runs source-free.")] = None,
    labelled: Annotated[list[str] | None, typer.Option(
        "--labelled", "--labeled", help="Labelled target images for ACTIS: a folder of <stem>.tif + "
        "<stem>_masks.tif, or IMAGE=MASKS (repeatable).")] = None,
    labelled_fraction: Annotated[float, typer.Option(
        "--labelled-fraction", "--labeled-fraction",
        help="ACTIS: share of each batch from labelled tiles (at least one).")] = D["labelled_fraction"],
    val_labelled: Annotated[list[str] | None, typer.Option(
        "--val-labelled", "--val-labeled",
        help="Held-out labelled images (same forms): AP@0.5 of every snapshot.")] = None,
    select: Annotated[str, typer.Option(help="Deployed candidate (θ0, a snapshot or a weight average): "
                                        "auto (labelled with --val-labelled, else label-free), "
                                        "label-free (the label-free default), "
                                        "guarded-dropout-averages, guarded-dropout, guarded-flow, "
                                        "consensus, consensus-anchored, "
                                        "consensus-averages, dropout, swa, "
                                        "wise-0.25, wise-0.50, wise-0.75, stop (what --stop selects), "
                                        "last or labelled. README: Choosing the snapshot without "
                                        "labels.")] = D["select"],
    batchnorm_stats: Annotated[str, typer.Option(help="BatchNorm running statistics while adapting: "
                                                 "update (follow the training tiles), keep (the "
                                                 "pretrained model's) or auto (keep when training "
                                                 "on Z-stacks, else update). Cellpose-SAM has "
                                                 "none.")] = D["batchnorm_stats"],
    train_tile: Annotated[int, typer.Option(help="Side of the training tiles (pixels at the model's "
                                            "scale); 0 = the family's (CPnet 224), on Z-stacks "
                                            "at most 3× their ZX/ZY planes' height. Smaller planes "
                                            "are zero-padded to it; CPnet takes any multiple of 16, "
                                            "Cellpose-SAM only its own.")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = D["seed"],
    device: DeviceOpt = "auto",
    channels: ChannelsOpt = None,
    channel_axis: ChannelAxisOpt = None,
    series: SeriesOpt = None,
    z_axis: ZAxisOpt = None,
    anisotropy: Annotated[float, typer.Option(help="Z-stacks: the Z step ÷ the Y/X pixel size; their "
                                              "ZX and ZY planes are resized by it along Z.")] = 1.0,
    flow3d_smooth: Annotated[str, typer.Option("--flow3d-smooth", help="Z-stacks: held-out stacks "
                                               "score every candidate in 3-D with the flows "
                                               "smoothed by this Gaussian sigma (voxels; one value "
                                               "or Z,Y,X; 0 = off): give what segment --do-3d "
                                               "will use.")] = "0",
):
    """Adapt a pretrained model to unlabeled images (SelfAdapt), with a few labelled target
    images (ACTIS) or with two cooperating networks (CULPICO); resumable with --resume RUN."""
    from rich.progress import TaskProgressColumn

    from selfadapt_deploy import api
    from selfadapt_deploy.trainer.run import RunInputs

    if resume is None and (not images or model is None or out is None):
        raise fail("give IMAGES, --model and --out (or --resume RUN)")
    # the bar starts with the first step, so a bad setting is one error line and nothing else
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TaskProgressColumn(), TextColumn("{task.fields[loss]}"), TimeRemainingColumn(),
                   console=err_console)
    task = bar.add_task("adapting", total=None, loss="")

    def progress(step: int, terms: dict) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=step, loss=f"loss {terms['loss']:.4f}")

    common = dict(device=device, report=plain(err_console), progress=progress)
    try:
        if resume is not None:
            bar.update(task, total=RunInputs.load(resume).config.iterations)
            summary = api.resume(resume, **common)
        else:
            bar.update(task, total=iterations)
            summary = api.adapt(
                images, model, out, diameter=diameter or None, channels=parse_channels(channels),
                channel_axis=channel_axis, series=series, val=val or [], val_fraction=val_fraction,
                keep_snapshots=keep_snapshots, labelled=labelled or [], val_labelled=val_labelled or [],
                source=source or [], model2=model2, iterations=iterations, batch_size=batch_size,
                lr=lr or None, l2sp=None if l2sp < 0 else l2sp, ema_every=ema_every,
                eval_every=eval_every, stop=stop, prob_mask=prob_mask, flow_mask=flow_mask,
                augment=augment, seed=seed, teacher_runtime=teacher_runtime,
                teacher_sync=teacher_sync, teacher_precision=teacher_precision, amp=amp,
                compile_teacher=compile_teacher, method=method, labelled_fraction=labelled_fraction,
                select=select, batchnorm_stats=batchnorm_stats, train_tile=train_tile or None,
                z_axis=z_axis, anisotropy=anisotropy,
                flow3d_smooth=parse_floats(flow3d_smooth, "--flow3d-smooth"), **common)
    finally:
        bar.stop()
    run = resume or out
    console.print(f"{summary['method']}: deployed {summary['selected']} "
                  f"({summary['selection']['why']}) → {run}/model.pt; curves in {run}/curves.png",
                  soft_wrap=True, markup=False, highlight=False)


def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs (re-running resumes).")] = Path(
        "sa-deploy-demo"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed (data, training, adaptation).")] = 0,
    method: Annotated[str, typer.Option(help="selfadapt (no labels), actis (2 labelled target images "
                                        "join every batch) or culpico (two cooperating networks, "
                                        "with the labelled source images).")] = "selfadapt",
    family: Annotated[str, typer.Option(help="Family of the demo's small network: cpnet (a Cellpose "
                                        "3 U-Net), cpsam (a Cellpose-SAM ViT) or any other "
                                        "registered family.")] = "cpnet",
):
    """Offline demo: train a small model on clean generated cells, adapt it without labels to a noisy
    domain, print target AP before/after (about 3 minutes on 2 CPU cores)."""
    from selfadapt_deploy.runtime import resolve_device
    from selfadapt_deploy.trainer.demo import DemoConfig, run_demo

    config = DemoConfig.for_family(family, method=method)
    dev = resolve_device(device)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[loss]}"), TimeRemainingColumn(),
                  console=err_console) as bar:
        train = bar.add_task("source training", total=config.source.iterations, loss="",
                             visible=False)
        tune = bar.add_task(f"adapting ({method})", total=config.adapt.iterations, loss="",
                            visible=False)
        summary = run_demo(
            out, config, dev, seed, report=plain(bar.console),
            source_progress=lambda i, loss: bar.update(train, completed=i, visible=True,
                                                       loss=f"loss {loss:.4f}"),
            adapt_progress=lambda i, t: bar.update(tune, completed=i, visible=True,
                                                   loss=f"loss {t['loss']:.4f}"))
    table = Table("test images (labelled, never trained on)", "source model", "adapted model",
                  title="SelfAdapt demo: pooled AP")
    for row in summary.table():
        table.add_row(*row)
    console.print(table)
    console.print(f"adapted model: {out}/adapt/model.pt (deployed {summary.selected}); curves "
                  f"{out}/adapt/curves.png; overlays {out}/overlays.png; test images and labels in "
                  f"{out}/target_test/", soft_wrap=True)
