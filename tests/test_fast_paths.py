"""Reduced precision, SDPA attention and torch.compile of the torch runner, checked on the CPU
against the fp32 eager network (the same torch code a GPU runs)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io import read_images, select_channels
from selfadapt_deploy.metrics import average_precision
from selfadapt_deploy.models import CellposeSAM, CPnet, load_model
from selfadapt_deploy.runtime import TorchRunner
from selfadapt_deploy.runtime.torch_runner import batch_bucket, resolve_precision
from selfadapt_deploy.segment import SegmentParams, segment_image


def test_auto_precision_is_reduced_on_cuda_and_fp32_on_the_cpu():
    assert resolve_precision("auto", "cuda", CellposeSAM) == resolve_precision(None, "cuda:0",
                                                                               CellposeSAM) == "bf16"
    assert resolve_precision("auto", "cuda", CPnet) == "fp16"
    assert resolve_precision("auto", "cpu", CPnet) == resolve_precision("auto", "cpu", CellposeSAM) == "fp32"
    assert resolve_precision("fp16", "cpu", CPnet) == "fp16"
    with pytest.raises(SaDeployError, match="--precision must be one of"):
        resolve_precision("int8", "cpu", CPnet)
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_sdpa_attention_equals_cellposes_attention(tiny_cpsam):
    """Relative-position bias as SDPA's additive mask: the same function, equal to rounding."""
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tiny_cpsam.export_forward(x, sdpa=True), tiny_cpsam(x),
                                   atol=1e-5, rtol=1e-5)
    with TorchRunner(tiny_cpsam, attention="sdpa") as fast, TorchRunner(tiny_cpsam) as native:
        assert fast.sdpa and not native.sdpa and "sdpa" in fast.name
        torch.testing.assert_close(fast.infer(x), native.infer(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(SaDeployError, match="--attention must be one of"):
        TorchRunner(tiny_cpsam, attention="flash")


@pytest.mark.parametrize("series", [0, 3])
def test_auto_precision_masks_agree_with_fp32_on_real_images(trained_cpnet_path, data_dir, series):
    """CPnet's CUDA default (fp16) run on the CPU against fp32, whole real fields: AP@0.5
    agreement ≥ 0.99."""
    net = load_model(trained_cpnet_path)
    image = read_images(data_dir / "cdp2bioactives_h23.ome.tif", series=series)[0]
    img = select_channels(image.data, [0], net.nchan, image.name)
    low_precision = resolve_precision("auto", "cuda", net)
    with TorchRunner(net, precision="fp32") as fp32, TorchRunner(net, precision=low_precision) as low:
        ref = segment_image(fp32, img, SegmentParams())
        reduced = segment_image(low, img, SegmentParams())
    assert ref.masks.max() > 100
    assert average_precision(ref.masks, reduced.masks).ap[0] >= 0.99
    assert np.abs(reduced.flows - ref.flows).max() > 0  # reduced precision really ran


@pytest.mark.slow
def test_compiled_runner_equals_eager_and_compiles_once_per_batch_bucket(tiny_cpnet, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    with TorchRunner(tiny_cpnet) as eager, \
            TorchRunner(tiny_cpnet, compile=True, compile_cache=tmp_path / "cache") as compiled:
        assert "compiled" in compiled.name
        graphs = []
        for n in (4, 3):  # 3 tiles run in the bucket of 4: nothing compiled a second time
            torch.testing.assert_close(compiled.infer(x[:n]), eager.infer(x[:n]), atol=1e-4, rtol=1e-4)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[0]
    assert any((tmp_path / "cache").rglob("*"))  # kernels persisted for the next start
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(tmp_path / "cache")  # not left set


def test_torch_runner_leaves_no_global_state_behind(tiny_cpnet, monkeypatch):
    """fp32 is real fp32 while the runner runs (TF32 off, as cellpose.vit's import turns it on),
    the caller's TF32 flags and the network's training mode are given back afterwards."""
    seen = []
    forward = tiny_cpnet.export_forward

    def spy(x, sdpa=False):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return forward(x, sdpa)

    monkeypatch.setattr(tiny_cpnet, "export_forward", spy)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    tiny_cpnet.train()
    with TorchRunner(tiny_cpnet) as runner:
        assert not tiny_cpnet.training
        runner.infer(torch.rand(1, 2, 64, 64))
    assert seen == [(False, False)]
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert tiny_cpnet.training
