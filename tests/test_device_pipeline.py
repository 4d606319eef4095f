"""The device-resident pipeline (tensors from upload to label image), run here with
``device="cpu"``: the same torch code a GPU runs, checked against the host pipeline."""

from __future__ import annotations

import cv2
import fastremap
import numpy as np
import pytest
import torch

from selfadapt_deploy.io import read_images, select_channels
from selfadapt_deploy.io.normalize import DOWNSAMPLE_ABOVE, normalize_image, normalize_tensor
from selfadapt_deploy.metrics import average_precision
from selfadapt_deploy.models import load_model
from selfadapt_deploy.postprocess import MaskParams, flows_to_masks_batch, flows_to_masks_on_device
from selfadapt_deploy.postprocess.masks import relabel_torch
from selfadapt_deploy.runtime import TorchRunner
from selfadapt_deploy.segment import SegmentParams, resize_chw, segment_image, segment_images
from selfadapt_deploy.synthetic import random_labels, render

from .helpers import cuda, synthetic_flows


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_normalisation_on_device_equals_cellposes_numbers_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    img = rng.gamma(2.0, 60.0, (3, 130, 170)).astype(dtype)
    img[1] = 9  # a flat channel becomes 0
    got = normalize_tensor(torch.from_numpy(img)).numpy()
    np.testing.assert_array_equal(got, normalize_image(img))
    assert got[0].max() > 1 and not got[1].any()


def test_normalisation_on_device_uses_cellposes_subsample_above_224_cubed():
    img = np.random.default_rng(1).gamma(2.0, 60.0, (1, 3400, 3400)).astype(np.uint16)
    assert img[0].size > DOWNSAMPLE_ABOVE
    np.testing.assert_array_equal(normalize_tensor(torch.from_numpy(img)).numpy(), normalize_image(img))


@pytest.mark.parametrize("size", [(61, 97), (240, 300), (150, 150)])
def test_interpolate_matches_opencv_bilinear(size):
    """Up- and downscaling (no antialiasing in either): equal to float32 rounding."""
    img = normalize_image(render(random_labels((120, 150), 20, seed=2), seed=2)[None].repeat(2, 0))
    ours = resize_chw(torch.from_numpy(img), *size).numpy()
    ref = resize_chw(img, *size)
    assert ref.shape == ours.shape == (2, *size)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    one = cv2.resize(img[0], size[::-1], interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(ours[0], one, atol=2e-5, rtol=0)


def test_relabel_on_device_numbers_labels_as_fastremap():
    masks = random_labels((60, 70), 25, seed=3).astype(np.int64) * 7  # gaps, odd order
    drop = torch.zeros(int(masks.max()) + 1, dtype=torch.bool)
    drop[[14, 70]] = True
    ref = fastremap.mask(masks.copy(), [14, 70])
    fastremap.renumber(ref, in_place=True)
    np.testing.assert_array_equal(relabel_torch(torch.from_numpy(masks), drop).numpy(), ref)
    np.testing.assert_array_equal(relabel_torch(torch.zeros((4, 5), dtype=torch.int64)).numpy(), 0)


@pytest.mark.parametrize("case", ["default", "no_flow_qc", "small_max_size", "empty"])
def test_flows_to_masks_on_device_equal_the_host_path(case):
    _, flows, cellprob = synthetic_flows((200, 230), 90, seed=7, noise=1.5)
    params = {"default": MaskParams(), "no_flow_qc": MaskParams(flow_threshold=0.0),
              "small_max_size": MaskParams(max_size_fraction=0.004),
              "empty": MaskParams(cellprob_threshold=50.0)}[case]
    host = flows_to_masks_batch(flows[None], cellprob[None], params)[0]
    device = flows_to_masks_on_device(torch.from_numpy(flows)[None], torch.from_numpy(cellprob)[None],
                                      params)[0]
    assert device.dtype == host.dtype
    np.testing.assert_array_equal(device, host)
    assert (host.max() > 40) == (case != "empty")


def test_device_pipeline_matches_the_host_pipeline_on_a_real_image(trained_cpnet_path, data_dir):
    """Real Cell Painting field, the trained fixture, rescaled (diameter ≠ diam_mean) and with TTA."""
    net = load_model(trained_cpnet_path)
    image = read_images(data_dir / "cdp2bioactives_h23.ome.tif", series=1)[0]
    img = select_channels(image.data[:, :300, :360], [0], net.nchan, image.name)
    with TorchRunner(net) as runner:
        for params in (SegmentParams(diameter=20.0), SegmentParams(tta=True)):
            host = segment_image(runner, img, params)
            device = segment_images(runner, [img], SegmentParams(**{**vars(params), "pipeline": "device"}))[0]
            assert isinstance(device.output, torch.Tensor)  # stays on the device until read
            # interpolate vs OpenCV differ by float rounding (≤ 2e-5, above); flows are ~±5
            np.testing.assert_allclose(device.flows, host.flows, atol=2e-3, rtol=0)
            assert host.masks.max() > 20
            assert average_precision(host.masks, device.masks).ap[0] >= 0.99
            assert set(device.timings) == {"normalize", "network", "masks"}


def test_unknown_pipeline_is_a_clear_error(tiny_cpnet):
    from selfadapt_deploy.errors import SaDeployError

    with TorchRunner(tiny_cpnet) as runner, pytest.raises(SaDeployError, match="--pipeline must be"):
        segment_images(runner, [np.zeros((2, 32, 32), np.float32)], SegmentParams(pipeline="gpu"))


# ---- on a real GPU (skip without CUDA) -----------------------------------------------------


@cuda
@pytest.mark.gpu
def test_normalise_and_resize_on_cuda_match_the_host():
    img = np.random.default_rng(0).gamma(2.0, 60.0, (2, 300, 260)).astype(np.uint16)
    x = normalize_tensor(torch.from_numpy(img).cuda())
    ref = normalize_image(img)
    np.testing.assert_allclose(x.cpu().numpy(), ref, atol=1e-6, rtol=0)  # IEEE ops: equal or 1 ulp
    np.testing.assert_allclose(resize_chw(x, 410, 199).cpu().numpy(), resize_chw(ref, 410, 199),
                               atol=1e-4, rtol=0)


@cuda
@pytest.mark.gpu
def test_flows_to_masks_on_cuda_agree_with_the_cpu_pipeline():
    """Positions on a GPU drift by rounding (../shared/GPU_FACTS.md): AP@0.5 ≥ 0.99, not equality."""
    _, flows, cellprob = synthetic_flows((512, 512), 1500, seed=12, noise=1.0, radius=(4, 7))
    host = flows_to_masks_batch(flows[None], cellprob[None], MaskParams())[0]
    gpu = flows_to_masks_on_device(torch.from_numpy(flows)[None].cuda(),
                                   torch.from_numpy(cellprob)[None].cuda(), MaskParams())[0]
    assert host.max() > 500
    assert average_precision(host, gpu).ap[0] >= 0.99
    assert abs(int(gpu.max()) - int(host.max())) <= 0.01 * host.max()


@cuda
@pytest.mark.gpu
def test_segment_on_cuda_runs_the_device_pipeline_and_agrees_with_the_cpu(trained_cpnet_path, data_dir):
    net = load_model(trained_cpnet_path)
    image = read_images(data_dir / "cdp2bioactives_h23.ome.tif", series=0)[0]
    img = select_channels(image.data, [0], net.nchan, image.name)
    with TorchRunner(net, "cpu") as cpu:
        ref = segment_image(cpu, img, SegmentParams())
    with TorchRunner(net.cuda(), "cuda", "fp32") as fp32, TorchRunner(net, "cuda", "auto") as auto:
        seg32 = segment_image(fp32, img, SegmentParams())  # pipeline auto → device on CUDA
        seg16 = segment_image(auto, img, SegmentParams())
    assert isinstance(seg32.output, torch.Tensor) and seg32.output.device.type == "cuda"
    assert ref.masks.max() > 100
    assert average_precision(ref.masks, seg32.masks).ap[0] >= 0.99
    assert average_precision(ref.masks, seg16.masks).ap[0] >= 0.98  # fp16 on top of GPU rounding
