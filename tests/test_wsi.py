"""Whole-slide streaming: streamed labels against whole-image segmentation, stitching, halo
checks, resume, OME-Zarr / BigTIFF output, bad input, bounded memory, dask workers."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from selfadapt_deploy.errors import ImageReadError, OutputWriteError, SaDeployError
from selfadapt_deploy.io.normalize import DOWNSAMPLE_ABOVE, normalize_image
from selfadapt_deploy.metrics import average_precision
from selfadapt_deploy.models import load_model
from selfadapt_deploy.runtime import TorchRunner
from selfadapt_deploy.segment import SegmentParams, segment_image
from selfadapt_deploy.synthetic import random_labels, render
from selfadapt_deploy.wsi import StreamSettings, segment_slide
from selfadapt_deploy.wsi.plan import block_grid, default_halo
from selfadapt_deploy.wsi.slide import open_slide, split_inputs
from selfadapt_deploy.wsi.stitch import matching_labels
from selfadapt_deploy.wsi.stream import WORK_SUFFIX, network_channels, slide_normalisation

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = StreamSettings(block_size=256)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 700×900 tiled TIFF of ~900 cells (3 × 4 blocks of 256) and its pixels."""
    labels = random_labels((700, 900), 900, radius=(6, 9), seed=3)
    img = (render(labels, seed=3) * 1000).astype(np.uint16)
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    tifffile.imwrite(path, img, tile=(256, 256), compression="zlib")
    return path, img


@pytest.fixture(scope="module")
def runner(request):
    path = ROOT / "tests" / "fixtures" / "cellpose3" / "tiny_cyto.pth"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    with TorchRunner(load_model(path)) as r:
        yield r


@pytest.fixture(scope="module")
def whole(slide, runner) -> np.ndarray:
    _, img = slide
    return segment_image(runner, np.stack([img, np.zeros_like(img)]), SegmentParams()).masks


def streamed(path: Path, out: Path, runner, settings=SETTINGS, **kw) -> tuple[np.ndarray, dict]:
    summary = segment_slide(path, runner, out, SegmentParams(), settings, channels=[0], **kw)
    return tifffile.imread(out / "slide_masks.tif"), summary


def test_streamed_labels_equal_whole_image_segmentation(tmp_path, slide, runner, whole):
    path, _ = slide
    labels, summary = streamed(path, tmp_path, runner)
    assert summary["blocks"]["total"] == 12 and summary["cut_objects"] == 0
    assert labels.dtype == np.uint32 and whole.max() > 600
    assert average_precision(whole, labels).ap[0] >= 0.99
    assert average_precision(labels, whole).ap[0] >= 0.99
    # no duplicates, no cuts: every label is one connected piece, numbered 1..N
    np.testing.assert_array_equal(np.unique(labels)[1:], np.arange(1, labels.max() + 1))
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        assert ndimage.label(labels[box] == k)[1] == 1
    # cells crossing a block border (of the whole-image segmentation) are one streamed object each
    crossing = np.unique(np.concatenate([whole[:, 255:257].ravel(), whole[255:257].ravel(),
                                         whole[:, 511:513].ravel(), whole[511:513].ravel()]))[1:]
    assert len(crossing) > 50
    for cell in crossing:
        hits, counts = np.unique(labels[whole == cell], return_counts=True)
        assert counts[hits > 0].max() >= 0.9 * (whole == cell).sum()  # one label holds the cell
    assert not list(tmp_path.glob(f"*{WORK_SUFFIX}"))  # the work directory is gone
    saved = json.loads((tmp_path / "slide_summary.json").read_text())
    assert saved["objects"] == labels.max() and saved["peak_rss_bytes"] > 0


def test_a_too_small_halo_is_reported(tmp_path, slide, runner, whole):
    _, summary = streamed(slide[0], tmp_path, runner, replace(SETTINGS, halo=4))
    assert summary["cut_objects"] > 10
    assert "larger --halo" in summary["warnings"][0]


def test_interrupted_slide_resumes_from_its_finished_blocks(tmp_path, slide, runner):
    reference, _ = streamed(slide[0], tmp_path / "ref", runner)

    def kill_after_five(done, total, result):
        if done == 5:
            raise KeyboardInterrupt  # as a kill between blocks: five markers on disk

    with pytest.raises(KeyboardInterrupt):
        streamed(slide[0], tmp_path / "run", runner, progress=kill_after_five)
    assert not (tmp_path / "run" / "slide_masks.tif").exists()
    assert len(list((tmp_path / "run" / f"slide{WORK_SUFFIX}" / "blocks").glob("*.npz"))) == 5
    with pytest.raises(SaDeployError, match="pass --resume to continue it or --overwrite"):
        streamed(slide[0], tmp_path / "run", runner)
    with pytest.raises(SaDeployError, match="other block_size"):
        streamed(slide[0], tmp_path / "run", runner, replace(SETTINGS, block_size=512, resume=True))
    labels, summary = streamed(slide[0], tmp_path / "run", runner, replace(SETTINGS, resume=True))
    assert summary["blocks"]["resumed"] == 5 and summary["blocks"]["computed"] == 7
    np.testing.assert_array_equal(labels, reference)


def test_ome_zarr_output_reads_back_with_zarr(tmp_path, slide, runner):
    import zarr

    tiff, _ = streamed(slide[0], tmp_path / "tiff", runner)
    segment_slide(slide[0], runner, tmp_path / "zarr", SegmentParams(),
                  replace(SETTINGS, out_format="zarr"), channels=[0])
    group = zarr.open_group(str(tmp_path / "zarr" / "slide_masks.ome.zarr"), mode="r")
    multiscales = group.attrs["multiscales"][0]
    assert multiscales["version"] == "0.4" and [a["name"] for a in multiscales["axes"]] == ["y", "x"]
    paths = [d["path"] for d in multiscales["datasets"]]
    np.testing.assert_array_equal(np.asarray(group[paths[0]]), tiff)
    np.testing.assert_array_equal(np.asarray(group[paths[1]]), tiff[::2, ::2])
    assert group[paths[-1]].shape[0] <= 256


def test_slide_percentiles_equal_the_whole_image_normalisation(tmp_path):
    """A slide above 224³ pixels: cellpose's strided subsample, read in bands, same numbers."""
    img = np.random.default_rng(0).gamma(2.0, 50.0, (2, 3400, 3400)).astype(np.uint16)
    assert img[0].size > DOWNSAMPLE_ABOVE
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img, tile=(256, 256), metadata={"axes": "CYX"})
    slide = open_slide(path)
    from selfadapt_deploy.models.base import ModelSpec

    spec = ModelSpec(nchan=2, tile_size=224, fixed_tile=False, diam_mean=17, default_diameter=17)
    lo, hi, flat = slide_normalisation(slide, None, spec)
    ref = normalize_image(img)
    region = slide.read(1000, 1300, 2000, 2600)
    np.testing.assert_array_equal(network_channels(region, None, spec, "x").shape, (2, 300, 600))
    got = (region[0].astype(np.float32) - np.float32(lo[0])) / (np.float32(hi[0]) - np.float32(lo[0]))
    np.testing.assert_array_equal(got, ref[0, 1000:1300, 2000:2600])
    assert flat == [False, False]
    slide.close()


def test_block_grid_and_halo():
    blocks = block_grid(700, 900, 256, 32)
    assert len(blocks) == 12 and blocks[-1].y1 == 700 and blocks[-1].x1 == 900
    assert (blocks[5].ry0, blocks[5].ry1) == (256 - 32, 512 + 32)
    assert default_halo(15.4) == 32 and default_halo(30) == 64
    with pytest.raises(SaDeployError, match="multiple of 256"):
        block_grid(700, 900, 300, 32)


def test_matching_labels_by_iou_on_a_strip():
    a = np.zeros((4, 10), np.uint32)
    b = np.zeros((4, 10), np.uint32)
    a[:, 0:4], b[:, 0:4] = 1, 7  # the same cell
    a[:, 6:8], b[:, 7:10] = 2, 8  # IoU 1/4: not the same
    assert matching_labels(a, b) == [(1, 7)]


def test_bad_slides_are_one_clear_error(tmp_path, slide, runner):
    with pytest.raises(ImageReadError, match="--series 2 does not exist"):
        open_slide(slide[0], series=2)
    data = slide[0].read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        segment_slide(truncated, runner, tmp_path / "out", SegmentParams(), SETTINGS, channels=[0])
    assert not list((tmp_path / "out").glob("*_masks.tif"))


def test_a_full_disk_leaves_no_output_and_the_run_resumable(tmp_path, slide, runner, monkeypatch):
    import errno

    import selfadapt_deploy.wsi.output as output

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output.tifffile, "imwrite", full_disk)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        streamed(slide[0], tmp_path, runner)
    assert not list(tmp_path.glob("*_masks.tif")) and not list(tmp_path.glob(".*part"))
    monkeypatch.undo()
    _, summary = streamed(slide[0], tmp_path, runner, replace(SETTINGS, resume=True))
    assert summary["blocks"]["resumed"] == 12


def test_inputs_that_stream(tmp_path, slide):
    from selfadapt_deploy.wsi.memory import choose

    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((64, 64), np.uint16))
    zarr_dir = tmp_path / "image.ome.zarr"
    zarr_dir.mkdir()
    # the 700×900 slide needs more than half of 10 MB whole, the 64² image far less
    tight = lambda ly, lx: choose(ly, lx, 2, 1.0, available=10_000_000, block=512)  # noqa: E731
    in_memory, streamed, said = split_inputs([small, slide[0]], None, tight)
    assert (in_memory, streamed) == ([small], [(slide[0], None)])
    assert [p for p, _ in said] == [slide[0]] and "streamed block by block" in said[0][1].why
    assert split_inputs([small], None, lambda ly, lx: choose(ly, lx, 2, 1.0, "stream"))[:2] == (
        [], [(small, None)])
    assert split_inputs([slide[0]], None, lambda ly, lx: choose(ly, lx, 2, 1.0, "whole",
                                                                 available=10))[:2] == ([slide[0]], [])
    assert split_inputs([zarr_dir], None, tight)[:2] == ([], [(zarr_dir, None)])


def test_whole_or_streamed_on_both_sides_of_the_estimate():
    from selfadapt_deploy.wsi.memory import WHOLE_SHARE, choose, whole_image_bytes

    need = whole_image_bytes(8192, 8192, 2, 30 / 61)  # the slide at --diameter 61
    assert 2**30 < need < 8 * 2**30  # of the order measured (3.45 GiB peak RSS, model included)
    assert whole_image_bytes(8192, 8192, 2, 1.0) > need  # a larger scale needs more
    just_enough = int(need / WHOLE_SHARE) + 1
    assert not choose(8192, 8192, 2, 30 / 61, available=just_enough).stream
    too_little = choose(8192, 8192, 2, 30 / 61, available=just_enough - 2 * int(1 / WHOLE_SHARE))
    assert too_little.stream and "8192×8192, 4028×4028 at the network's scale" in too_little.why
    assert "--no-stream" in too_little.why
    assert not choose(8192, 8192, 2, 30 / 61, "whole", available=1).stream
    assert not choose(64, 64, 2, 1.0, available=2**40).say  # small and whole: nothing to say
    one_block = choose(96, 80, 2, 17000.0, available=2**30, block=2048)  # huge at the network's scale
    assert not one_block.stream and "fits in one 2048² block" in one_block.why
    assert choose(64, 64, 2, 1.0, "stream", available=2**40).stream


def test_available_memory_is_bounded_by_the_containers_cgroup(tmp_path):
    from selfadapt_deploy.wsi.memory import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25165824 kB\nMemAvailable:   20971520 kB\n")  # 20 GiB
    assert available_memory(tmp_path / "no-cgroup", meminfo) == 20 * 2**30
    (tmp_path / "memory.max").write_text("max\n")
    assert available_memory(tmp_path, meminfo) == 20 * 2**30  # no limit: the machine's
    (tmp_path / "memory.max").write_text(f"{3 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**30}\n")
    assert available_memory(tmp_path, meminfo) == 2 * 2**30  # the container's limit less its usage
    assert available_memory() > 0  # this machine


def test_segment_says_a_streaming_choice_and_no_stream_forces_whole(tmp_path, slide, monkeypatch):
    from typer.testing import CliRunner

    from selfadapt_deploy.cli import app
    from selfadapt_deploy.wsi import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 10_000_000)
    weights = ROOT / "tests" / "fixtures" / "cellpose3" / "tiny_cyto.pth"
    if not weights.is_file():
        pytest.skip(f"{weights} missing")
    base = ["segment", str(slide[0]), "--model", str(weights), "--device", "cpu", "--channels", "0",
            "--block-size", "512"]  # the 700×900 slide is larger than one block
    auto = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "auto")])
    assert auto.exit_code == 0, auto.output
    assert "slide.tif: streamed block by block: 700×900" in auto.output and "blocks" in auto.output
    forced = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "whole"), "--no-stream"])
    assert forced.exit_code == 0, forced.output
    assert "slide.tif: read whole although 700×900" in forced.output and "--no-stream" in forced.output
    assert "blocks" not in forced.output and "slide: done" in forced.output


_MEMORY_SCRIPT = """
import json, resource, sys
from pathlib import Path
from selfadapt_deploy.segment import SegmentParams
from selfadapt_deploy.synthetic import write_slide
from selfadapt_deploy.wsi import StreamSettings, segment_slide
from tests.helpers import NoNetworkRunner
out = Path(sys.argv[1])
write_slide(out / "warm.tif", 600, 600, patch=256)
write_slide(out / "big.tif", 6144, 6144, patch=512)
with NoNetworkRunner.make() as runner:
    settings = StreamSettings(block_size=512)
    segment_slide(out / "warm.tif", runner, out, SegmentParams(), settings, channels=[0])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = segment_slide(out / "big.tif", runner, out, SegmentParams(), settings, channels=[0])
print(json.dumps({"before": before, "after": summary["peak_rss_bytes"], "blocks": summary["blocks"]}))
"""


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_block_not_the_slide(tmp_path):
    """A 6144² slide (dense float32 flows: 453 MB) streamed in 512² blocks, in a fresh process:
    its peak memory grows by a small fraction of that over a warm-up slide's."""
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=True)
    m = json.loads(result.stdout.strip().splitlines()[-1])
    dense_flows = 3 * 6144 * 6144 * 4
    assert m["blocks"]["total"] == 144
    assert m["after"] - m["before"] < 0.2 * dense_flows, (m, dense_flows)


def test_dask_workers_give_the_single_process_labels(tmp_path, slide, runner):
    pytest.importorskip("distributed")
    reference, _ = streamed(slide[0], tmp_path / "one", runner)
    model = ROOT / "tests" / "fixtures" / "cellpose3" / "tiny_cyto.pth"
    args = dict(model=str(model), runtime="torch", device="cpu", precision="auto")
    labels, summary = streamed(slide[0], tmp_path / "dask", runner,
                               replace(SETTINGS, dask="local:2"), runner_args=args)
    assert summary["blocks"]["workers"] == "local:2"
    np.testing.assert_array_equal(labels, reference)


def test_segment_cli_streams_a_slide(tmp_path, slide):
    from typer.testing import CliRunner

    from selfadapt_deploy.cli import app

    model = ROOT / "tests" / "fixtures" / "cellpose3" / "tiny_cyto.pth"
    args = ["segment", str(slide[0]), "--model", str(model), "--out", str(tmp_path), "--device", "cpu",
            "--channels", "0", "--stream", "--block-size", "512"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "slide.tif: done" in result.output and (tmp_path / "slide_masks.tif").exists()
    again = CliRunner().invoke(app, args)
    assert "skipped" in again.output
    bad = CliRunner().invoke(app, [*args[:-2], "--out-format", "png"])
    assert bad.exit_code == 1 and "--out-format must be one of" in bad.output
    axis = CliRunner().invoke(app, [*args, "--channel-axis", "0", "--out", str(tmp_path / "axis")])
    assert axis.exit_code == 1 and "--channel-axis applies to images read whole" in axis.output
    assert not (tmp_path / "axis").exists()  # refused loudly, before any work — never ignored


def test_worker_plugin_opens_the_runner_once_on_the_workers_device(monkeypatch, tmp_path):
    """One open_runner call per worker, with "auto" resolved on the worker (its own device), and
    one opened slide per (file, series) however many blocks read it."""
    import tifffile

    import selfadapt_deploy.runner_choice as select
    import selfadapt_deploy.wsi.slide as slide_module
    from selfadapt_deploy.runtime import resolve_device
    from selfadapt_deploy.wsi.distributed import RunnerPlugin

    opened, slides = [], []
    real_open, real_slide = select.open_runner, slide_module.open_slide
    monkeypatch.setattr(select, "open_runner", lambda **kw: opened.append(kw) or real_open(**kw))
    monkeypatch.setattr(slide_module, "open_slide",
                        lambda *a: slides.append(a) or real_slide(*a))
    model = ROOT / "tests" / "fixtures" / "cellpose3" / "tiny_cyto.pth"
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((64, 64), np.uint16))
    plugin = RunnerPlugin(dict(model=str(model), runtime="auto", device="auto", precision="auto"))
    plugin.setup()
    try:
        assert len(opened) == 1 and opened[0]["device"] == resolve_device("auto")
        assert plugin.runner.is_active and plugin.runner.device == resolve_device("auto")
        for _ in range(3):
            assert plugin.slide(str(tmp_path / "s.tif"), None) is plugin.slide(str(tmp_path / "s.tif"), None)
        assert len(slides) == 1 and len(opened) == 1
    finally:
        plugin.teardown()
    assert not plugin.runner.is_active


def test_memory_messages_say_mib_under_a_gib():
    from selfadapt_deploy.wsi.memory import gib

    assert (gib(5 * 2**20), gib(3 * 2**30), gib(2**30)) == ("5 MiB", "3.0 GiB", "1.0 GiB")
