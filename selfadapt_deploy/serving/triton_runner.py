"""A runner whose network runs on a Triton Inference Server (``segment --triton URL``).

The server's ``network`` model is ``sa-deploy serve``'s or one from ``export --triton-repo`` in any
Triton server: both configs carry the model's :class:`ModelSpec` (parameter ``sa_deploy_spec``), so
tiling, normalisation and post-processing run here exactly as for a local runner.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from selfadapt_deploy.errors import ServeError
from selfadapt_deploy.export.triton_repo import SPEC_PARAMETER
from selfadapt_deploy.models.base import ModelSpec
from selfadapt_deploy.runtime.base import MODEL_GRAPH, Runner
from selfadapt_deploy.serving.client import TritonHTTPClient


class TritonRunner(Runner):
    """Tiles go to ``model`` on the server at ``url`` in batches of at most its max batch."""

    name = "triton"

    def __init__(self, url: str, model: str = "network"):
        self.url, self.model = url, model
        self.client = TritonHTTPClient(url)
        config = self.client.config(model)
        try:
            spec = ModelSpec(**json.loads(config["parameters"][SPEC_PARAMETER]["string_value"]))
        except (KeyError, TypeError, ValueError):
            raise ServeError(f"{url}: model '{model}' was not written by sa-deploy (serve or export "
                             "--triton-repo): its config has no sa_deploy_spec parameter") from None
        super().__init__(spec, MODEL_GRAPH, "cpu")
        self.pads_channels = True  # the served graph takes exactly spec.nchan channels
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        self.output = MODEL_GRAPH.outputs[0][0]

    def run_impl(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tiles = x.numpy()
        parts = [self.client.infer(self.model, {MODEL_GRAPH.input: tiles[i:i + self.max_batch]},
                                   [self.output])[self.output]
                 for i in range(0, len(tiles), self.max_batch)]
        return {self.output: torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False))}

    def deactivate_impl(self) -> None:
        self.client.close()
