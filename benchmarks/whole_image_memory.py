"""Benchmark: the whole-image working set against ``wsi.memory.whole_image_bytes``, its estimate.

What is measured
    A slide tiled from real phase-contrast frames (``../shared/data/labelled/
    usiigaci_phasecontrast_cells``; generated cells where absent) is segmented whole
    (``sa-deploy segment --no-stream``, the command a user runs) at several diameters, each in a
    fresh process, with the real Cellpose 3 weights (``../shared/models/cyto0_cp3.pth``; the
    small test network where absent) on the CPU. Its peak RSS minus that of the same command on
    a 256² crop (the model and libraries) is the image's working set; beside it the estimate
    that decides streaming.

Output: a table; the last line is ``ratio=<smallest estimate ÷ measured>`` (≥ 1: the estimate
never under-counts, so an image it reads whole fits).

Run (repository root)::

    python benchmarks/whole_image_memory.py                     # 4000², diameters 94, 47, 24
    python benchmarks/whole_image_memory.py --size 2000 --diameters 47
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.wsi_memory import _WRAPPER  # noqa: E402  (runs a command, reports its peak RSS)

SHARED = REPO.parent / "shared"
FRAMES = SHARED / "data" / "labelled" / "usiigaci_phasecontrast_cells" / "images"
REAL_MODEL = SHARED / "models" / "cyto0_cp3.pth"
TINY_MODEL = REPO / "tests" / "fixtures" / "cellpose3" / "tiny_cyto.pth"


def make_slide(path: Path, size: int) -> None:
    import numpy as np
    import tifffile

    if FRAMES.is_dir():
        frames = [tifffile.imread(f) for f in sorted(FRAMES.iterdir())[:4]]
        frames = [f if f.ndim == 2 else f[..., 0] for f in frames]
        edge = min(min(f.shape) for f in frames)
        n = -(-size // edge)
        tiled = np.block([[frames[(i * n + j) % len(frames)][:edge, :edge] for j in range(n)]
                          for i in range(n)])
    else:
        from selfadapt_deploy.synthetic import random_labels, render

        tiled = (render(random_labels((size, size), size * size // 900, seed=0), seed=0) * 1000)
    tifffile.imwrite(path, np.ascontiguousarray(tiled[:size, :size]).astype(np.uint16))


def peak_kib(image: Path, model: Path, diameter: float, out: Path) -> int:
    cmd = [sys.executable, "-m", "selfadapt_deploy", "segment", str(image), "--model", str(model),
           "--out", str(out), "--device", "cpu", "--diameter", str(diameter), "--no-stream"]
    result = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True,
                            cwd=REPO)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["rc"] != 0:
        sys.exit(f"segment failed on {image}:\n{result.stderr[-2000:]}")
    return measured["peak_kib"]


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import tifffile

    from selfadapt_deploy.models import load_model
    from selfadapt_deploy.segment import rescale_factor
    from selfadapt_deploy.wsi.memory import whole_image_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4000)
    ap.add_argument("--diameters", default="94,47,24")
    args = ap.parse_args(argv)
    model = REAL_MODEL if REAL_MODEL.is_file() else TINY_MODEL
    spec = load_model(model).spec
    with tempfile.TemporaryDirectory() as tmp:
        slide, crop = Path(tmp) / "slide.tif", Path(tmp) / "crop.tif"
        make_slide(slide, args.size)
        tifffile.imwrite(crop, np.ascontiguousarray(tifffile.imread(slide)[:256, :256]))
        base = peak_kib(crop, model, 47, Path(tmp) / "base")
        print(f"whole_image_memory: {args.size}² {'real frames' if FRAMES.is_dir() else 'generated'}, "
              f"model {model.name}, model and libraries {base / 2**20:.2f} GiB")
        print(f"{'diameter':>8} {'network scale':>14} {'measured GiB':>13} {'estimate GiB':>13} {'ratio':>6}")
        ratios = []
        for d in (float(x) for x in args.diameters.split(",")):
            rescale = rescale_factor(spec, d)
            measured = (peak_kib(slide, model, d, Path(tmp) / f"out{d:g}") - base) * 1024
            estimate = whole_image_bytes(args.size, args.size, spec.nchan, rescale)
            ratios.append(estimate / measured)
            side = int(args.size * rescale)
            print(f"{d:>8g} {side:>6}×{side:<7} {measured / 2**30:>13.2f} {estimate / 2**30:>13.2f} "
                  f"{ratios[-1]:>6.2f}", flush=True)
    print(f"ratio={min(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
