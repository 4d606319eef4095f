"""Z-stacks: stitching, 3-D clean-up and stack normalisation against cellpose 4.2's own functions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.normalize import normalize_volume
from selfadapt_deploy.metrics import average_precision
from selfadapt_deploy.models import load_model
from selfadapt_deploy.postprocess.cleanup import fill_holes_and_remove_small
from selfadapt_deploy.postprocess.stitch import PlaneStitcher, stitch_planes
from selfadapt_deploy.runtime import TorchRunner
from selfadapt_deploy.segment import SegmentParams
from selfadapt_deploy.synthetic import random_volume_labels, render_volume
from selfadapt_deploy.volume import orthogonal_planes, segment_stitched

from .helpers import assert_positions_agree, cellpose4_model, cuda, needs_triton, under_triton_interpreter


def plane_labels(seed: int, z: int = 10, shape: tuple[int, int] = (80, 96)) -> np.ndarray:
    """Per-plane label images (each 1..N) of drifting, merging discs, with empty planes."""
    rng = np.random.default_rng(seed)
    out = np.zeros((z, *shape), np.uint16)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    centres = rng.uniform(0, 1, (14, 2)) * shape
    for k in range(z):
        if rng.random() < 0.15:
            continue  # an empty plane: cellpose's bookkeeping around it is part of the contract
        lab = np.zeros(shape, np.int32)
        centres += rng.normal(0, 3, centres.shape)
        for c, (cy, cx) in enumerate(centres[: rng.integers(0, 15)]):
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(3, 13) ** 2] = c + 1
        if rng.random() < 0.3:
            lab = ndimage.label(lab > 0)[0]  # touching discs merge: one mask, new shapes
        present = np.unique(lab)
        lookup = np.zeros(lab.max() + 1, np.int32)
        lookup[present] = np.arange(len(present))
        out[k] = lookup[lab]
    return out


@pytest.mark.parametrize("threshold", [0.1, 0.25, 0.5, 0.9])
def test_stitching_equals_cellpose_stitch3d(threshold):
    from cellpose.utils import stitch3D

    linked = 0
    for seed in range(25):
        planes = plane_labels(seed)
        ours = stitch_planes(planes, threshold)
        reference = stitch3D(planes.copy(), stitch_threshold=threshold)
        np.testing.assert_array_equal(ours, reference.astype(np.int64))
        linked += int(len(np.unique(ours)) - 1 < sum(int(p.max()) for p in planes))
    assert linked > (10 if threshold <= 0.5 else 0)  # masks were linked across planes


def test_stitcher_streams_planes_one_at_a_time():
    planes = plane_labels(3)
    stitcher = PlaneStitcher(0.25)
    streamed = [stitcher.add(p) for p in planes]
    np.testing.assert_array_equal(np.stack(streamed), stitch_planes(planes, 0.25))
    assert stitcher.previous is streamed[-1]  # all it keeps: the last plane


def test_3d_clean_up_equals_cellpose_fill_holes_and_remove_small_masks():
    from cellpose.utils import fill_holes_and_remove_small_masks

    masks = stitch_planes(plane_labels(7, z=12), 0.25).astype(np.uint16)
    hollow = np.zeros((9, 20, 20), np.uint16)
    hollow[1:8, 2:18, 2:18] = 1
    hollow[3:6, 6:14, 6:14] = 0  # a closed cavity: filled in 3-D
    hollow[1:5, 15:17, 3:5] = 0  # a shaft from the box's top face: a 2-D hole in plane 4, not a 3-D one
    cases = [masks, hollow, np.pad(masks, ((0, 0), (0, 0), (0, 0))) * (masks != 3)]
    for case in cases:
        for min_size in (0, 15, 200):
            ours = fill_holes_and_remove_small(case, min_size)
            np.testing.assert_array_equal(ours, fill_holes_and_remove_small_masks(case.copy(), min_size))
    filled = fill_holes_and_remove_small(hollow, 0)
    assert filled[4, 9, 9] == 1 and filled[4, 15, 3] == 0


def test_3d_hole_filling_follows_fill_voids_face_scan():
    """fill_voids seeds its flood only where a run of background starts in its face scan (runs
    continue across row ends), so some face voxels shut off inside a box count as holes: cellpose's
    result, label for label, on masks full of small cavities and notches."""
    from cellpose.utils import fill_holes_and_remove_small_masks

    rng = np.random.default_rng(1)
    for seed in range(6):
        masks = random_volume_labels((12, 48, 52), 30, radius=(5, 9), seed=seed).astype(np.uint16)
        masks[rng.random(masks.shape) < 0.08] = 0  # salt: cavities, notches on box faces
        ours = fill_holes_and_remove_small(masks, 0)
        np.testing.assert_array_equal(ours, fill_holes_and_remove_small_masks(masks.copy(), 0))
        assert (ours > 0).sum() > (masks > 0).sum()  # something was filled


def test_stack_normalisation_equals_cellpose_norm3d():
    from cellpose.transforms import normalize_img

    rng = np.random.default_rng(0)
    for shape in [(6, 2, 40, 50), (60, 1, 300, 700)]:  # the second is above 224³: subsampled
        stack = rng.gamma(2.0, 100.0, shape).astype(np.uint16)
        reference = normalize_img(stack.transpose(0, 2, 3, 1).astype(np.float32), norm3D=True)
        np.testing.assert_array_equal(normalize_volume(stack), reference.transpose(0, 3, 1, 2))


def cellpose_stitched(net, stack_zcyx, params: SegmentParams, threshold: float) -> np.ndarray:
    """cellpose 4.2's ``eval(stitch_threshold=…)`` on a Z×C×Y×X stack, with ``net`` as its network."""
    diameter = 30.0 * (params.diameter or net.default_diameter) / net.diam_mean
    masks, _, _ = cellpose4_model(net).eval(
        stack_zcyx.transpose(0, 2, 3, 1).copy(), channel_axis=-1, z_axis=0, diameter=diameter,
        bsize=net.tile_size, stitch_threshold=threshold, flow_threshold=params.flow_threshold,
        cellprob_threshold=params.cellprob_threshold, min_size=params.min_size)
    return masks


def test_stitched_stack_equals_cellpose_eval(trained_cpnet_path):
    net = load_model(trained_cpnet_path)
    labels = random_volume_labels((6, 240, 232), 60, radius=(11, 16), anisotropy=2.0, seed=2)
    gray = render_volume(labels, seed=2, z_blur=1.0)
    stack = np.stack([gray, np.zeros_like(gray)], axis=1)[:, : net.nchan]
    params = SegmentParams()
    with TorchRunner(net) as runner:
        ours = segment_stitched(runner, stack, params, 0.25)
    reference = cellpose_stitched(net, stack, params, 0.25)
    assert reference.max() > 20 and ours.shape == labels.shape
    assert (ours > 0).any(axis=(1, 2)).all()
    np.testing.assert_array_equal(ours, reference)
    # linked: most 3-D masks span several planes
    spans = [len(np.unique(np.nonzero(ours == k)[0])) for k in range(1, int(ours.max()) + 1)]
    assert np.median(spans) >= 2


def test_stitched_stack_of_a_random_vit_equals_cellpose_eval(tiny_cpsam):
    """Hundreds of small masks per plane (QC and size filter off) stress the linking."""
    labels = random_volume_labels((4, 100, 110), 20, radius=(8, 12), seed=4)
    gray = render_volume(labels, seed=4)
    stack = np.stack([gray, 0.5 * gray, np.zeros_like(gray)], axis=1)
    params = SegmentParams(cellprob_threshold=-0.5, flow_threshold=0.0, min_size=0)
    with TorchRunner(tiny_cpsam) as runner:
        ours = segment_stitched(runner, stack, params, 0.1)
    reference = cellpose_stitched(tiny_cpsam, stack, params, 0.1)
    assert reference.max() > 50
    np.testing.assert_array_equal(ours, reference)


def test_stitch_threshold_outside_its_range_is_refused(tiny_cpsam):
    stack = np.zeros((2, 3, 32, 32), np.float32)
    with TorchRunner(tiny_cpsam) as runner, pytest.raises(SaDeployError, match="stitch-threshold"):
        segment_stitched(runner, stack, SegmentParams(), 0.0)


# ---- the command line: Z-stacks refused without a mode, stitched, or split into planes ----------
@pytest.fixture
def stack_file(tmp_path) -> tuple[Path, np.ndarray]:
    """A ZCYX OME-TIFF of generated cells (uint16) and its Z×C×Y×X pixels."""
    labels = random_volume_labels((5, 128, 120), 20, radius=(11, 16), anisotropy=2.0, seed=3)
    gray = (render_volume(labels, seed=3) * 1000).astype(np.uint16)
    stack = np.stack([gray, np.zeros_like(gray)], axis=1)
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, stack, metadata={"axes": "ZCYX"}, ome=True)
    return path, stack


def test_a_z_stack_without_a_mode_is_refused_naming_both(tmp_path, stack_file, trained_cpnet_path):
    out = tmp_path / "out"
    result = cli(["segment", str(stack_file[0]), "--model", str(trained_cpnet_path), "--out", str(out)])
    assert result.exit_code == 1
    assert "Z axis of 5 planes" in result.output and "--stitch-threshold" in result.output
    assert "--planes" in result.output
    assert not list(out.glob("*.tif"))


def test_segment_stitches_a_stack_as_the_library_does(tmp_path, stack_file, trained_cpnet_path):
    path, stack = stack_file
    out = tmp_path / "out"
    result = cli(["segment", str(path), "--model", str(trained_cpnet_path), "--out", str(out),
                  "--stitch-threshold", "0.25", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(out / "stack_masks.tif") as tif:
        written, axes = tif.asarray(), tif.series[0].axes
    assert axes == "ZYX" and written.shape == (5, 128, 120)
    with TorchRunner(load_model(trained_cpnet_path)) as runner:
        expected = segment_stitched(runner, stack, SegmentParams(), 0.25)
    np.testing.assert_array_equal(written, expected)
    assert expected.max() > 5


def write_ome_zarr_volume(path: Path, stack: np.ndarray, scale: tuple[float, float, float]) -> None:
    """A ZCYX OME-Zarr (NGFF 0.4, one level) in micrometres, as napari / bioformats2raw write them."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("0", data=stack, chunks=(1, 1, *stack.shape[2:]))
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "z", "type": "space", "unit": "micrometer"}, {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space",
                                                               "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [scale[0], 1.0, scale[1], scale[2]]}]}]}]


def test_an_ome_zarr_volume_is_stitched_and_written_as_ome_zarr_with_its_voxel_size(
        tmp_path, stack_file, trained_cpnet_path):
    import zarr

    stack = stack_file[1]
    big = np.concatenate([stack] * 3, axis=3)  # 360 wide: the label pyramid gets a second level
    volume = tmp_path / "vol.ome.zarr"
    write_ome_zarr_volume(volume, big, (2.0, 0.325, 0.325))
    out = tmp_path / "out"
    result = cli(["segment", str(volume), "--model", str(trained_cpnet_path), "--out", str(out),
                  "--stitch-threshold", "0.25", "--runtime", "torch", "--out-format", "zarr"])
    assert result.exit_code == 0, result.output
    with TorchRunner(load_model(trained_cpnet_path)) as runner:
        expected = segment_stitched(runner, big, SegmentParams(), 0.25)
    root = zarr.open_group(str(out / "vol_masks.ome.zarr"), mode="r")
    ms = root.attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a.get("unit") for a in ms["axes"]} == {"micrometer"}
    np.testing.assert_array_equal(root["0"][...], expected)
    np.testing.assert_array_equal(root["1"][...], expected[:, ::2, ::2])  # Z kept, Y/X halved
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[2.0, 0.325, 0.325], [2.0, 0.65, 0.65]]
    assert expected.max() > 5 and not list(out.glob(".*part*"))


def test_out_format_zarr_writes_a_2d_image_read_whole_as_the_tiff_it_would_be(tmp_path, stack_file,
                                                                             trained_cpnet_path):
    import zarr

    image = tmp_path / "plane.tif"
    tifffile.imwrite(image, stack_file[1][2, 0])
    for fmt in ("tiff", "zarr"):
        result = cli(["segment", str(image), "--model", str(trained_cpnet_path), "--out",
                      str(tmp_path / fmt), "--runtime", "torch", "--out-format", fmt, "--no-stream"])
        assert result.exit_code == 0, result.output
    want = tifffile.imread(tmp_path / "tiff" / "plane_masks.tif")
    root = zarr.open_group(str(tmp_path / "zarr" / "plane_masks.ome.zarr"), mode="r")
    assert [a["name"] for a in root.attrs["multiscales"][0]["axes"]] == ["y", "x"]
    np.testing.assert_array_equal(root["0"][...], want)
    assert want.max() > 2


def test_the_voxel_size_of_an_ome_tiff_stack_is_kept_in_its_label_stack(tmp_path, stack_file,
                                                                        trained_cpnet_path):
    stack = stack_file[1]
    sized = tmp_path / "sized.ome.tif"
    tifffile.imwrite(sized, stack, ome=True, metadata={
        "axes": "ZCYX", "PhysicalSizeZ": 1.5, "PhysicalSizeY": 0.2, "PhysicalSizeX": 0.2,
        "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm", "PhysicalSizeZUnit": "µm"})
    out = tmp_path / "out"
    result = cli(["segment", str(sized), "--model", str(trained_cpnet_path), "--out", str(out),
                  "--stitch-threshold", "0.25", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(out / "sized_masks.tif") as tif:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert (pixels["PhysicalSizeZ"], pixels["PhysicalSizeY"], pixels["PhysicalSizeX"]) == (1.5, 0.2, 0.2)


def test_an_ome_zarr_volume_without_a_mode_is_refused_naming_the_modes(tmp_path, stack_file,
                                                                        trained_cpnet_path):
    volume = tmp_path / "vol.ome.zarr"
    write_ome_zarr_volume(volume, stack_file[1], (2.0, 0.5, 0.5))
    out = tmp_path / "out"
    result = cli(["segment", str(volume), "--model", str(trained_cpnet_path), "--out", str(out),
                  "--runtime", "torch"])
    assert result.exit_code == 1
    assert "has a Z axis" in result.output and "--stitch-threshold" in result.output
    assert "--do-3d" in result.output and "--planes" in result.output
    assert not (out / "vol_masks.tif").exists()


def test_save_flows_of_a_stitched_stack_are_each_plane_s_network_output(tmp_path, stack_file,
                                                                          trained_cpnet_path):
    from selfadapt_deploy.io.normalize import normalize_plane, stack_percentiles
    from selfadapt_deploy.segment import predict_flows

    path, stack = stack_file
    out = tmp_path / "out"
    result = cli(["segment", str(path), "--model", str(trained_cpnet_path), "--out", str(out),
                  "--stitch-threshold", "0.25", "--save-flows", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    with tifffile.TiffFile(out / "stack_flows.tif") as tif:
        flows, axes = tif.asarray(), tif.series[0].axes
    assert axes == "CZYX" and flows.shape == (3, 5, 128, 120)
    bounds = stack_percentiles(stack)
    with TorchRunner(load_model(trained_cpnet_path)) as runner:
        for k in (0, 4):  # the stack's normalisation, each plane through the network alone
            output, _ = predict_flows(runner, normalize_plane(stack[k], bounds), SegmentParams())
            np.testing.assert_allclose(flows[:, k], output, atol=1e-5)
    assert tifffile.imread(out / "stack_masks.tif").max() > 5


def test_segment_planes_writes_one_image_per_plane(tmp_path, stack_file, trained_cpnet_path):
    path = stack_file[0]
    out = tmp_path / "out"
    result = cli(["segment", str(path), "--model", str(trained_cpnet_path), "--out", str(out),
                  "--planes", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*_masks.tif")) == [f"stack_z{k:03d}_masks.tif" for k in range(5)]
    assert tifffile.imread(out / "stack_z002_masks.tif").ndim == 2


def test_a_stack_without_axes_needs_z_axis(tmp_path, stack_file, trained_cpnet_path):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, stack_file[1][:, 0])  # Z×Y×X, no axes recorded
    args = ["segment", str(plain), "--model", str(trained_cpnet_path), "--runtime", "torch"]
    refused = cli([*args, "--out", str(tmp_path / "a"), "--stitch-threshold", "0.25"])
    assert refused.exit_code == 1 and "--z-axis" in refused.output
    done = cli([*args, "--out", str(tmp_path / "b"), "--stitch-threshold", "0.25", "--z-axis", "0"])
    assert done.exit_code == 0, done.output
    assert tifffile.imread(tmp_path / "b" / "plain_masks.tif").shape == (5, 128, 120)


@pytest.mark.parametrize("extra, message", [
    (["--z-axis", "0"], "no stack mode"),
    (["--stitch-threshold", "0.3", "--planes"], "choose one"),
    (["--stitch-threshold", "1.5"], "stitch-threshold must be"),
    (["--do-3d", "--planes"], "choose one"),
    (["--anisotropy", "2"], "apply to --do-3d"),
    (["--do-3d", "--anisotropy", "0"], "anisotropy must be > 0"),
    (["--do-3d", "--flow3d-smooth", "1,2"], "one sigma or three"),
    (["--do-3d", "--flow3d-smooth", "a"], "numbers separated by commas"),
])
def test_stack_options_that_do_not_fit_are_one_error(tmp_path, stack_file, trained_cpnet_path, extra,
                                                    message):
    out = tmp_path / "out"
    result = cli(["segment", str(stack_file[0]), "--model", str(trained_cpnet_path), "--out", str(out),
                  *extra])
    assert result.exit_code == 1 and message in result.output
    assert not out.exists() or not list(out.iterdir())


def cli(args: list[str]):
    from typer.testing import CliRunner

    from selfadapt_deploy.cli import app

    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("axes, layout", [("ZCYX", (0, 1, 2, 3)), ("CZYX", (1, 0, 2, 3))])
@pytest.mark.parametrize("how", ["ome", "imagej"])
def test_the_z_axis_is_read_from_ome_or_imagej_metadata(tmp_path, axes, layout, how):
    from selfadapt_deploy.errors import ImageReadError
    from selfadapt_deploy.io.readers import has_z_axis, read_images

    stack = np.random.default_rng(0).integers(0, 999, (4, 2, 30, 40)).astype(np.uint16)
    path = tmp_path / "s.ome.tif"
    if how == "imagej":
        if axes != "ZCYX":
            pytest.skip("ImageJ hyperstacks are always TZCYXS")
        tifffile.imwrite(path, stack, imagej=True, metadata={"axes": axes})
    else:
        tifffile.imwrite(path, stack.transpose(layout), metadata={"axes": axes}, ome=True)
    assert has_z_axis(path)
    with pytest.raises(ImageReadError, match="Z axis of 4 planes"):
        read_images(path)
    (volume,) = read_images(path, stack="volume")
    np.testing.assert_array_equal(volume.data, stack)
    planes = read_images(path, stack="planes")
    assert [p.name for p in planes] == [f"s_z{k:03d}" for k in range(4)]
    np.testing.assert_array_equal(planes[2].data, stack[2])


def test_segmenter_segment_stack_is_the_command_lines_stitching(stack_file, trained_cpnet_path):
    from selfadapt_deploy.api import Segmenter

    _, stack = stack_file
    with Segmenter(trained_cpnet_path, runtime="torch", device="cpu") as seg:
        grey = seg.segment_stack(stack[:, 0], 0.25)  # Z×Y×X: the second channel zero-padded
        moved = seg.segment_stack(np.moveaxis(stack, 0, 2), 0.25, z_axis=2, channel_axis=0)
    with TorchRunner(load_model(trained_cpnet_path)) as runner:
        expected = segment_stitched(runner, stack, SegmentParams(), 0.25)
    np.testing.assert_array_equal(grey, expected)
    np.testing.assert_array_equal(moved, expected)


def test_a_stack_that_would_not_fit_is_refused_before_any_work(tmp_path, stack_file, trained_cpnet_path,
                                                              monkeypatch):
    from selfadapt_deploy.wsi import memory

    monkeypatch.setattr(memory, "available_memory", lambda *a, **k: 2**20)  # 1 MiB
    out = tmp_path / "out"
    result = cli(["segment", str(stack_file[0]), "--model", str(trained_cpnet_path), "--out", str(out),
                  "--stitch-threshold", "0.25", "--runtime", "torch"])
    assert result.exit_code == 1
    assert "5-plane 128×120 stack needs about" in result.output and "--planes" in result.output
    assert not out.exists() or not list(out.glob("*.tif"))
    need = memory.stitched_stack_bytes(5, 128, 120, stack_file[1].nbytes, 2, 1.0)
    assert stack_file[1].nbytes + 5 * 128 * 120 * 8 < need < 64 * 2**20


def test_evaluate_scores_label_stacks_by_3d_iou_as_cellpose(tmp_path):
    from cellpose.metrics import average_precision as cellpose_ap

    truth = random_volume_labels((8, 64, 64), 25, radius=(6, 10), seed=5).astype(np.uint16)
    pred = stitch_planes(plane_labels(9, z=8, shape=(64, 64)), 0.25).astype(np.uint16)
    pred[truth > 0] = np.where(pred[truth > 0] == 0, truth[truth > 0] + 1000, pred[truth > 0])
    tifffile.imwrite(tmp_path / "gt.tif", truth)
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    result = cli(["evaluate", "--pred", str(tmp_path / "pred.tif"), "--gt", str(tmp_path / "gt.tif")])
    assert result.exit_code == 0, result.output
    from selfadapt_deploy.batch import evaluate_files

    (ours,) = evaluate_files([tmp_path / "pred.tif"], [tmp_path / "gt.tif"])
    ap, tp, fp, fn = cellpose_ap([truth], [pred], threshold=list(ours.thresholds))
    assert list(ours.fp) == list(fp[0]) and list(ours.fn) == list(fn[0])
    np.testing.assert_allclose(ours.ap, ap[0])
    assert list(ours.tp) == list(tp[0]) and ours.tp[0] > 0


# ---- do_3D: the network on YX, ZX and ZY planes, 3-D flows → masks -----------------------------------
def synthetic_flows_3d(shape=(20, 80, 90), seed=1):
    """(flows 3×Z×Y×X in network units, cellprob logits) pointing to the centres of generated cells."""
    labels = random_volume_labels(shape, 25, radius=(8, 12), seed=seed)
    dist = ndimage.gaussian_filter(ndimage.distance_transform_edt(labels > 0), 1.0)
    grad = np.stack(np.gradient(dist))
    rng = np.random.default_rng(seed)
    flows = 5 * grad / (np.linalg.norm(grad, axis=0) + 1e-6) + rng.normal(0, 0.5, grad.shape)
    cellprob = np.where(labels > 0, 3.0, -3.0) + rng.normal(0, 1.5, shape)
    return flows.astype(np.float32), cellprob.astype(np.float32)


@pytest.mark.parametrize("min_size, integrator", [(0, "numba"), (15, "numba"), (15, "torch")])
def test_3d_flows_to_masks_equals_cellpose_compute_masks(min_size, integrator):
    from cellpose.dynamics import resize_and_compute_masks

    from selfadapt_deploy.postprocess import MaskParams
    from selfadapt_deploy.postprocess.volume_masks import flows_to_masks_3d

    flows, cellprob = synthetic_flows_3d()
    reference = resize_and_compute_masks(flows, cellprob, niter=150, cellprob_threshold=0.0,
                                         do_3D=True, min_size=min_size, max_size_fraction=0.4)
    ours = flows_to_masks_3d(flows, cellprob, MaskParams(niter=150, min_size=min_size,
                                                         integrator=integrator))
    assert reference.max() > 10
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("shape", [(7, 13, 19), (16, 40, 33)])
def test_the_3d_numba_integrator_is_bit_identical_to_torch_grid_sample(shape):
    """Random flows (points wander everywhere, clamped at every face): every final position is
    the same float32 as the torch reference's, not merely close."""
    from selfadapt_deploy.postprocess.volume_masks import follow_flows_3d

    rng = np.random.default_rng(sum(shape))
    flows = (rng.normal(size=(3, *shape)) * 4).astype(np.float32)
    cellprob = rng.normal(size=shape).astype(np.float32)
    inds_t, torch_pos = follow_flows_3d(flows, cellprob, 0.0, 120, "torch")
    inds_n, numba_pos = follow_flows_3d(flows, cellprob, 0.0, 120, "numba")
    assert all(np.array_equal(a, b) for a, b in zip(inds_t, inds_n, strict=True))
    assert torch_pos.shape[1] > 500 and torch.equal(torch_pos, numba_pos)
    for k, n in enumerate(shape):  # some points reached each face
        assert (torch_pos[k] == 0).any() and (torch_pos[k] == n - 1).any()


def test_the_3d_integrator_follows_the_2d_rules_and_refuses_triton_without_cuda():
    from selfadapt_deploy.postprocess.volume_masks import follow_flows_3d

    flows, cellprob = synthetic_flows_3d((6, 20, 20))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(SaDeployError, match="triton needs a CUDA device"):
            follow_flows_3d(flows, cellprob, 0.0, 5, "triton")
    with pytest.raises(SaDeployError, match="numba runs on the CPU"):
        follow_flows_3d(flows, cellprob, 0.0, 5, "numba", "cuda")


_TRITON_3D_SCRIPT = """
import sys, numpy as np
from selfadapt_deploy.postprocess import MaskParams
from selfadapt_deploy.postprocess.volume_masks import flows_to_masks_3d, follow_flows_3d
d = np.load(sys.argv[1])
_, positions = follow_flows_3d(d["flows"], d["cellprob"], 0.0, 150, "triton")
masks = flows_to_masks_3d(d["flows"], d["cellprob"], MaskParams(niter=150, integrator="triton"))
np.savez(sys.argv[2], positions=positions.numpy(), masks=masks)
"""


@needs_triton
def test_the_3d_triton_kernel_under_the_interpreter_equals_the_reference_bit_for_bit(tmp_path):
    """The fused 3-D kernel, run by Triton's CPU interpreter (numpy float32, no FMAs, no merging),
    walks every voxel to the torch reference's float32 position exactly, and its masks are
    cellpose's. On a GPU the same kernel is held to the statistical criterion (below)."""
    from cellpose.dynamics import resize_and_compute_masks

    from selfadapt_deploy.postprocess.volume_masks import follow_flows_3d

    flows, cellprob = synthetic_flows_3d((12, 48, 52))
    got = under_triton_interpreter(_TRITON_3D_SCRIPT, tmp_path, flows=flows, cellprob=cellprob)
    _, ref = follow_flows_3d(flows, cellprob, 0.0, 150, "torch")
    assert ref.shape[1] > 1000
    np.testing.assert_array_equal(got["positions"], ref.numpy())
    reference = resize_and_compute_masks(flows, cellprob, niter=150, cellprob_threshold=0.0,
                                         do_3D=True, min_size=15, max_size_fraction=0.4)
    assert reference.max() >= 5
    np.testing.assert_array_equal(got["masks"], reference)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["triton", "torch"])
def test_3d_flows_to_masks_on_cuda_agree_with_the_cpu_reference(method):
    """3-D flow following on the GPU (the fused Triton kernel; torch's grid_sample, cellpose's
    GPU path) against the CPU reference (= cellpose on the CPU, bit for bit), with the criterion
    the method guarantees (../shared/GPU_FACTS.md), and the masks assembled on the GPU."""
    from selfadapt_deploy.postprocess import MaskParams
    from selfadapt_deploy.postprocess.volume_masks import flows_to_masks_3d, follow_flows_3d

    flows, cellprob = synthetic_flows_3d((24, 96, 100), seed=3)
    ref_inds, ref = follow_flows_3d(flows, cellprob, 0.0, 200, "numba")
    inds, got = follow_flows_3d(flows, cellprob, 0.0, 200, method, "cuda")
    assert got.device.type == "cuda"
    assert all(torch.equal(a, b.cpu()) for a, b in zip(ref_inds, inds, strict=True))
    assert_positions_agree(got, ref)
    cpu = flows_to_masks_3d(flows, cellprob, MaskParams(integrator="numba"))
    gpu = flows_to_masks_3d(flows, cellprob, MaskParams(integrator=method), "cuda")
    assert cpu.max() >= 10
    assert average_precision(cpu, gpu).ap[0] >= 0.99


def cellpose_3d(net, stack_zcyx, params: SegmentParams, anisotropy: float, smooth=0):
    diameter = 30.0 * (params.diameter or net.default_diameter) / net.diam_mean
    masks, flows, _ = cellpose4_model(net).eval(
        stack_zcyx.transpose(0, 2, 3, 1).copy(), channel_axis=-1, z_axis=0, do_3D=True,
        anisotropy=anisotropy, flow3D_smooth=smooth, diameter=diameter, bsize=net.tile_size,
        cellprob_threshold=params.cellprob_threshold, min_size=params.min_size)
    return masks, flows[1], flows[2]


@pytest.mark.parametrize("params, anisotropy, smooth", [
    (SegmentParams(cellprob_threshold=-0.5, min_size=0), 2.0, 0),  # Z resized ×2, hundreds of masks
    (SegmentParams(diameter=40.0, cellprob_threshold=-0.5), 1.0, 1.0),  # rescaled, smoothed
])
def test_do_3d_equals_cellpose_eval(tiny_cpsam, params, anisotropy, smooth):
    from selfadapt_deploy.volume import segment_3d

    labels = random_volume_labels((10, 60, 70), 12, radius=(8, 12), anisotropy=2.0, seed=4)
    gray = render_volume(labels, seed=4)
    stack = np.stack([gray, 0.5 * gray, np.zeros_like(gray)], axis=1)
    with TorchRunner(tiny_cpsam) as runner:
        ours, output = segment_3d(runner, stack, params, anisotropy, (smooth,) * 3)
    masks, dP, cellprob = cellpose_3d(tiny_cpsam, stack, params, anisotropy, smooth)
    np.testing.assert_allclose(output[:3], dP, atol=1e-5, rtol=0)
    np.testing.assert_allclose(output[3], cellprob, atol=1e-5, rtol=0)
    assert masks.max() > 50
    np.testing.assert_array_equal(ours, masks)


def test_segment_do_3d_writes_the_library_s_masks_and_flows(tmp_path, tiny_cpsam):
    from selfadapt_deploy.volume import segment_3d

    labels = random_volume_labels((8, 48, 56), 10, radius=(8, 12), anisotropy=2.0, seed=6)
    gray = (render_volume(labels, seed=6) * 1000).astype(np.uint16)
    path = tmp_path / "v.ome.tif"
    tifffile.imwrite(path, gray, metadata={"axes": "ZYX"}, ome=True)
    weights = tmp_path / "cpsam.pt"
    tiny_cpsam.save(weights)
    out = tmp_path / "out"
    result = cli(["segment", str(path), "--model", str(weights), "--out", str(out), "--do-3d",
                  "--anisotropy", "2", "--flow3d-smooth", "1,0.5,0.5", "--cellprob-threshold", "-0.5",
                  "--save-flows", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    with TorchRunner(tiny_cpsam) as runner:
        expected, output = segment_3d(runner, gray[:, None], SegmentParams(cellprob_threshold=-0.5),
                                      2.0, (1.0, 0.5, 0.5))  # Z×1×Y×X: the file's one channel
    with tifffile.TiffFile(out / "v_masks.tif") as tif:
        assert tif.series[0].axes == "ZYX"
        np.testing.assert_array_equal(tif.asarray(), expected)
    flows = tifffile.imread(out / "v_flows.tif")
    assert flows.shape == (4, 8, 48, 56)
    np.testing.assert_allclose(flows, output, atol=1e-6)
    assert expected.max() > 0


def test_segmenter_segment_stack_in_3d(tiny_cpsam, tmp_path):
    from selfadapt_deploy.api import Segmenter
    from selfadapt_deploy.volume import segment_3d

    labels = random_volume_labels((6, 40, 44), 8, radius=(7, 10), seed=8)
    gray = render_volume(labels, seed=8)
    weights = tmp_path / "cpsam.pt"
    tiny_cpsam.save(weights)
    with Segmenter(weights, runtime="torch", device="cpu", cellprob_threshold=-0.5) as seg:
        ours = seg.segment_stack(gray, do_3d=True, anisotropy=1.5)
        with pytest.raises(SaDeployError, match="needs a mode"):
            seg.segment_stack(gray)
    with TorchRunner(tiny_cpsam) as runner:
        expected, _ = segment_3d(runner, gray[:, None], SegmentParams(cellprob_threshold=-0.5), 1.5)
    np.testing.assert_array_equal(ours, expected)


# ---- adaptation on volumes: a 2-D network trained on a stack's YX, ZX and ZY planes --------------
def test_orthogonal_planes_are_the_stack_s_planes_after_the_z_resize():
    from selfadapt_deploy.volume import resize_volume

    stack = np.random.default_rng(0).random((6, 2, 30, 36)).astype(np.float32)
    planes = orthogonal_planes(stack, 2.0)
    yx, rest = planes[:6], planes[6:]
    np.testing.assert_array_equal(np.stack(yx), stack)
    resized = resize_volume(stack, (12, 30, 36))
    zx = [p for p in rest if p.shape == (2, 12, 36)]
    zy = [p for p in rest if p.shape == (2, 12, 30)]
    assert len(zx) == len(range(0, 30, 5)) and len(zy) == len(range(0, 36, 6))  # about Z planes each
    np.testing.assert_array_equal(zx[1], resized[:, :, 5].transpose(1, 0, 2))
    np.testing.assert_array_equal(zy[2], resized[:, :, :, 12].transpose(1, 0, 2))


def test_held_out_stacks_score_candidates_in_3d_and_images_in_2d(tmp_path, stack_file, trained_cpnet_path):
    """A run on volumes judges its candidates on what it will be used for: a held-out stack is
    segmented in do_3D mode at the run's anisotropy and flow smoothing (masks and 4×Z×Y×X outputs,
    as ``segment_stack(do_3d=True, flow3d_smooth=…)``), a 2-D image as before; the dropout signal
    and the pool's consensus work on both."""
    from selfadapt_deploy.api import Segmenter
    from selfadapt_deploy.postprocess.volume_masks import flows_to_masks_3d
    from selfadapt_deploy.trainer.candidates import consensus_params
    from selfadapt_deploy.trainer.pool import PredictionPool
    from selfadapt_deploy.trainer.validation import Validation, embed, evaluate_drift

    stack = stack_file[1][:, :, :80, :80].astype(np.float32)  # a crop: a few cells keep it quick
    image = stack[2]  # one plane as a 2-D image (C×Y×X)
    net = load_model(trained_cpnet_path, torch.device("cpu"))
    rescale = net.diam_mean / net.default_diameter
    val = Validation.from_images([stack, image], rescale, net.tile_size, None, anisotropy=2.0,
                                 smooth=(1.0, 1.0, 1.0))
    assert len(val.tiles) == len(orthogonal_planes(stack, 2.0)) + 1  # embeddings: one tile per plane
    val.reference_masks = [seg.masks for seg in val.segment(net)]
    val.reference_embedding = embed(net, val.tiles)
    row, segs = evaluate_drift(net, val, dropout=True)

    segmenter = Segmenter(trained_cpnet_path, runtime="torch", device="cpu")  # the run's own runtime
    expected_3d = segmenter.segment_stack(stack, do_3d=True, anisotropy=2.0, flow3d_smooth=(1.0,),
                                          channel_axis=1)
    assert segs[0].output.shape == (4, *expected_3d.shape) and expected_3d.max() >= 3
    np.testing.assert_array_equal(segs[0].masks, expected_3d)
    unsmoothed = segmenter.segment_stack(stack, do_3d=True, anisotropy=2.0, channel_axis=1)
    assert not np.array_equal(unsmoothed, expected_3d)  # the smoothing is what makes them equal
    np.testing.assert_array_equal(segs[1].masks, segmenter.segment(image, channel_axis=0))
    assert row["fn_rate"] == 0.0 and 0.0 <= row["dropout_err"] <= 1.0
    assert np.isfinite(row["flow_err"])  # from the 2-D image: cellpose has no flow check in 3-D

    pool = PredictionPool(tmp_path / "pool", 2)
    pool.add("a", segs)
    params = consensus_params(val.params, net)
    stored = pool.output("a", 0)
    np.testing.assert_array_equal(pool.consensus_masks({"a": 1.0}, 0, params),
                                  flows_to_masks_3d(stored[:3], stored[3], params))


def test_adapt_refuses_a_held_out_stack_that_would_not_fit_in_3d_before_training(
        tmp_path, stack_file, trained_cpnet_path, monkeypatch):
    """Held-out stacks are segmented in 3-D at every evaluation: one that would not fit is refused
    before any training, naming the stack, with adapt's own advice, and the run directory stays empty."""
    from selfadapt_deploy import api
    from selfadapt_deploy.trainer.loop import AdaptConfig
    from selfadapt_deploy.trainer.run import RunInputs
    from selfadapt_deploy.wsi import memory

    monkeypatch.setattr(memory, "available_memory", lambda *a, **k: 2**20)  # 1 MiB
    out = tmp_path / "run"
    with pytest.raises(SaDeployError, match="5-plane 128×120 stack needs about") as err:
        api.adapt([stack_file[0]], trained_cpnet_path, out, val=[stack_file[0]], anisotropy=2.0,
                  iterations=2, device="cpu", report=lambda _: None)
    assert str(stack_file[0]) in str(err.value) and "--val" in str(err.value)
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.setattr(memory, "available_memory", lambda *a, **k: 2**30)  # it fits: no refusal
    spec = load_model(trained_cpnet_path, torch.device("cpu")).spec
    api.check_held_out_stacks_fit(RunInputs(images=[stack_file[0]], model=trained_cpnet_path,
                                            config=AdaptConfig(), anisotropy=2.0), spec)


def test_adapt_runs_on_a_z_stack_and_resumes_with_its_axes(tmp_path, stack_file, trained_cpnet_path):
    from selfadapt_deploy import api
    from selfadapt_deploy.trainer.averaging import batchnorms
    from selfadapt_deploy.trainer.config import stack_train_tile
    from selfadapt_deploy.trainer.run import RunInputs

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, stack_file[1][:, 0])  # Z×Y×X without axes: --z-axis says which
    out = tmp_path / "run"
    said: list[str] = []
    summary = api.adapt([plain], trained_cpnet_path, out, z_axis=0, anisotropy=2.0, flow3d_smooth=[1],
                        iterations=2, batch_size=2, eval_every=2, stop="none", select="last",
                        device="cpu", report=said.append)
    assert summary["iterations_run"] == 2 and (out / "model.pt").is_file()
    # no --train-tile: the stack's default, a tile its 10-row ZX/ZY planes fill a third of
    net = load_model(trained_cpnet_path, torch.device("cpu"))
    tile = stack_train_tile([(5, 128, 120)], 2.0, net.diam_mean / net.default_diameter, net.tile_size,
                            net.diam_mean)
    assert tile < net.tile_size and summary["config"]["train_tile"] == tile
    assert f"tiles {tile}×{tile}" in said[0]
    # trained on stack planes, BatchNorm running statistics stay θ0's (auto → keep)
    assert summary["config"]["batchnorm_stats"] == "keep"

    def batchnorm_buffers(net):
        return [t for m in batchnorms(net) for t in (m.running_mean, m.running_var)]

    deployed, source = (load_model(p, torch.device("cpu")) for p in (out / "model.pt", trained_cpnet_path))
    assert all(torch.equal(a, b) for a, b in zip(batchnorm_buffers(deployed), batchnorm_buffers(source),
                                                 strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(deployed.parameters(), source.parameters(), strict=True))
    inputs = RunInputs.load(out)
    assert (inputs.z_axis, inputs.anisotropy, inputs.flow3d_smooth) == (0, 2.0, (1.0, 1.0, 1.0))
    with pytest.raises(SaDeployError, match="--flow3d-smooth takes one sigma or three"):
        api.adapt([plain], trained_cpnet_path, tmp_path / "run3", z_axis=0, flow3d_smooth=[1, 2],
                  device="cpu", report=lambda _: None)
    assert not (tmp_path / "run3").exists()
    with pytest.raises(SaDeployError, match="--z-axis"):
        api.adapt([plain], trained_cpnet_path, tmp_path / "run2", iterations=2, device="cpu",
                  report=lambda _: None)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, stack_file[1][0, 0])  # one Y×X plane: no stack among the images
    with pytest.raises(SaDeployError, match="--anisotropy and --flow3d-smooth apply to Z-stacks"):
        api.adapt([flat], trained_cpnet_path, tmp_path / "run4", anisotropy=2.0, device="cpu",
                  report=lambda _: None)
    assert not (tmp_path / "run4").exists()
