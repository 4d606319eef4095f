"""``sa-deploy`` command line. Commands only parse arguments and call library functions;
:class:`SaDeployError` becomes a one-line message and exit code 1 here, and only here.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
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
from typer.core import TyperGroup

from selfadapt_deploy import __version__
from selfadapt_deploy.cli_options import (
    AttentionOpt,
    ChannelAxisOpt,
    ChannelsOpt,
    CompileCacheOpt,
    CompileOpt,
    DeviceOpt,
    ImagesArg,
    OnnxProviderOpt,
    PrecisionOpt,
    RuntimeOpt,
    SeriesOpt,
    ZAxisOpt,
    console,
    err_console,
    fail,
    parse_channels,
    parse_floats,
    plain,
)
from selfadapt_deploy.errors import SaDeployError

if TYPE_CHECKING:
    from selfadapt_deploy.batch import ImageResult


class ErrorBoundary(TyperGroup):
    """The one place where a library error (:class:`SaDeployError`, whatever command raised it)
    becomes one ``error:`` line on stderr and exit code 1; anything else stays a traceback (a bug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SaDeployError as exc:
            raise fail(str(exc)) from None


app = typer.Typer(cls=ErrorBoundary, add_completion=False, no_args_is_help=True,
                  help="Adapt Cellpose models without labels, export them, segment fast.")



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
    out: Annotated[Path, typer.Option(help="Output directory for <stem>_masks.tif.")],
    model: Annotated[str | None, typer.Option(help="Weights file (either family), run or export "
                                              "directory, or Cellpose model name (cpsam, cyto3, "
                                              "...).")] = None,
    triton: Annotated[str | None, typer.Option(help="Instead of --model: run the network on this "
                                               "Triton server (sa-deploy serve, or a server holding "
                                               "export --triton-repo), e.g. "
                                               "http://host:8000.")] = None,
    diameter: Annotated[float, typer.Option(help="Cell diameter in pixels; 0 = the model's default "
                                            "(Cellpose 3: its diam_labels, as cellpose 3 does; "
                                            "Cellpose-SAM: no rescale).")] = 0.0,
    flow_threshold: Annotated[float, typer.Option(help="Max flow error per mask; 0 turns flow "
                                                  "QC off (2-D only: unused by --do-3d).")] = 0.4,
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
    stitch_threshold: Annotated[float, typer.Option(help="Z-stacks: segment every plane in 2-D and "
                                                    "link masks of adjacent planes whose IoU is at "
                                                    "least this (cellpose's stitch_threshold), "
                                                    "writing one ZYX label stack; 0 = off.")] = 0.0,
    do_3d: Annotated[bool, typer.Option("--do-3d", help="Z-stacks: segment in 3-D (cellpose's "
                                        "do_3D: the network on YX, ZY and ZX planes, 3-D flows; "
                                        "--flow-threshold is not used in 3-D).")] = False,
    anisotropy: Annotated[float, typer.Option(help="--do-3d: the Z step ÷ the Y/X pixel size (the "
                                              "stack is resized by it along Z).")] = 1.0,
    flow3d_smooth: Annotated[str, typer.Option("--flow3d-smooth", help="--do-3d: Gaussian sigma "
                                               "(voxels) smoothing the 3-D flows, one value or "
                                               "Z,Y,X; 0 = off.")] = "0",
    planes: Annotated[bool, typer.Option(help="Z-stacks: segment each plane as its own 2-D image "
                                         "(<stem>_zNNN_masks.tif).")] = False,
    z_axis: ZAxisOpt = None,
    save_flows: Annotated[bool, typer.Option(help="Also write <stem>_flows.tif (dY, dX, "
                                             "cellprob).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Recompute images whose masks exist (default: "
                                            "skip them, which resumes a run).")] = False,
    stream: Annotated[bool | None, typer.Option(
        "--stream/--no-stream", help="Stream every TIFF block by block (whole-slide path), or read "
        "every one whole. Default: an image streams when its estimated whole-image working set at "
        "the network's scale passes half the memory available (the console says which and why); "
        "OME-Zarr inputs always stream.", show_default=False)] = None,
    block_size: Annotated[int, typer.Option(help="Streaming: block edge in pixels (a multiple of "
                                            "256); memory grows with it.")] = 2048,
    halo: Annotated[int, typer.Option(help="Streaming: context around each block in pixels; 0 = "
                                      "twice the cell diameter (at least 32).")] = 0,
    out_format: Annotated[str, typer.Option(help="Labels as TIFF (tiff; a tiled BigTIFF when "
                                            "streaming, a ZYX OME-TIFF for Z-stacks) or multiscale "
                                            "OME-Zarr (zarr; Z-stacks with a pyramid in Y/X).")] = "tiff",
    resume: Annotated[bool, typer.Option(help="Streaming: continue an interrupted slide from its "
                                         "finished blocks.")] = False,
    dask: Annotated[str | None, typer.Option(help="Streaming: run blocks on dask.distributed "
                                             "workers: a scheduler address, or local:N.")] = None,
):
    """Segment images with a Cellpose-family model (cellpose 4.2's pipeline); slides larger than
    memory stream block by block."""
    from selfadapt_deploy import api

    runner = None
    if triton is not None:
        from selfadapt_deploy.serving.triton_runner import TritonRunner

        triton_runner = TritonRunner(triton)
        runner = (triton_runner, f"network on the Triton server at {triton} (tile "
                                 f"{triton_runner.spec.tile_size})")
    bars = _SlideBars()
    events = api.segment_paths(
        images, out, model=model, runner=runner, device=device, runtime=runtime, precision=precision,
        onnx_provider=onnx_provider, compile=compile, attention=attention, compile_cache=compile_cache,
        channels=parse_channels(channels), channel_axis=channel_axis, series=series,
        save_flows=save_flows, overwrite=overwrite, stream=stream, block_size=block_size, halo=halo,
        out_format=out_format, resume=resume, dask=dask, stitch_threshold=stitch_threshold or None,
        planes=planes, z_axis=z_axis, do_3d=do_3d, anisotropy=anisotropy,
        flow3d_smooth=parse_floats(flow3d_smooth, "--flow3d-smooth"), block_progress=bars.update,
        report=lambda line: console.print(line, soft_wrap=True, highlight=False, markup=False),
        diameter=diameter or None, flow_threshold=flow_threshold,
        cellprob_threshold=cellprob_threshold, min_size=min_size, niter=niter or None,
        tile_overlap=tile_overlap, batch_size=batch_size, tta=tta, integrator=integrator,
        pipeline=pipeline)
    _, choice, dev = next(events)  # every option checked, the model opened
    console.print(f"model: {choice}", soft_wrap=True, highlight=False, markup=False)
    failed = 0
    try:
        for event in events:
            if event[0] == "choice":
                console.print(f"{event[1].name}: {event[2].why}", soft_wrap=True, highlight=False,
                              markup=False)
            elif event[0] == "slide":
                bars.close()
                failed += _report_slide(*event[1:])
            elif event[0] == "images" and event[1]:
                _report_each((e[1] for e in events), event[1], "segmenting", "masks", out)
        if failed:
            raise typer.Exit(code=1)
    finally:
        bars.close()
        events.close()
        if dev.type == "cuda":  # what a run at this --batch-size needs, to size it on other GPUs
            import torch

            peak = torch.cuda.max_memory_allocated(dev) / 2**30
            console.print(f"peak GPU memory: {peak:.2f} GiB at --batch-size {batch_size}")


class _SlideBars:
    """One block progress bar for the slide being streamed, opened at its first report."""

    def __init__(self) -> None:
        self.bar: Progress | None = None

    def update(self, path: Path, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=err_console)
            self.bar.start()
            self.task = self.bar.add_task(f"{path.name} blocks", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _report_slide(path: Path, summary: dict | SaDeployError) -> int:
    """One streamed slide's outcome on the console; 1 if it failed."""
    if isinstance(summary, SaDeployError):
        err_console.print(f"[bold red]error:[/] {escape(str(summary))}", highlight=False, soft_wrap=True)
        return 1
    if summary["status"] == "skipped":
        console.print(f"{path.name}: skipped ({summary['output']} exists; --overwrite to redo)",
                      markup=False, highlight=False)
        return 0
    for warning in summary["warnings"]:
        err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    b = summary["blocks"]
    console.print(f"{path.name}: done, {summary['objects']} masks → {summary['output']} ({b['total']} "
                  f"blocks, {b['resumed']} resumed; {summary['seconds']['total']:.1f} s, peak RSS "
                  f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB)", markup=False, highlight=False,
                  soft_wrap=True)
    return 0


def _report_each(results: Iterator[ImageResult], files: int, doing: str, unit: str, out: Path) -> None:
    """A progress bar over the files, one line per image, a summary; exit code 1 if any failed."""
    counts = {"done": 0, "skipped": 0, "failed": 0}
    notes: dict[str, int] = {}  # each kind of note said once, with the image it first concerned
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console) as bar:
        task = bar.add_task(doing, total=files)
        for result in results:
            counts[result.status] += 1
            if result.note:
                if result.note not in notes:
                    bar.console.print(f"[bold yellow]note:[/] {escape(f'{result.source}: {result.note}')}",
                                      highlight=False, soft_wrap=True)
                notes[result.note] = notes.get(result.note, 0) + 1
            if result.status == "failed":
                bar.console.print(f"[bold red]error:[/] {escape(result.error)}", highlight=False,
                                  soft_wrap=True)
            else:
                done = f", {result.count} {unit}" if result.status == "done" else ""
                bar.console.print(f"{result.name}: {result.status}{done}", highlight=False, markup=False)
            if result.last_in_file:
                bar.advance(task)
    for n in notes.values():
        if n > 1:
            err_console.print(f"note: {n - 1} more image{'s were' if n > 2 else ' was'} read the same way",
                              markup=False, highlight=False, soft_wrap=True)
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
    triton_repo: Annotated[Path | None, typer.Option(
        help="Also write the network as a Triton model repository here (onnxruntime_onnx, and "
             "tensorrt_plan with --trt).")] = None,
    bioimageio: Annotated[Path | None, typer.Option(
        help="Also write a bioimage.io model package here (needs the bioimageio extra).")] = None,
    author: Annotated[list[str] | None, typer.Option(help="--bioimageio: an author's name "
                                                     "(repeat for several).")] = None,
    license: Annotated[str, typer.Option(help="--bioimageio: SPDX licence of the "
                                         "weights.")] = "BSD-3-Clause",
    device: Annotated[str, typer.Option(help="GPU for --trt builds: cuda[:N].")] = "cuda",
):
    """Export a model to ONNX (the network and the SelfAdapt teacher's TTA ensemble), optionally
    TensorRT engines, each validated against torch; writes manifest.json."""
    from selfadapt_deploy import api

    picked = parse_channels(channels)
    with err_console.status("exporting ..."):
        manifest = api.export(model, out, precision=precision, trt=trt, max_batch=max_batch,
                              opset=opset, engines_from=engines_from, validate_on=validate_on or [],
                              channels=picked, triton_repo=triton_repo,
                              bioimageio=bioimageio, authors=author or ["sa-deploy user"],
                              license=license, device=device, report=plain(console))
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
    from selfadapt_deploy.runner_choice import open_runner
    from selfadapt_deploy.runtime import TEACHER_GRAPH, resolve_device
    from selfadapt_deploy.trainer.pseudo_label import (
        PSEUDO_SUFFIX,
        PseudoLabelParams,
        pseudo_label_image,
        write_pseudo_labels,
    )

    params = PseudoLabelParams(diameter or None, tile_overlap, batch_size)
    picked = parse_channels(channels)
    files = expand_inputs(images)
    ensure_writable_dir(out)
    runner, choice = open_runner(model, runtime, resolve_device(device), precision, TEACHER_GRAPH,
                                 onnx_provider, compile=compile, attention=attention,
                                 compile_cache=compile_cache)
    runner.activate()
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
def evaluate(
    pred: Annotated[list[Path], typer.Option(help="Predicted label images.")],
    gt: Annotated[list[Path], typer.Option(help="Ground-truth label images, same order.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write results to this "
                                                  "JSON file.")] = None,
):
    """AP = TP/(TP+FP+FN) at IoU 0.5 / 0.75 / 0.9 (as cellpose.metrics.average_precision)."""
    from selfadapt_deploy.batch import evaluate_files
    from selfadapt_deploy.metrics import pooled

    results = evaluate_files(pred, gt)
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
        with atomic_path(json_out, "--json") as tmp:
            tmp.write_text(json.dumps(payload, indent=2))


# adaptation and serving commands live in cli_train and cli_serve (registered here, so
# `sa-deploy --help` lists them all)
from selfadapt_deploy.cli_cache import cache  # noqa: E402
from selfadapt_deploy.cli_serve import serve  # noqa: E402
from selfadapt_deploy.cli_train import adapt, demo  # noqa: E402

app.command()(adapt)
app.command()(demo)
app.command()(serve)
app.command()(cache)


def _unwrapped(doc: str) -> str:
    """A docstring's paragraphs with their hard line breaks removed: ``--help`` wraps whole
    sentences to the terminal instead of breaking them where the source file did."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


for _info in app.registered_commands:
    _info.help = _unwrapped(_info.help or _info.callback.__doc__ or "")
