"""The real-data selection benchmark end to end on a small real set (slow; needs ../shared)."""

from __future__ import annotations

import json
import sys

import pytest
import tifffile

from .conftest import ROOT

SHARED = ROOT.parent / "shared"
NUCLEI = SHARED / "data" / "labelled" / "coelho2009_u2os_nuclei"
MODEL = SHARED / "models" / "cyto0_cp3.pth"


@pytest.mark.slow
def test_selection_real_runs_end_to_end_on_a_small_real_set(tmp_path, capsys):
    if not (NUCLEI.is_dir() and MODEL.is_file()):
        pytest.skip(f"needs {NUCLEI} and {MODEL}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import selection_real

    small = tmp_path / "nuclei"
    for sub in ("images", "masks"):
        (small / sub).mkdir(parents=True)
    for image in sorted((NUCLEI / "images").glob("*.tif"))[:3]:  # crops of three real fields
        masks = NUCLEI / "masks" / f"{image.stem}_masks.tif"
        tifffile.imwrite(small / "images" / image.name, tifffile.imread(image)[200:712, 300:812])
        tifffile.imwrite(small / "masks" / masks.name, tifffile.imread(masks)[200:712, 300:812])
    curves = tmp_path / "curves.json"
    args = ["--sets", str(small), "--model", str(MODEL), "--iterations", "2", "--eval-every", "1",
            "--lr-factors", "1", "--work", str(tmp_path / "work"), "--save", str(curves)]
    assert selection_real.main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    (run,) = json.loads(curves.read_text())
    names = [r["candidate"] for r in run["rows"]]
    assert names[:3] == ["iter_000000", "iter_000001", "iter_000002"]
    assert {"swa", "wise-0.50", "swa-bn", "theta0-bn"} <= set(names)
    for row in run["rows"]:
        assert 0 <= row["ap50"] <= 1 and 0 <= row["ap75"] <= row["ap50"]
        assert 0 <= row["consensus50_snapshots"] <= 1 and 0 <= row["dropout_err"] <= 1
    assert run["rows"][0]["ap50"] > 0.8  # the real model segments these nuclei before adapting
    assert printed[-1].startswith("ratio=")
    assert selection_real.main(["--load", str(curves)]) == 0  # re-scored without training
    assert capsys.readouterr().out.strip().splitlines()[-1] == printed[-1]


def test_a_candidate_claimed_by_a_live_process_is_left_to_it_and_a_dead_ones_claim_is_taken(tmp_path):
    import os
    import subprocess

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from selection_common import _claim

    mine = tmp_path / "claims" / "iter_000000"
    assert _claim(mine) and _claim(mine)  # created here; still ours when asked again
    assert mine.read_text() == str(os.getpid())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / "claims" / "iter_000015"
        live.write_text(str(other.pid))
        assert not _claim(live)  # the other process is scoring it
    finally:
        other.kill()
        other.wait()
    assert _claim(live) and live.read_text() == str(os.getpid())  # its scorer died: taken over
