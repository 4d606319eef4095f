"""``sa-deploy serve``: a Triton Inference Server for one model (registered in ``cli``)."""

from __future__ import annotations

from typing import Annotated

import typer

from selfadapt_deploy.cli_options import DeviceOpt, PrecisionOpt, RuntimeOpt, console, fail, plain


def serve(
    model: Annotated[str, typer.Argument(help="Weights file, adaptation run, export directory or "
                                         "Cellpose model name.")],
    host: Annotated[str, typer.Option(help="Address the server listens on.")] = "0.0.0.0",
    http_port: Annotated[int, typer.Option(help="HTTP/REST port (KServe v2).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    max_batch: Annotated[int, typer.Option(help="network model: largest dynamic batch of "
                                           "tiles.")] = 8,
    max_image_pixels: Annotated[int, typer.Option(help="segment model: larger images are "
                                                  "refused.")] = 8192 * 8192,
    batch_size: Annotated[int, typer.Option(help="segment model: tiles per network batch.")] = 8,
    instances: Annotated[int, typer.Option(help="Copies of each model (one request at a time "
                                           "each).")] = 1,
    tritonserver: Annotated[str | None, typer.Option(help="tritonserver binary (default: on PATH, "
                                                     "else nvidia-pytriton's).")] = None,
):
    """Serve a model on a Triton Inference Server: `segment` (image → labels) and `network`
    (tiles → flows), with health, readiness and Prometheus metrics; SIGTERM stops it cleanly."""
    from selfadapt_deploy.runner_choice import open_runner
    from selfadapt_deploy.runtime import resolve_device
    from selfadapt_deploy.serving.server import Ports, ServeSettings, TritonServer, serve_forever

    if min(max_batch, batch_size, instances, max_image_pixels) < 1:
        raise fail("--max-batch, --batch-size, --instances and --max-image-pixels must be ≥ 1")
    settings = ServeSettings(model, runtime, device, precision, max_batch, max_image_pixels,
                             batch_size, instances)
    # the model is opened here first, so a bad --model or --runtime fails before the server
    runner, choice = open_runner(model, runtime, resolve_device(device), precision)
    server = TritonServer(settings, runner.spec, Ports(host, http_port, grpc_port, metrics_port),
                          tritonserver)
    console.print(f"model: {choice}", soft_wrap=True, highlight=False, markup=False)
    code = serve_forever(server, plain(console))
    raise typer.Exit(code)
