"""The ``sa-deploy`` CLI: thin commands, one error line + exit 1, atomic outputs, resumable runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from selfadapt_deploy.cli import app
from selfadapt_deploy.synthetic import random_labels, render

runner = CliRunner()


@pytest.fixture
def weights(tmp_path, tiny_cpnet) -> Path:
    path = tmp_path / "tiny.pth"
    tiny_cpnet.save(path)
    return path


def write_image(path: Path, seed: int = 0, shape=(96, 80)) -> Path:
    tifffile.imwrite(path, (render(random_labels(shape, 12, seed=seed), seed=seed) * 1000).astype(
        np.uint16))
    return path


def test_segment_batch_with_a_bad_image(tmp_path, weights):
    good = write_image(tmp_path / "good.tif")
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.full((64, 64), 7, np.uint16))  # no cells is a valid answer
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00not really a tiff")
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(good), str(bad), str(flat), "--model", str(weights),
                                 "--out", str(out), "--device", "cpu", "--save-flows"])
    assert result.exit_code == 1, result.output
    assert "bad.tif: not a readable TIFF" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "flat_flows.tif", "flat_masks.tif", "good_flows.tif", "good_masks.tif"]
    masks = tifffile.imread(out / "good_masks.tif")
    assert masks.shape == (96, 80) and masks.dtype == np.uint16
    assert tifffile.imread(out / "flat_masks.tif").max() == 0
    assert tifffile.imread(out / "good_flows.tif").shape == (3, 96, 80)

    bad.unlink()
    again = runner.invoke(app, ["segment", str(tmp_path), "--model", str(weights), "--out", str(out),
                                "--device", "cpu"])  # a folder: its images; done ones are skipped
    assert again.exit_code == 0, again.output
    assert "good: skipped" in again.output and "flat: skipped" in again.output


def test_segment_multiseries_writes_one_mask_per_series(tmp_path, weights):
    path = tmp_path / "multi.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        for seed in range(3):
            img = (render(random_labels((64, 72), 8, seed=seed), seed=seed) * 900).astype(np.uint16)
            tif.write(np.stack([img, img // 2]), metadata={"axes": "CYX"})
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(path), "--model", str(weights), "--out", str(out),
                                 "--channels", "1,0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"multi_s{i}_masks.tif" for i in range(3)]

    from selfadapt_deploy.batch import SegmentJob, segment_files
    from selfadapt_deploy.models import load_model
    from selfadapt_deploy.runtime import TorchRunner
    from selfadapt_deploy.segment import SegmentParams

    job = SegmentJob(TorchRunner(load_model(weights)), out, SegmentParams(), torch.device("cpu"), [0])
    results = list(segment_files([path], job))  # resumed: outputs exist
    assert [(r.status, r.last_in_file) for r in results] == [("skipped", False), ("skipped", False),
                                                            ("skipped", True)]


@pytest.mark.parametrize("args,message", [
    (["--model", "cyto33"], "Did you mean"),
    (["--tile-overlap", "0.9"], "--tile-overlap must be between"),
    (["--channels", "a,b"], "comma-separated list"),
    (["--pipeline", "gpu"], "--pipeline must be one of"),
    (["--precision", "int8"], "--precision must be one of"),
    (["--attention", "flash"], "--attention must be one of"),
    (["--flow-threshold", "-0.1"], "--flow-threshold must be a number ≥ 0"),
    (["--model", "RANDOM"], "not a readable PyTorch weights file"),
    # every bad value names the flag and the value (issue 22, items 5, 6, 7, 8)
    (["--diameter", "nan"], "--diameter must be a number ≥ 0 in pixels (0: the model's default), got nan"),
    (["--diameter", "-5"], "--diameter must be a number ≥ 0 in pixels (0: the model's default), got -5.0"),
    (["--cellprob-threshold", "nan"], "--cellprob-threshold must be a finite number (a logit), got nan"),
    (["--cellprob-threshold", "inf"], "--cellprob-threshold must be a finite number (a logit), got inf"),
    (["--min-size", "-5"], "--min-size must be an integer ≥ 0 in pixels (0 keeps every mask), got -5"),
    (["--batch-size", "0"], "--batch-size must be an integer ≥ 1, got 0"),
    (["--niter", "-1"], "--niter must be an integer in 0..100000"),
    (["--niter", "1000000000"], "--niter must be an integer in 0..100000"),
    (["--channels", ""], "--channels names no channel"),
    (["--channels", "0,0"], "for a greyscale image write --channels 0"),
])
def test_bad_arguments_fail_with_one_clear_line(tmp_path, weights, args, message):
    image = write_image(tmp_path / "a.tif")
    base = ["segment", str(image), "--out", str(tmp_path / "out"), "--device", "cpu"]
    if "--model" not in args:
        base += ["--model", str(weights)]
    if "RANDOM" in args:  # a weights file of random bytes
        (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
        args = [str(tmp_path / "random.pt") if a == "RANDOM" else a for a in args]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("*_masks.tif"))



def test_an_error_inside_one_image_names_that_image(tmp_path, weights):
    small = write_image(tmp_path / "small.tif", shape=(40, 48))
    result = runner.invoke(app, ["segment", str(small), "--model", str(weights), "--out",
                                 str(tmp_path / "out"), "--device", "cpu", "--diameter", "5000"])
    assert result.exit_code == 1
    assert f"{small} (small): --diameter 5000 is too large" in result.output.replace("\n", "")
    assert not list((tmp_path / "out").glob("*.tif"))

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_request_without_gpu_is_an_error_not_a_fallback(tmp_path, weights):
    result = runner.invoke(app, ["segment", str(write_image(tmp_path / "a.tif")), "--model",
                                 str(weights), "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert result.exit_code == 1 and "no CUDA device" in result.output


def test_unwritable_out_dir(tmp_path, weights):
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["segment", str(write_image(tmp_path / "a.tif")), "--model",
                                 str(weights), "--out", str(tmp_path / "file" / "out")])
    assert result.exit_code == 1 and "cannot write outputs here" in result.output


def test_segment_device_pipeline_on_cpu_writes_the_host_pipelines_masks(tmp_path, weights):
    image = write_image(tmp_path / "a.tif")
    for pipeline in ("host", "device"):
        result = runner.invoke(app, ["segment", str(image), "--model", str(weights), "--out",
                                     str(tmp_path / pipeline), "--device", "cpu", "--pipeline", pipeline,
                                     "--cellprob-threshold", "-2", "--flow-threshold", "0"])
        assert result.exit_code == 0, result.output
        assert "runtime: torch (fp32) on cpu" in result.output
    host, device = (tifffile.imread(tmp_path / p / "a_masks.tif") for p in ("host", "device"))
    assert host.max() > 0
    np.testing.assert_array_equal(device, host)


def test_segment_passes_parsed_options_to_the_library(tmp_path, weights, monkeypatch):
    seen = {}

    def fake_segment_files(paths, job, channel_axis, series, stack_progress=None):
        seen.update(params=job.params, channels=job.channels, series=series,
                    save_flows=job.save_flows, stack_mode=job.stack_mode)
        return iter(())

    monkeypatch.setattr("selfadapt_deploy.batch.segment_files", fake_segment_files)
    result = runner.invoke(app, ["segment", "x.tif", "--model", str(weights), "--out",
                                 str(tmp_path / "o"), "--diameter", "25", "--niter", "50",
                                 "--flow-threshold", "0", "--channels", "2,1", "--series", "1",
                                 "--tta", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    p = seen["params"]
    assert (p.diameter, p.niter, p.flow_threshold, p.tta) == (25.0, 50, 0.0, True)
    assert seen["channels"] == [2, 1] and seen["series"] == 1 and seen["save_flows"] is False
    assert seen["stack_mode"] == "refuse"  # no stack option: a Z-stack would be refused


def test_evaluate_prints_table_and_writes_json(tmp_path):
    gt = random_labels((80, 80), 15, seed=1)
    pred = np.where(gt > 0, gt * 2 + 5, 0)  # same objects, gapped ids
    pred[gt == 1] = 0
    tifffile.imwrite(tmp_path / "gt.tif", gt.astype(np.uint16))
    tifffile.imwrite(tmp_path / "pred.tif", pred.astype(np.uint16))
    out = tmp_path / "ap.json"
    tifffile.imwrite(tmp_path / "perfect.tif", gt.astype(np.uint16))
    result = runner.invoke(app, ["evaluate", "--pred", str(tmp_path / "pred.tif"), "--gt",
                                 str(tmp_path / "gt.tif"), "--pred", str(tmp_path / "perfect.tif"),
                                 "--gt", str(tmp_path / "gt.tif"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    n = int(gt.max())
    assert report["images"][0]["tp"] == [n - 1] * 3 and report["images"][0]["fn"] == [1] * 3
    assert report["images"][1]["ap"] == [1.0] * 3
    assert f"{(n - 1) / n:.4f}" in result.output
    pooled = (2 * n - 1) / (2 * n)  # summed TP / (TP + FP + FN) over both pairs
    assert "all (pooled)" in result.output and f"{pooled:.4f}" in result.output


def test_evaluate_mismatched_lists(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint16))
    result = runner.invoke(app, ["evaluate", "--pred", str(tmp_path / "a.tif"), "--pred",
                                 str(tmp_path / "a.tif"), "--gt", str(tmp_path / "a.tif")])
    assert result.exit_code == 1 and "matching pairs" in result.output


def test_segment_with_a_cellpose_sam_file_and_tta(tmp_path, tiny_cpsam):
    tiny_cpsam.save(tmp_path / "sam.pt")
    image = tmp_path / "rgb.tif"
    gray = render(random_labels((70, 90), 8, seed=2), seed=2)
    tifffile.imwrite(image, (np.stack([gray, gray / 2, gray / 3], -1) * 1000).astype(np.uint16))
    result = runner.invoke(app, ["segment", str(image), "--model", str(tmp_path / "sam.pt"), "--out",
                                 str(tmp_path / "out"), "--tta", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "model: cpsam (diam_mean 30, tile 64); runtime: torch (fp32) on cpu" in result.output
    assert tifffile.imread(tmp_path / "out" / "rgb_masks.tif").shape == (70, 90)


@pytest.mark.parametrize("family", ["tiny_cpnet", "tiny_cpsam",
                                    pytest.param("tiny_cpdino", marks=pytest.mark.slow)])
def test_adapt_end_to_end_and_resume(tmp_path, family, request):
    net = request.getfixturevalue(family)
    net.save(tmp_path / "pretrained.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(3):
        write_image(folder / f"img{seed}.tif", seed=seed, shape=(80, 96))
    (folder / "broken.tif").write_bytes(b"II*\x00nope")  # the set is not what was asked: refused
    run = tmp_path / "run"
    args = ["adapt", str(folder), "--model", str(tmp_path / "pretrained.pt"), "--out", str(run),
            "--iterations", "4", "--batch-size", "2", "--eval-every", "2", "--device", "cpu"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "broken.tif" in refused.output and "fix or remove it" in refused.output
    assert "Traceback" not in refused.output and not run.exists()  # nothing written
    (folder / "broken.tif").unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 training / 1 validation images (of 3 images read)" in result.output
    assert {"model.pt", "metrics.csv", "curves.png", "run.json", "settings.json",
            "checkpoint.pt", "snapshots"} <= {p.name for p in run.iterdir()}
    assert len(list((run / "snapshots").iterdir())) == 3
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--resume" in again.output
    # interrupted after 3 of 4 steps (as a kill would), then resumed: the same model, bit for bit
    import selfadapt_deploy.trainer.methods as methods

    real_step, calls = methods.train_step, []

    def killed_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    killed = tmp_path / "killed"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(methods, "train_step", killed_at_step_3)
        interrupted = runner.invoke(app, [*args[:args.index("--out") + 1], str(killed),
                                          *args[args.index("--out") + 2:]])
    assert interrupted.exit_code != 0 and not (killed / "model.pt").exists()
    resumed = runner.invoke(app, ["adapt", "--resume", str(killed), "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output
    full, again_ = (torch.load(d / "model.pt", weights_only=True) for d in (run, killed))
    assert all(torch.equal(full[k], again_[k]) for k in full)
    assert (killed / "metrics.csv").read_text() == (run / "metrics.csv").read_text()
    seg = runner.invoke(app, ["segment", str(folder / "img0.tif"), "--model", str(run), "--out",
                              str(tmp_path / "masks"), "--device", "cpu"])
    assert seg.exit_code == 0, seg.output


def test_adapt_with_labelled_target_images_runs_actis_resumes_and_exports(tmp_path, weights):
    folder, labelled, held_out = (tmp_path / n for n in ("images", "labelled", "held_out"))
    for d in (folder, labelled, held_out):
        d.mkdir()
    for seed in range(3):
        write_image(folder / f"img{seed}.tif", seed=seed, shape=(80, 96))
    for d, seed in ((labelled, 5), (held_out, 6)):
        labels = random_labels((80, 96), 12, seed=seed)
        tifffile.imwrite(d / "a.tif", (render(labels, seed=seed) * 1000).astype(np.uint16))
        tifffile.imwrite(d / "a_masks.tif", labels.astype(np.uint16))
    run = tmp_path / "run"
    result = runner.invoke(app, ["adapt", str(folder), "--model", str(weights), "--out", str(run),
                                 # one spelling, the older one still accepted as an alias
                                 "--labelled", str(labelled), "--val-labeled", str(held_out),
                                 "--iterations", "4", "--batch-size", "2", "--eval-every", "2",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "actis: deployed iter_" in result.output and "held-out labelled" in result.output
    summary = json.loads((run / "run.json").read_text())
    assert summary["method"] == "actis" and summary["selection"]["rule"] == "labelled"
    resumed = runner.invoke(app, ["adapt", "--resume", str(run), "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output
    exported = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "exported")])
    assert exported.exit_code == 0, exported.output
    bad = runner.invoke(app, ["adapt", str(folder), "--model", str(weights), "--out", str(tmp_path / "r2"),
                              "--select", "labelled", "--device", "cpu"])
    assert bad.exit_code == 1 and "needs held-out labelled images" in bad.output
    assert not (tmp_path / "r2").exists()  # refused before anything was written


def test_adapt_culpico_from_the_cli_with_labelled_source_images(tmp_path, weights):
    folder, source = tmp_path / "images", tmp_path / "source"
    folder.mkdir()
    source.mkdir()
    for seed in range(2):
        write_image(folder / f"img{seed}.tif", seed=seed, shape=(80, 96))
    labels = random_labels((80, 96), 12, seed=9)
    tifffile.imwrite(source / "s.tif", (render(labels, seed=9) * 1000).astype(np.uint16))
    tifffile.imwrite(source / "s_masks.tif", labels.astype(np.uint16))
    run = tmp_path / "run"
    base = ["adapt", str(folder), "--model", str(weights), "--iterations", "2", "--batch-size", "2",
            "--eval-every", "2", "--device", "cpu"]
    result = runner.invoke(app, [*base, "--out", str(run), "--method", "culpico", "--source", str(source)])
    assert result.exit_code == 0, result.output
    assert "culpico: deployed " in result.output
    summary = json.loads((run / "run.json").read_text())
    assert summary["method"] == "culpico" and summary["labelled_per_batch"] == 1
    wrong = runner.invoke(app, [*base, "--out", str(tmp_path / "r2"), "--source", str(source)])
    assert wrong.exit_code == 1 and "belong to --method culpico" in wrong.output


def test_help_summaries_are_whole_sentences():
    """On a wide terminal every command's summary is one line ending its sentence — not broken
    where the docstring's source line ended."""
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    rows = [line for line in result.output.splitlines() if line.startswith("│ ")
            and line.split()[1] in {c.name or c.callback.__name__ for c in app.registered_commands}]
    assert len(rows) == len(app.registered_commands)
    assert all(row.rstrip(" │").endswith(".") for row in rows), rows


def test_library_errors_become_one_line_in_one_place():
    """The CLI's error boundary (cli.ErrorBoundary) is the only SaDeployError → exit-code
    conversion, and it gives one ``error:`` line and exit code 1 for any command."""
    root = Path(__file__).resolve().parents[1] / "selfadapt_deploy"
    conversions = sum(p.read_text().count("raise fail(str(exc))") for p in root.glob("cli*.py"))
    assert conversions == 1
    result = runner.invoke(app, ["evaluate", "--pred", "nowhere", "--gt", "nowhere"])
    assert result.exit_code == 1 and result.output.count("error:") == 1 and "Traceback" not in result.output


def test_a_diameter_that_would_rescale_past_the_limit_is_refused_per_image(tmp_path, weights):
    """--diameter 0.001 would rescale a 96×80 image ~17000× (OpenCV would try to allocate TBs):
    one line per image naming the flag, the value and the size, exit code 1, nothing written."""
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(2):
        write_image(folder / f"a{k}.tif", seed=k)
    result = runner.invoke(app, ["segment", str(folder), "--model", str(weights), "--out",
                                 str(tmp_path / "out"), "--device", "cpu", "--diameter", "0.001"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.count("--diameter 0.001 would rescale a 96×80 image") == 2
    assert "16384²" in result.output and "0 done" in result.output
    assert not list((tmp_path / "out").glob("*_masks.tif"))


def test_messages_name_the_right_thing(tmp_path, weights):
    """evaluate --pred DIR is a folder (not "no such file"); an unwritable --json names --json;
    adapt --out FILE is a file (no --resume hint), adapt --out RUN suggests --resume RUN;
    demo --out FILE is one line, not a FileExistsError traceback."""
    folder = tmp_path / "preds"
    folder.mkdir()
    labels = tmp_path / "gt.tif"
    tifffile.imwrite(labels, random_labels((32, 32), 3, seed=0).astype(np.uint16))
    result = runner.invoke(app, ["evaluate", "--pred", str(folder), "--gt", str(labels)])
    assert result.exit_code == 1 and "is a folder, not a label image file" in result.output
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    result = runner.invoke(app, ["evaluate", "--pred", str(labels), "--gt", str(labels), "--json",
                                 str(blocked / "ap.json")])
    assert result.exit_code == 1 and "choose another --json" in result.output and "--out" not in result.output
    image = write_image(tmp_path / "a.tif")
    result = runner.invoke(app, ["adapt", str(image), "--model", str(weights), "--out", str(blocked)])
    assert result.exit_code == 1 and "is a file, not a directory" in result.output
    assert "--resume" not in result.output
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text("{}")
    result = runner.invoke(app, ["adapt", str(image), "--model", str(weights), "--out", str(run)])
    assert result.exit_code == 1 and f"--resume {run}" in result.output
    result = runner.invoke(app, ["demo", "--out", str(blocked)])
    assert result.exit_code == 1 and "is a file; choose a folder for --out" in result.output
    assert "Traceback" not in result.output
