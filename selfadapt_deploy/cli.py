"""``sa-deploy`` command line. Commands only parse arguments and call library functions;
:class:`SaDeployError` becomes a one-line message and exit code 1 here, and only here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from selfadapt_deploy import __version__
from selfadapt_deploy.errors import SaDeployError

if TYPE_CHECKING:
    from selfadapt_deploy.batch import ImageResult
    from selfadapt_deploy.wsi.stream import StreamSettings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Adapt Cellpose models without labels, export them, segment fast.")
console = Console()
err_console = Console(stderr=True)


# options shared by the commands that read images and run a model
ImagesArg = Annotated[list[Path], typer.Argument(help="TIFF / OME-TIFF / PNG images, or folders of them.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda[:N]; a missing GPU is an error.")]
RuntimeOpt = Annotated[str, typer.Option(help="auto, torch, onnx or tensorrt. onnx/tensorrt run an "
                                         "export directory; auto: its TensorRT engine when it "
                                         "matches this GPU, else onnxruntime; torch otherwise.")]
PrecisionOpt = Annotated[str, typer.Option(help="torch: auto (on CUDA bf16 for Cellpose-SAM as "
                                           "cellpose 4, fp16 for Cellpose 3 nets; fp32 on CPU), "
                                           "fp32, fp16 or bf16. onnx/tensorrt: the export's own.")]
CompileOpt = Annotated[bool, typer.Option(help="torch.compile the network (torch runtime; the first "
                                          "batch compiles, kernels are cached for later runs).")]
CompileCacheOpt = Annotated[Path | None, typer.Option(help="Compiled-kernel cache for --compile "
                                                      "(default ~/.cache/sa-deploy/torch-compile).")]
AttentionOpt = Annotated[str, typer.Option(help="Cellpose-SAM attention in torch: auto (sdpa on CUDA, "
                                           "cellpose's own on CPU), sdpa or native.")]
OnnxProviderOpt = Annotated[str, typer.Option(help="onnxruntime provider: auto (cpu on CPU, cuda on "
                                              "GPU), cpu, cuda or tensorrt.")]
ChannelsOpt = Annotated[str | None, typer.Option(help="Comma-separated 0-based channels fed to the "
                                                 "network, in order (e.g. 1,0).")]
ChannelAxisOpt = Annotated[int | None, typer.Option(help="Axis of the channels in the file's array, "
                                                    "if not recorded.")]
SeriesOpt = Annotated[int | None, typer.Option(help="Only this series of multi-series files "
                                               "(default: every series).")]


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


def _plain(target: Console):
    """A ``report`` callback printing library messages verbatim (paths may hold [brackets])."""
    return lambda message: target.print(message, highlight=False, markup=False, soft_wrap=True)


def _parse_channels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise _fail(f"--channels '{text}' is not a comma-separated list of channel indices "
                    "(e.g. 0 or 1,0)") from None


def _version(value: bool) -> None:
    if value:
        console.print(f"sa-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False):
    """sa-deploy: SelfAdapt for Cellpose, export, fast segmentation."""


@app.command()
def segment(
    images: ImagesArg,
    model: Annotated[str, typer.Option(help="Weights file (either family), run or export directory, "
                                       "or Cellpose model name (cpsam, cyto3, ...).")],
    out: Annotated[Path, typer.Option(help="Output directory for <stem>_masks.tif.")],
    diameter: Annotated[float, typer.Option(help="Cell diameter in pixels; 0 = the model's default "
                                            "(Cellpose 3: its diam_labels, as cellpose 3 does; "
                                            "Cellpose-SAM: no rescale).")] = 0.0,
    flow_threshold: Annotated[float, typer.Option(help="Max flow error per mask; 0 turns flow "
                                                  "QC off.")] = 0.4,
    cellprob_threshold: Annotated[float, typer.Option(help="Cell-probability logit "
                                                      "threshold.")] = 0.0,
    min_size: Annotated[int, typer.Option(help="Remove masks smaller than this (pixels).")] = 15,
    niter: Annotated[int, typer.Option(help="Flow-integration steps; 0 = 200 / rescale.")] = 0,
    tile_overlap: Annotated[float, typer.Option(help="Tile overlap fraction (0.05–0.5).")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Tiles per network batch.")] = 8,
    tta: Annotated[bool, typer.Option(help="Average the 8 flip/rot90 views of each tile.")] = False,
    integrator: Annotated[str, typer.Option(help="Flow integration: auto (triton on CUDA, numba on "
                                            "CPU), torch (reference), numba or triton.")] = "auto",
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    compile_cache: CompileCacheOpt = None,
    attention: AttentionOpt = "auto",
    pipeline: Annotated[str, typer.Option(help="auto (device on CUDA, host on CPU), host (numpy/numba "
                                          "around the network) or device (every stage on the "
                                          "runner's device, one transfer of the labels).")] = "auto",
    onnx_provider: OnnxProviderOpt = "auto",
    channels: ChannelsOpt = None,
    channel_axis: ChannelAxisOpt = None,
    series: SeriesOpt = None,
    save_flows: Annotated[bool, typer.Option(help="Also write <stem>_flows.tif (dY, dX, "
                                             "cellprob).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Recompute images whose masks exist (default: "
                                            "skip them, which resumes a run).")] = False,
    stream: Annotated[bool, typer.Option(help="Stream every image block by block (whole-slide "
                                         "path); images above 8192² pixels and OME-Zarr inputs "
                                         "always stream.")] = False,
    block_size: Annotated[int, typer.Option(help="Streaming: block edge in pixels (a multiple of "
                                            "256); memory grows with it.")] = 2048,
    halo: Annotated[int, typer.Option(help="Streaming: context around each block in pixels; 0 = "
                                      "twice the cell diameter (at least 32).")] = 0,
    out_format: Annotated[str, typer.Option(help="Streaming: labels as a tiled BigTIFF (tiff) or "
                                            "OME-Zarr (zarr).")] = "tiff",
    resume: Annotated[bool, typer.Option(help="Streaming: continue an interrupted slide from its "
                                         "finished blocks.")] = False,
    dask: Annotated[str | None, typer.Option(help="Streaming: run blocks on dask.distributed "
                                             "workers: a scheduler address, or local:N.")] = None,
):
    """Segment images with a Cellpose-family model (cellpose 4.2's pipeline); slides larger than
    memory stream block by block."""
    from selfadapt_deploy.batch import SegmentJob, segment_files
    from selfadapt_deploy.io.readers import expand_inputs
    from selfadapt_deploy.io.writers import ensure_writable_dir
    from selfadapt_deploy.postprocess.integrate import resolve_integrator
    from selfadapt_deploy.runtime import resolve_device
    from selfadapt_deploy.runtime.select import open_runner
    from selfadapt_deploy.segment import SegmentParams, use_device_pipeline
    from selfadapt_deploy.tiling import MAX_OVERLAP, MIN_OVERLAP
    from selfadapt_deploy.wsi.slide import split_inputs
    from selfadapt_deploy.wsi.stream import STREAM_ABOVE, StreamSettings, output_path

    if not MIN_OVERLAP <= tile_overlap <= MAX_OVERLAP:
        raise _fail(f"--tile-overlap must be between {MIN_OVERLAP} and {MAX_OVERLAP}")
    if diameter < 0 or niter < 0 or batch_size < 1:
        raise _fail("--diameter and --niter must be ≥ 0 and --batch-size ≥ 1")
    params = SegmentParams(diameter=diameter or None, flow_threshold=flow_threshold,
                           cellprob_threshold=cellprob_threshold, min_size=min_size,
                           niter=niter or None, tile_overlap=tile_overlap, batch_size=batch_size,
                           tta=tta, integrator=integrator, pipeline=pipeline)
    picked = _parse_channels(channels)
    torch_options = dict(compile=compile, attention=attention, compile_cache=compile_cache)
    settings = StreamSettings(block_size, halo, out_format, resume, overwrite, dask)
    try:
        images = expand_inputs(images)
        in_memory, slides = split_inputs(images, series, stream or dask is not None, STREAM_ABOVE)
        output_path(out, "x", out_format)  # a bad --out-format fails before any work
        ensure_writable_dir(out)
        # with --dask the workers run the network: here the model only describes itself (CPU)
        dev = resolve_device("cpu" if dask and not in_memory else device)
        resolve_integrator(integrator, dev)  # an unusable choice fails before any work
        runner, choice = open_runner(model, runtime, dev, precision, onnx_provider=onnx_provider,
                                     **torch_options)
        use_device_pipeline(params, runner.device)  # a bad --pipeline fails here too
        if in_memory or not dask:
            runner.activate()  # a provider, engine or device that cannot run fails before any image
    except SaDeployError as exc:
        raise _fail(str(exc)) from None
    console.print(f"model: {choice}", soft_wrap=True, highlight=False, markup=False)
    job = SegmentJob(runner, out, params, dev, picked, save_flows, overwrite)
    runner_args = dict(model=model, runtime=runtime, device=device, precision=precision,
                       onnx_provider=onnx_provider, **torch_options)
    try:
        failed = _stream_slides(slides, runner, out, params, settings, picked, runner_args)
        if in_memory:
            _report_each(segment_files(in_memory, job, channel_axis, series), len(in_memory),
                         "segmenting", "masks", out)
        if failed:
            raise typer.Exit(code=1)
    finally:
        runner.deactivate()
        if dev.type == "cuda":  # what a run at this --batch-size needs, to size it on other GPUs
            import torch

            peak = torch.cuda.max_memory_allocated(dev) / 2**30
            console.print(f"peak GPU memory: {peak:.2f} GiB at --batch-size {batch_size}")


def _stream_slides(slides: list, runner, out: Path, params, settings: StreamSettings, channels,
                   runner_args: dict) -> int:
    """Stream each slide with a progress bar over its blocks; returns how many failed."""
    from selfadapt_deploy.wsi import segment_slide

    failed = 0
    for path, index in slides:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err_console) as bar:
            task = bar.add_task(f"{path.name} blocks", total=None)

            def progress(done: int, total: int, _result: dict, task=task, bar=bar) -> None:
                bar.update(task, completed=done, total=total)

            try:
                summary = segment_slide(path, runner, out, params, settings, index, channels,
                                        runner_args, progress)
            except SaDeployError as exc:
                bar.console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                failed += 1
                continue
        if summary["status"] == "skipped":
            console.print(f"{path.name}: skipped ({summary['output']} exists; --overwrite to redo)",
                          markup=False, highlight=False)
            continue
        for warning in summary["warnings"]:
            err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        b = summary["blocks"]
        console.print(f"{path.name}: done, {summary['objects']} masks → {summary['output']} ({b['total']} "
                      f"blocks, {b['resumed']} resumed; {summary['seconds']['total']:.1f} s, peak RSS "
                      f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB)", markup=False, highlight=False,
                      soft_wrap=True)
    return failed


def _report_each(results: Iterator[ImageResult], files: int, doing: str, unit: str, out: Path) -> None:
    """A progress bar over the files, one line per image, a summary; exit code 1 if any failed."""
    counts = {"done": 0, "skipped": 0, "failed": 0}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console) as bar:
        task = bar.add_task(doing, total=files)
        for result in results:
            counts[result.status] += 1
            if result.status == "failed":
                bar.console.print(f"[bold red]error:[/] {escape(result.error)}", highlight=False,
                                  soft_wrap=True)
            else:
                done = f", {result.count} {unit}" if result.status == "done" else ""
                bar.console.print(f"{result.name}: {result.status}{done}", highlight=False, markup=False)
            if result.last_in_file:
                bar.advance(task)
    console.print(f"{counts['done']} done, {counts['skipped']} skipped (outputs exist; --overwrite to "
                  f"redo), {counts['failed']} failed → {out}", soft_wrap=True, markup=False)
    if counts["failed"]:
        raise typer.Exit(code=1)


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Weights file (either family), adaptation run "
                                         "directory, or Cellpose model name.")],
    out: Annotated[Path, typer.Option(help="New directory for the exported artefacts.")],
    precision: Annotated[str, typer.Option(help="Arithmetic inside the graphs: fp32, fp16 or bf16 "
                                           "(inputs and outputs stay float32).")] = "fp32",
    trt: Annotated[bool, typer.Option("--trt", help="Also build TensorRT engines for this "
                                      "machine's GPU (needs the trt extra).")] = False,
    max_batch: Annotated[int, typer.Option(help="Largest batch of the TensorRT engines' "
                                           "profile.")] = 8,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default 18; 22 for bf16).")] = None,
    engines_from: Annotated[Path | None, typer.Option(help="With --trt: an earlier export of the "
                                                      "same network built on this machine; its "
                                                      "engines are refit with the new weights, "
                                                      "not built again.")] = None,
    validate_on: Annotated[list[Path] | None, typer.Option(help="Images to validate the graphs on "
                                                           "(default: generated cells).")] = None,
    channels: Annotated[str | None, typer.Option(help="Channels of --validate-on images, as in "
                                                 "segment.")] = None,
    device: Annotated[str, typer.Option(help="GPU for --trt builds: cuda[:N].")] = "cuda",
):
    """Export a model to ONNX (the network and the SelfAdapt teacher's TTA ensemble), optionally
    TensorRT engines, each validated against torch; writes manifest.json."""
    from selfadapt_deploy.export.exporter import export_model
    from selfadapt_deploy.io.readers import read_network_images
    from selfadapt_deploy.models import load_model

    picked = _parse_channels(channels)
    try:
        images = []
        if validate_on:
            net = load_model(model, "cpu")
            images = read_network_images(validate_on, net.nchan, net.family == "cpnet", picked, None,
                                         None, report=_plain(err_console))
            if not images:
                raise _fail("--validate-on: no readable images")
        with err_console.status("exporting ..."):
            manifest = export_model(model, out, precision, opset, max_batch, trt, device, images,
                                    report=_plain(console), engines_from=engines_from)
    except SaDeployError as exc:
        raise _fail(str(exc)) from None
    files = ", ".join(a.file for a in manifest.artifacts)
    console.print(f"exported {manifest.family} ({manifest.precision}) → {out}: {files}, manifest.json",
                  soft_wrap=True, highlight=False, markup=False)


@app.command("pseudo-label")
def pseudo_label(
    images: ImagesArg,
    model: Annotated[str, typer.Option(help="Weights file, run or export directory, or Cellpose "
                                       "model name.")],
    out: Annotated[Path, typer.Option(help="Output directory for <stem>_pseudo.npz.")],
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    compile_cache: CompileCacheOpt = None,
    attention: AttentionOpt = "auto",
    onnx_provider: OnnxProviderOpt = "auto",
    diameter: Annotated[float, typer.Option(help="Cell diameter in pixels; 0 = the model's "
                                            "default.")] = 0.0,
    tile_overlap: Annotated[float, typer.Option(help="Tile overlap fraction (0.05–0.5).")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Tiles per teacher call (8 views each).")] = 8,
    channels: ChannelsOpt = None,
    channel_axis: ChannelAxisOpt = None,
    series: SeriesOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Recompute images whose outputs exist.")] = False,
):
    """The SelfAdapt teacher's pseudo-labels (8-view ensemble, its std, confidence masks) for
    whole images, one <stem>_pseudo.npz each, in any runtime."""
    from selfadapt_deploy.batch import process_files
    from selfadapt_deploy.io.readers import expand_inputs
    from selfadapt_deploy.io.writers import ensure_writable_dir
    from selfadapt_deploy.runtime import TEACHER_GRAPH, resolve_device
    from selfadapt_deploy.runtime.select import open_runner
    from selfadapt_deploy.tiling import MAX_OVERLAP, MIN_OVERLAP
    from selfadapt_deploy.trainer.pseudo_label import (
        PSEUDO_SUFFIX,
        PseudoLabelParams,
        pseudo_label_image,
        write_pseudo_labels,
    )

    if not MIN_OVERLAP <= tile_overlap <= MAX_OVERLAP or diameter < 0 or batch_size < 1:
        raise _fail(f"--tile-overlap must be in [{MIN_OVERLAP}, {MAX_OVERLAP}], --diameter ≥ 0 "
                    "and --batch-size ≥ 1")
    params = PseudoLabelParams(diameter or None, tile_overlap, batch_size)
    picked = _parse_channels(channels)
    try:
        files = expand_inputs(images)
        ensure_writable_dir(out)
        runner, choice = open_runner(model, runtime, resolve_device(device), precision, TEACHER_GRAPH,
                                     onnx_provider, compile=compile, attention=attention,
                                     compile_cache=compile_cache)
        runner.activate()
    except SaDeployError as exc:
        raise _fail(str(exc)) from None
    console.print(f"teacher: {choice}", soft_wrap=True, highlight=False, markup=False)

    def output(name: str) -> Path:
        return out / f"{name}{PSEUDO_SUFFIX}"

    def work(image, data) -> int:
        arrays = pseudo_label_image(runner, data, params)
        write_pseudo_labels(output(image.name), arrays)
        return int(arrays["mask_prob"].sum())

    try:
        _report_each(process_files(files, runner, output, work, picked, overwrite, channel_axis,
                                   series), len(files), "pseudo-labelling", "confident pixels", out)
    finally:
        runner.deactivate()


@app.command()
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
    iterations: Annotated[int, typer.Option(help="Optimisation steps.")] = 150,
    batch_size: Annotated[int, typer.Option(help="Tiles per step.")] = 4,
    lr: Annotated[float, typer.Option(help="Peak learning rate; 0 = family default (CPnet 1e-4, "
                                      "Cellpose-SAM 1e-5).")] = 0.0,
    l2sp: Annotated[float, typer.Option(help="λ of the L2-SP pull towards the pretrained weights; "
                                        "-1 = family default (1e-2).")] = -1.0,
    ema_every: Annotated[int, typer.Option(help="Update the EMA teacher every N steps.")] = 1,
    eval_every: Annotated[int, typer.Option(help="Evaluate stopping metrics and snapshot every K "
                                            "steps.")] = 25,
    stop: Annotated[str, typer.Option(help="Label-free stopping rule: emb, fn, both or none.")] = "both",
    val_fraction: Annotated[float, typer.Option(help="Share of the images held out for "
                                                "stopping.")] = 0.2,
    val: Annotated[list[Path] | None, typer.Option(help="Held-out images for stopping (instead of "
                                                   "a split).")] = None,
    keep_snapshots: Annotated[bool, typer.Option(help="Keep every snapshot for manual "
                                                 "choice.")] = True,
    prob_mask: Annotated[bool, typer.Option(help="Confidence mask on cell probability.")] = True,
    flow_mask: Annotated[bool, typer.Option(help="Confidence mask on flows.")] = True,
    augment: Annotated[bool, typer.Option(help="Strong student augmentation.")] = True,
    teacher_runtime: Annotated[str, typer.Option(help="Teacher pseudo-labels from torch, or from its "
                                                 "exported TTA graph in onnx (onnxruntime) or "
                                                 "tensorrt.")] = "torch",
    teacher_sync: Annotated[int, typer.Option(help="Push the EMA teacher's weights into the onnx / "
                                              "tensorrt teacher every N steps.")] = 10,
    teacher_precision: Annotated[str, typer.Option(help="Precision of the exported teacher graph: "
                                                   "fp32, fp16 or bf16.")] = "fp32",
    amp: Annotated[str, typer.Option(help="Mixed precision of teacher and student on CUDA: bf16 "
                                     "(autocast), fp16 (autocast + loss scaling) or fp32. The "
                                     "CPU runs fp32.")] = "bf16",
    compile_teacher: Annotated[bool, typer.Option(help="torch.compile the torch teacher (first "
                                                  "steps compile).")] = False,
    method: Annotated[str, typer.Option(help="selfadapt (label-free), actis (labelled target tiles in "
                                        "every batch; implied by --labeled) or culpico (two "
                                        "cooperating networks).")] = "selfadapt",
    model2: Annotated[str | None, typer.Option(help="CULPICO: its second network (same family); "
                                               "default: the model with a perturbed read-out.")] = None,
    source: Annotated[list[str] | None, typer.Option(help="CULPICO: labelled source images (a folder of "
                                                     "<stem>.tif + <stem>_masks.tif, or IMAGE=MASKS); "
                                                     "without them it runs source-free.")] = None,
    labeled: Annotated[list[str] | None, typer.Option(help="Labelled target images for ACTIS: a folder "
                                                      "of <stem>.tif + <stem>_masks.tif, or "
                                                      "IMAGE=MASKS (repeatable).")] = None,
    labeled_fraction: Annotated[float, typer.Option(help="ACTIS: share of each batch from labelled "
                                                    "tiles (at least one).")] = 0.25,
    val_labeled: Annotated[list[str] | None, typer.Option(help="Held-out labelled images (same forms): "
                                                          "AP@0.5 of every snapshot.")] = None,
    select: Annotated[str, typer.Option(help="Deployed snapshot: auto (labelled when --val-labeled is "
                                        "given, else label-free), label-free or labelled.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "auto",
    channels: ChannelsOpt = None,
    channel_axis: ChannelAxisOpt = None,
    series: SeriesOpt = None,
):
    """Adapt a pretrained model to unlabeled images (SelfAdapt), or with a few labelled target
    images (ACTIS); resumable with --resume RUN."""
    from rich.progress import TaskProgressColumn

    from selfadapt_deploy.runtime import resolve_device
    from selfadapt_deploy.trainer.loop import AdaptConfig
    from selfadapt_deploy.trainer.run import resume_settings, run_adapt

    if stop not in ("emb", "fn", "both", "none"):
        raise _fail(f"--stop must be emb, fn, both or none, got '{stop}'")
    if method not in ("selfadapt", "actis", "culpico"):
        raise _fail(f"--method must be selfadapt, actis or culpico, got '{method}'")
    if resume is None and method == "actis" and not labeled:
        raise _fail("--method actis adapts with labelled target images: give --labeled")
    if resume is None and select == "labelled" and not val_labeled:
        raise _fail("--select labelled needs held-out labelled images (--val-labeled)")
    if teacher_runtime not in ("torch", "onnx", "tensorrt") or teacher_sync < 1 \
            or teacher_precision not in ("fp32", "fp16", "bf16") or amp not in ("fp32", "fp16", "bf16"):
        raise _fail("--teacher-runtime must be torch, onnx or tensorrt, --teacher-sync ≥ 1, and "
                    "--teacher-precision and --amp fp32, fp16 or bf16")
    try:
        dev = resolve_device(device)
        if resume is not None:
            s = resume_settings(resume)
            kwargs = dict(images=s["images"], model=s["model"], out=resume, config=s["config"],
                          diameter=s["diameter"], channels=s["channels"],
                          channel_axis=s["channel_axis"], series=s["series"],
                          val_images=s["val_images"], val_fraction=s["val_fraction"],
                          keep_snapshots=s["keep_snapshots"], resume=True,
                          labeled=s.get("labeled", []), val_labeled=s.get("val_labeled", []),
                          source=s.get("source", []), model2=s.get("model2"))
        else:
            if not images or model is None or out is None:
                raise _fail("give IMAGES, --model and --out (or --resume RUN)")
            if out.exists() and any(out.iterdir()):
                raise _fail(f"{out} exists and is not empty; choose a new --out or --resume {out}")
            config = AdaptConfig(iterations=iterations, batch_size=batch_size, lr=lr or None,
                                 l2sp=None if l2sp < 0 else l2sp, ema_every=ema_every,
                                 eval_every=eval_every, stop=stop, prob_mask=prob_mask,
                                 flow_mask=flow_mask, augment=augment, seed=seed,
                                 teacher_runtime=teacher_runtime, teacher_sync=teacher_sync,
                                 teacher_precision=teacher_precision, amp=amp,
                                 compile_teacher=compile_teacher,
                                 method="actis" if labeled and method == "selfadapt" else method,
                                 labeled_fraction=labeled_fraction, select=select)
            kwargs = dict(images=[str(p) for p in images], model=model, out=out, config=config,
                          diameter=diameter or None, channels=_parse_channels(channels),
                          channel_axis=channel_axis, series=series,
                          val_images=[str(p) for p in val or []], val_fraction=val_fraction,
                          keep_snapshots=keep_snapshots, labeled=labeled or [],
                          val_labeled=val_labeled or [], source=source or [], model2=model2)
        if kwargs["config"].teacher_runtime == "tensorrt":  # fail before any work without it
            from selfadapt_deploy.runtime.trt_runner import import_tensorrt

            import_tensorrt()
        total = kwargs["config"].iterations
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TaskProgressColumn(), TextColumn("{task.fields[loss]}"), TimeRemainingColumn(),
                      console=err_console) as bar:
            task = bar.add_task("adapting", total=total, loss="")

            def progress(step: int, terms: dict) -> None:
                bar.update(task, completed=step, loss=f"loss {terms['loss']:.4f}")

            summary = run_adapt(device=dev, report=_plain(bar.console),
                                progress=progress, **kwargs)
    except SaDeployError as exc:
        raise _fail(str(exc)) from None
    run = kwargs["out"]
    console.print(f"{summary['method']}: selected iteration {summary['selected_iteration']} "
                  f"({summary['selection']['why']}) → {run}/model.pt; curves in {run}/curves.png",
                  soft_wrap=True, markup=False, highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs (re-running resumes).")] = Path(
        "sa-deploy-demo"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed (data, training, adaptation).")] = 0,
    method: Annotated[str, typer.Option(help="selfadapt (no labels), actis (2 labelled target images "
                                        "join every batch) or culpico (two cooperating networks, "
                                        "with the labelled source images).")] = "selfadapt",
):
    """Offline demo: train a small model on clean generated cells, adapt it without labels to a noisy
    domain, print target AP before/after (about 3 minutes on 2 CPU cores)."""
    from selfadapt_deploy.runtime import resolve_device
    from selfadapt_deploy.trainer.demo import DemoConfig, run_demo

    config = DemoConfig(method=method)
    try:
        dev = resolve_device(device)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[loss]}"), TimeRemainingColumn(),
                      console=err_console) as bar:
            train = bar.add_task("source training", total=config.source.iterations, loss="",
                                 visible=False)
            tune = bar.add_task(f"adapting ({method})", total=config.adapt.iterations, loss="",
                                visible=False)
            summary = run_demo(
                out, config, dev, seed, report=_plain(bar.console),
                source_progress=lambda i, loss: bar.update(train, completed=i, visible=True,
                                                           loss=f"loss {loss:.4f}"),
                adapt_progress=lambda i, t: bar.update(tune, completed=i, visible=True,
                                                       loss=f"loss {t['loss']:.4f}"))
    except SaDeployError as exc:
        raise _fail(str(exc)) from None
    table = Table("test images (labelled, never trained on)", "source model", "adapted model",
                  title="SelfAdapt demo: pooled AP")
    for row in summary.table():
        table.add_row(*row)
    console.print(table)
    console.print(f"adapted model: {out}/adapt/model.pt (selected iteration "
                  f"{summary.selected_iteration}); curves {out}/adapt/curves.png; overlays "
                  f"{out}/overlays.png; test images and labels in {out}/target_test/", soft_wrap=True)


@app.command()
def evaluate(
    pred: Annotated[list[Path], typer.Option(help="Predicted label images.")],
    gt: Annotated[list[Path], typer.Option(help="Ground-truth label images, same order.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write results to this "
                                                  "JSON file.")] = None,
):
    """AP = TP/(TP+FP+FN) at IoU 0.5 / 0.75 / 0.9 (as cellpose.metrics.average_precision)."""
    from selfadapt_deploy.batch import evaluate_files, pooled

    try:
        results = evaluate_files(pred, gt)
    except SaDeployError as exc:
        raise _fail(str(exc)) from None
    table = Table("image", *(f"AP@{t:g}" for t in results[0].thresholds), "TP/FP/FN@0.5")
    rows = [(str(p), r) for p, r in zip(pred, results, strict=True)]
    if len(results) > 1:
        rows.append(("all (pooled)", pooled(results)))
    for name, r in rows:
        table.add_row(name, *(f"{a:.4f}" for a in r.ap), f"{r.tp[0]}/{r.fp[0]}/{r.fn[0]}")
    console.print(table)
    if json_out is not None:
        from selfadapt_deploy.io.writers import atomic_path

        payload = {"thresholds": list(results[0].thresholds), "images": [
            {"pred": str(p), "gt": str(g), "ap": list(r.ap), "tp": list(r.tp), "fp": list(r.fp),
             "fn": list(r.fn)} for p, g, r in zip(pred, gt, results, strict=True)]}
        try:
            with atomic_path(json_out) as tmp:
                tmp.write_text(json.dumps(payload, indent=2))
        except SaDeployError as exc:
            raise _fail(str(exc)) from None
