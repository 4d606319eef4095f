"""The models ``sa-deploy serve`` runs inside Triton's Python backend (``TritonPythonModel``s).

Tensors cross the backend boundary by DLPack (``np.from_dlpack`` / ``Tensor.from_dlpack``), never
through the backend's numpy C API, which is built against numpy 1 in the server wheels we use.
A request that cannot be served gets an error response; the model keeps serving.
"""

from __future__ import annotations

import json

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


def _error(message: str):
    pb = _pb()
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message))


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
            if image.shape[0] * image.shape[1] > self.max_pixels:
                raise SaDeployError(f"{name} of {image.shape[0]}×{image.shape[1]} pixels is above the "
                                    f"server's --max-image-pixels {self.max_pixels}; tile it or use "
                                    "sa-deploy segment --stream")
            settings = {n: _finite(n, a).reshape(-1)[0].item() for n in SETTING_INPUTS
                        if (a := _input(request, n)) is not None}
            channels = _input(request, "channels")
            labels = self.segmenter.segment(
                _finite(name, image), channels=None if channels is None else channels.tolist(),
                channel_axis=-1, **settings)
        except SaDeployError as exc:
            return _error(str(exc))
        pb = _pb()
        return pb.InferenceResponse([pb.Tensor.from_dlpack(
            "labels", np.ascontiguousarray(labels, dtype=np.uint32))])

    def finalize(self) -> None:
        self.segmenter.close()


class NetworkModel:
    """``tiles`` B×C×H×W float32 (normalised, at the model's scale) → ``flows_cellprob`` B×3×H×W:
    the exported ONNX graph's contract. Requests Triton batched together run as one network
    batch per tile shape."""

    def initialize(self, args: dict) -> None:
        from selfadapt_deploy.runtime.select import open_runner
        from selfadapt_deploy.runtime.torch_runner import resolve_device

        s = _settings(args)
        self.runner, _ = open_runner(s["model"], s["runtime"], resolve_device(s["device"]),
                                     s["precision"])
        self.runner.activate()

    def execute(self, requests: list) -> list:
        answers: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        for k, request in enumerate(requests):
            try:
                tiles = _finite("tiles", _input(request, "tiles"))
                groups.setdefault(tiles.shape[1:], []).append((k, tiles))
            except SaDeployError as exc:
                answers[k] = _error(str(exc))
        pb = _pb()
        for members in groups.values():
            try:
                x = torch.from_numpy(np.concatenate([t for _, t in members]))
                y = self.runner.infer(x.to(self.runner.device)).float().cpu().numpy()
            except (SaDeployError, ValueError, TypeError) as exc:
                for k, _ in members:
                    answers[k] = _error(f"tiles: {exc}")
                continue
            start = 0
            for k, tiles in members:
                part = np.ascontiguousarray(y[start:start + len(tiles)])
                answers[k] = pb.InferenceResponse([pb.Tensor.from_dlpack("flows_cellprob", part)])
                start += len(tiles)
        return answers

    def finalize(self) -> None:
        self.runner.deactivate()
