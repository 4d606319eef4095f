"""The models ``sa-deploy serve`` runs inside Triton's Python backend (``TritonPythonModel``s).

Tensors cross the backend boundary by DLPack (``np.from_dlpack`` / ``Tensor.from_dlpack``), never
through the backend's numpy C API, which is built against numpy 1 in the server wheels we use.
A request that cannot be served gets an error response and the model keeps serving: the client's
mistakes are HTTP 400 with the one-line message, our own failures HTTP 500 with no internals (the
traceback goes to the server's log); refused requests are counted in the Prometheus metric
``sa_deploy_refused_requests`` (Triton counts an answered error as a success).
"""

from __future__ import annotations

import json
import sys
import traceback

import numpy as np
import torch

from selfadapt_deploy.errors import SaDeployError

#: the segment model's image inputs, one per accepted pixel type (exactly one per request)
IMAGE_INPUTS = {"image": "TYPE_FP32", "image_uint16": "TYPE_UINT16", "image_uint8": "TYPE_UINT8"}
#: its optional per-request settings (name → Triton type); absent ones keep the server's defaults
SETTING_INPUTS = {"diameter": "TYPE_FP32", "flow_threshold": "TYPE_FP32",
                  "cellprob_threshold": "TYPE_FP32", "min_size": "TYPE_INT32"}


def _pb():
    import triton_python_backend_utils as pb_utils  # only exists inside Triton's backend stub

    return pb_utils


def _settings(args: dict) -> dict:
    return json.loads(json.loads(args["model_config"])["parameters"]["settings"]["string_value"])


REFUSED_METRIC = "sa_deploy_refused_requests"
RESTARTS_METRIC = "sa_deploy_server_restarts"
INTERNAL_MESSAGE = "internal error in sa-deploy's {model} model; the server's log has the details"


def _error(message: str, ours: bool = False):
    """An error answer: the client's mistake (INVALID_ARG: HTTP 400) or ours (INTERNAL: HTTP 500)."""
    pb = _pb()
    code = getattr(pb.TritonError, "INTERNAL" if ours else "INVALID_ARG", None)
    error = pb.TritonError(message) if code is None else pb.TritonError(message, code)
    return pb.InferenceResponse(output_tensors=[], error=error)


class ServeMetrics:
    """A served model's own Prometheus metrics — refused requests, serve's restarts of a dead
    tritonserver (no-ops where the backend has no custom metrics) — and the error answer an
    exception deserves."""

    def __init__(self, model: str):
        pb, self.model = _pb(), model
        self.family = self.metric = None  # the family must outlive its metric (Triton's rule)
        if hasattr(pb, "MetricFamily"):
            self.family = pb.MetricFamily(name=REFUSED_METRIC, description="requests answered with "
                                          "an error (the client's or ours)",
                                          kind=pb.MetricFamily.COUNTER)
            self.metric = self.family.Metric(labels={"model": model})

    def report_restarts(self, restarts: int) -> None:
        """How often serve restarted a dead tritonserver, as the gauge ``sa_deploy_server_restarts``."""
        pb = _pb()
        if hasattr(pb, "MetricFamily"):
            self.restarts_family = pb.MetricFamily(
                name=RESTARTS_METRIC, description="times sa-deploy serve restarted a dead tritonserver",
                kind=pb.MetricFamily.GAUGE)
            self.restarts_metric = self.restarts_family.Metric(labels={})
            self.restarts_metric.set(restarts)

    def answer(self, exc: BaseException):
        if self.metric is not None:
            try:
                self.metric.increment(1)
            except Exception:  # counting must never keep a request from its answer
                traceback.print_exc(file=sys.stderr)
        if isinstance(exc, SaDeployError):
            return _error(str(exc))
        traceback.print_exception(exc, file=sys.stderr)  # to tritonserver's log, not the client
        return _error(INTERNAL_MESSAGE.format(model=self.model), ours=True)


def _input(request, name: str) -> np.ndarray | None:
    tensor = _pb().get_input_tensor_by_name(request, name)
    return None if tensor is None else np.from_dlpack(tensor)


def _finite(name: str, array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise SaDeployError(f"{name} contains NaN or infinite values; replace them (e.g. with 0)")
    return array


class SegmentModel:
    """An image (Y×X×C, float32, uint16 or uint8) and optional settings → ``labels`` (Y×X uint32),
    what ``sa-deploy segment`` writes for that image."""

    def initialize(self, args: dict) -> None:
        from selfadapt_deploy.api import Segmenter

        s = _settings(args)
        self.metrics = ServeMetrics("segment")
        self.metrics.report_restarts(s.get("restarts", 0))
        self.max_pixels = s["max_image_pixels"]
        self.segmenter = Segmenter(s["model"], runtime=s["runtime"], device=s["device"],
                                   precision=s["precision"], batch_size=s["batch_size"])

    def execute(self, requests: list) -> list:
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            images = [(n, a) for n in IMAGE_INPUTS if (a := _input(request, n)) is not None]
            if len(images) != 1:
                raise SaDeployError(f"send exactly one of the inputs {', '.join(IMAGE_INPUTS)} "
                                    f"(got {len(images)})")
            name, image = images[0]
            if image.ndim != 3 or 0 in image.shape:
                raise SaDeployError(f"{name} has shape {list(image.shape)}; send one non-empty Y×X×C "
                                    "image (C ≥ 1)")
            if image.shape[0] * image.shape[1] > self.max_pixels:
                raise SaDeployError(f"{name} of {image.shape[0]}×{image.shape[1]} pixels is above the "
                                    f"server's --max-image-pixels {self.max_pixels}; tile it or use "
                                    "sa-deploy segment --stream")
            settings = {n: _finite(n, a).reshape(-1)[0].item() for n in SETTING_INPUTS
                        if (a := _input(request, n)) is not None}
            self._check_rescaled(name, image.shape[:2], settings.get("diameter"))
            channels = _input(request, "channels")
            labels = self.segmenter.segment(
                _finite(name, image), channels=None if channels is None else channels.tolist(),
                channel_axis=-1, **settings)
        except Exception as exc:  # every request is answered; ours are 500s
            return self.metrics.answer(exc)
        pb = _pb()
        return pb.InferenceResponse([pb.Tensor.from_dlpack(
            "labels", np.ascontiguousarray(labels, dtype=np.uint32))])

    def _check_rescaled(self, name: str, shape: tuple[int, int], diameter: float | None) -> None:
        """The image at the network's scale is bounded by --max-image-pixels too: a small image
        with a tiny diameter must not become a huge one (128² at diameter 1 → 2176² for cyto3)."""
        from selfadapt_deploy.segment import rescale_factor

        rescale = rescale_factor(self.segmenter.runner.spec, diameter or None)
        ry, rx = int(shape[0] * rescale), int(shape[1] * rescale)
        if ry * rx > self.max_pixels:
            raise SaDeployError(f"diameter {diameter:g} would rescale {name} of {shape[0]}×{shape[1]} "
                                f"pixels {rescale:.3g}× to {ry}×{rx}, above the server's "
                                f"--max-image-pixels {self.max_pixels}; send the cells' diameter in pixels")

    def finalize(self) -> None:
        self.segmenter.close()


class NetworkModel:
    """``tiles`` B×C×H×W float32 (normalised, at the model's scale) → ``flows_cellprob`` B×3×H×W:
    the exported ONNX graph's contract. Requests Triton batched together run as one network
    batch per tile shape."""

    def initialize(self, args: dict) -> None:
        from selfadapt_deploy.runner_choice import open_runner
        from selfadapt_deploy.runtime.torch_runner import resolve_device

        s = _settings(args)
        self.metrics = ServeMetrics("network")
        self.runner, _ = open_runner(s["model"], s["runtime"], resolve_device(s["device"]),
                                     s["precision"])
        self.runner.activate()

    def execute(self, requests: list) -> list:
        answers: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        for k, request in enumerate(requests):
            try:
                tiles = _finite("tiles", _input(request, "tiles"))
                if tiles.ndim != 4 or 0 in tiles.shape:
                    raise SaDeployError(f"tiles has shape {list(tiles.shape)}; send B×C×H×W tiles")
                groups.setdefault(tiles.shape[1:], []).append((k, tiles))
            except Exception as exc:  # every request is answered
                answers[k] = self.metrics.answer(exc)
        pb = _pb()
        for members in groups.values():
            try:
                x = torch.from_numpy(np.concatenate([t for _, t in members]))
                y = self.runner.infer(x.to(self.runner.device)).float().cpu().numpy()
            except (ValueError, TypeError) as exc:  # the runner's checks: shapes, channels
                for k, _ in members:
                    answers[k] = self.metrics.answer(SaDeployError(f"tiles: {exc}"))
                continue
            except Exception as exc:  # ours: HTTP 500
                for k, _ in members:
                    answers[k] = self.metrics.answer(exc)
                continue
            start = 0
            for k, tiles in members:
                part = np.ascontiguousarray(y[start:start + len(tiles)])
                answers[k] = pb.InferenceResponse([pb.Tensor.from_dlpack("flows_cellprob", part)])
                start += len(tiles)
        return answers

    def finalize(self) -> None:
        self.runner.deactivate()
