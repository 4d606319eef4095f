"""Options, consoles and error reporting shared by the ``sa-deploy`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


# options shared by the commands that read images and run a model
ImagesArg = Annotated[list[Path], typer.Argument(help="TIFF / OME-TIFF / PNG images, or folders of them.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda[:N]; a missing GPU is an error.")]
RuntimeOpt = Annotated[str, typer.Option(help="auto, torch, onnx or tensorrt. An export directory: "
                                         "auto takes its TensorRT engine when it matches this GPU, "
                                         "else onnxruntime. Weights, a name or a run: torch on a "
                                         "GPU; on the CPU auto (Cellpose 3 nets) and onnx export "
                                         "it once into the graph cache (`sa-deploy cache list`) "
                                         "and run onnxruntime, faster than torch there; auto keeps "
                                         "torch for a job too small to repay the export.")]
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
ZAxisOpt = Annotated[int | None, typer.Option(help="Axis of Z in the file's array, for stacks whose "
                                             "metadata does not record it.")]
SeriesOpt = Annotated[int | None, typer.Option(help="Only this series of multi-series files "
                                               "(default: every series).")]


def fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


def plain(target: Console):
    """A ``report`` callback printing library messages verbatim (paths may hold [brackets])."""
    return lambda message: target.print(message, highlight=False, markup=False, soft_wrap=True)


def parse_floats(text: str, option: str) -> list[float]:
    """``1.5`` or ``1,2,2`` → floats; anything else is one error naming ``option``."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise fail(f"{option} takes numbers separated by commas (e.g. 1 or 1,2,2), got '{text}'") from None


def parse_channels(text: str | None) -> list[int] | None:
    """``--channels`` text → indices, checked by the one channel rule (``io.readers``) before any work."""
    from selfadapt_deploy.io.readers import check_channels

    if text is None:
        return None
    try:
        channels = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise fail(f"--channels '{text}' is not a comma-separated list of channel indices "
                    "(e.g. 0 or 1,0)") from None
    check_channels(channels)  # a SaDeployError: the CLI's error boundary turns it into one line
    return channels


