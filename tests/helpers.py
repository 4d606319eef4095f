"""Test helpers: cellpose adapters (cellpose's own functions are the oracle) and synthetic flows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from selfadapt_deploy.postprocess.integrate import triton_available

#: GPU tests skip cleanly without CUDA (CI never has a GPU); Triton kernels need the package
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def randomize_batchnorm(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so parity tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net



class CellposeNetAdapter(nn.Module):
    """Presents one of our networks the way cellpose 4's ``run_net`` expects a net:
    ``.device``, ``.dtype`` and a forward returning (outputs, 256-d style)."""

    dtype = torch.float32

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x: torch.Tensor):
        return self.net(x), torch.zeros(len(x), 256)


def cellpose4_model(net: nn.Module):
    """A ``cellpose.models.CellposeModel`` running ``net``, so its own ``eval`` is the oracle."""
    from cellpose.models import CellposeModel

    model = CellposeModel.__new__(CellposeModel)
    model.net, model.backbone = CellposeNetAdapter(net), "sa-deploy-test"
    model.device, model.gpu = torch.device("cpu"), False
    return model


def synthetic_flows(shape=(256, 256), n_cells=120, seed=0, noise=0.5, radius=(6, 10)):
    """(labels, flows 2×Y×X in network units, cellprob logits) made from random cells."""
    from selfadapt_deploy.postprocess.flow_qc import masks_to_flows
    from selfadapt_deploy.synthetic import random_labels

    labels = random_labels(shape, n_cells, radius=radius, seed=seed)
    rng = np.random.default_rng(seed)
    flows = (5 * masks_to_flows(labels) + rng.normal(0, noise, (2, *shape))).astype(np.float32)
    cellprob = (np.where(labels > 0, 3.0, -3.0) + rng.normal(0, 1.5, shape)).astype(np.float32)
    return labels, flows, cellprob


class NoNetworkRunner:
    """Factory of a runner without a network (zero flows, cellprob = 8·channel 0 − 4): the
    streaming machinery's own time and memory, measured apart from any network."""

    @staticmethod
    def make():
        from selfadapt_deploy.models.base import ModelSpec
        from selfadapt_deploy.runtime.base import Runner

        class _Runner(Runner):
            name = "no network"

            def run_impl(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
                flows = x.new_zeros((x.shape[0], 2, *x.shape[2:]))
                return {"flows_cellprob": torch.cat([flows, 8 * x[:, :1] - 4], dim=1)}

        spec = ModelSpec(nchan=2, tile_size=224, fixed_tile=False, diam_mean=17.0, default_diameter=17.0)
        return _Runner(spec)


def assert_positions_agree(got: torch.Tensor, ref: torch.Tensor) -> None:
    """What a flow integrator on another machine guarantees (../shared/GPU_FACTS.md): 200 Euler
    steps amplify last-bit differences near the flow's fixed points, so torch's own CUDA
    grid_sample ends up to 0.65 px from its CPU result on 0.23 % of pixels. Nearly every pixel
    within 1e-3 px, none by more than 1.5 px, the integer bins (which make the masks) equal for
    nearly every pixel."""
    diff = (got.cpu() - ref.cpu()).abs().amax(dim=0)
    assert (diff <= 1e-3).float().mean().item() >= 0.95, diff.quantile(0.95)
    assert diff.max().item() <= 1.5
    assert (got.cpu().int() == ref.cpu().int()).all(0).float().mean().item() >= 0.99


def under_triton_interpreter(script: str, folder: Path, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``script`` (reads ``sys.argv[1]``'s .npz of ``arrays``, writes ``sys.argv[2]``'s) in a new
    process under Triton's CPU interpreter and return what it wrote. TRITON_INTERPRET is read when
    a kernel is defined, hence the new process; the GPU is hidden from it (the test once failed on a
    GPU machine only), so it runs the same on every machine."""
    np.savez(folder / "in.npz", **arrays)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", script, str(folder / "in.npz"), str(folder / "out.npz")],
                   env=env, check=True, timeout=600)
    return dict(np.load(folder / "out.npz"))
