"""Readers (TIFF / OME-TIFF multi-series, channels), channel selection and atomic writers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from selfadapt_deploy.errors import ImageReadError, OutputWriteError
from selfadapt_deploy.io import read_images, select_channels, write_masks
from selfadapt_deploy.io.readers import read_network_images
from selfadapt_deploy.io.writers import atomic_path, label_dtype


def test_real_multiseries_ome_tiff(data_dir):
    path = data_dir / "cdp2bioactives_h15.ome.tif"
    images = read_images(path)
    assert [im.name for im in images] == [f"cdp2bioactives_h15_s{i}" for i in range(6)]
    assert all(im.data.shape == (5, 520, 696) and im.data.dtype == np.uint16 for im in images)
    one = read_images(path, series=3)
    assert len(one) == 1 and one[0].name == "cdp2bioactives_h15"
    np.testing.assert_array_equal(one[0].data, images[3].data)
    with pytest.raises(ImageReadError, match="--series 9 does not exist"):
        read_images(path, series=9)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_plain_tiff_layouts(tmp_path, dtype):
    yx = (np.arange(30 * 40).reshape(30, 40) % 251).astype(dtype)
    tifffile.imwrite(tmp_path / "gray.tif", yx)
    assert read_images(tmp_path / "gray.tif")[0].data.shape == (1, 30, 40)
    yxc = np.stack([yx, yx + 1], axis=-1)
    tifffile.imwrite(tmp_path / "last.tif", yxc)
    data = read_images(tmp_path / "last.tif")[0].data
    assert data.shape == (2, 30, 40) and (data[1] == yx + 1).all()
    tifffile.imwrite(tmp_path / "explicit.tif", np.moveaxis(yxc, -1, 0)[None])  # 1×C×Y×X
    assert read_images(tmp_path / "explicit.tif", channel_axis=1)[0].data.shape == (2, 30, 40)


def test_a_guessed_channel_axis_is_said_and_a_marked_one_is_not(tmp_path, trained_cpnet_path):
    from typer.testing import CliRunner

    from selfadapt_deploy.cli import app

    planes = (np.arange(2 * 40 * 48).reshape(2, 40, 48) % 251).astype(np.uint8)
    tifffile.imwrite(tmp_path / "bare.tif", planes, metadata=None)  # two pages, no axes at all
    tifffile.imwrite(tmp_path / "shaped.tif", planes)  # tifffile's shape only: axes Q, Y, X
    tifffile.imwrite(tmp_path / "marked.ome.tif", planes, metadata={"axes": "CYX"})
    for name in ("bare.tif", "shaped.tif"):
        image = read_images(tmp_path / name)[0]
        assert image.data.shape == (2, 40, 48) and "2 planes along axis 0" in image.note
        assert "--channel-axis" in image.note
    assert read_images(tmp_path / "marked.ome.tif")[0].note == ""
    said: list[str] = []  # adapt's reader: the note once for the set
    read_network_images([tmp_path], 2, True, None, None, None, said.append)
    assert len(said) == 1 and "bare.tif (and 1 more image): no axis" in said[0]
    result = CliRunner().invoke(app, ["segment", str(tmp_path), "--model", str(trained_cpnet_path),
                                      "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.count("were read as channels") == 1  # said once, with the first file
    assert "bare.tif: no axis of the file is marked as channels" in result.output
    assert "1 more image was read the same way" in result.output


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_images(tmp_path / "missing.tif")
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageReadError, match=r"corrupt\.tif: not a readable TIFF"):
        read_images(tmp_path / "corrupt.tif")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_images(tmp_path / "notes.txt")
    nan = np.ones((20, 20), np.float32)
    nan[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        read_images(tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((12, 20, 20, 30), np.uint8))
    with pytest.raises(ImageReadError, match="2-D"):
        read_images(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "z.ome.tif", np.zeros((7, 20, 30), np.uint8), metadata={"axes": "ZYX"})
    with pytest.raises(ImageReadError, match="Z axis of 7 planes"):
        read_images(tmp_path / "z.ome.tif")


def test_select_channels():
    img = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    assert select_channels(img[:1], None, 2, "x").shape == (2, 4, 5)  # cellpose 3's channels=[0,0]
    assert (select_channels(img[:1], None, 2, "x")[1] == 0).all()
    assert (select_channels(img, [2, 0], 2, "x") == img[[2, 0]]).all()
    assert select_channels(img[:2], None, 3, "x", pad=False).shape == (2, 4, 5)
    with pytest.raises(ImageReadError, match="choose them with --channels"):
        select_channels(img, None, 2, "x")
    with pytest.raises(ImageReadError, match="out of range"):
        select_channels(img, [5], 2, "x")


def test_label_dtype_grows_past_65535():
    assert label_dtype(np.array([0, 65535])) == np.uint16
    assert label_dtype(np.array([0, 65536])) == np.uint32


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "a_masks.tif"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert not target.exists() and os.listdir(target.parent) == []
    write_masks(target, np.ones((4, 4), np.int64))
    assert tifffile.imread(target).dtype == np.uint16


def test_unwritable_directory_is_an_error(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")  # fails for root too, unlike chmod
    with pytest.raises(OutputWriteError, match="cannot write outputs here"):
        write_masks(tmp_path / "a_file" / "a_masks.tif", np.zeros((2, 2), np.uint16))


def test_files_are_read_ahead_in_a_reader_thread_in_order(monkeypatch):
    import threading

    from selfadapt_deploy import batch

    started: list[tuple[str, str]] = []

    def fake_read(path, channel_axis=None, series=None, **stack_options):
        started.append((str(path), threading.current_thread().name))
        return [str(path)]

    monkeypatch.setattr(batch, "read_images", fake_read)
    paths = [f"f{i}.tif" for i in range(5)]
    it = batch.read_ahead(paths, None, None, depth=2)
    first_path, first = next(it)
    assert first_path == "f0.tif" and first.result() == ["f0.tif"]
    seen = [first_path] + [p for p, f in it if f.result() == [p]]
    assert seen == paths
    assert [p for p, _ in started] == paths  # read in order, ahead of use, on the reader thread
    assert all(name.startswith("sa-deploy-reader") for _, name in started)
