"""Benchmark: whole-slide streaming — peak memory and time against slide size.

What is measured
    Generated slides (``synthetic.write_slide``: tiled zlib OME-TIFF, uint16, a rendered field
    of cells mirrored across the slide, ~30 % of the area in cells of radius 6–9 px) of 4096²,
    8192² and 16384² pixels are segmented by ``sa-deploy segment --stream`` (the command a user
    runs), each in a fresh process, with the small trained Cellpose 3 network
    (``tests/fixtures/cellpose3/tiny_cyto.pth``) on the CPU, default block size (2048) and halo.
    For each: the process's peak RSS (``ru_maxrss`` of that child), wall seconds, objects found
    and the dense size the whole-image pipeline would hold for the flows alone (3 × H × W float32).

Output: a table; the last line is ``ratio=<peak RSS at the largest size ÷ peak RSS at the
smallest>`` (goal ≤ 1.5: memory flat in the slide's area).

Run (repository root)::

    python benchmarks/wsi_memory.py                       # 4096, 8192, 16384 (about 15 min on 2 cores)
    python benchmarks/wsi_memory.py --sizes 2048,4096 --block-size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
MODEL = REPO / "tests" / "fixtures" / "cellpose3" / "tiny_cyto.pth"

# runs the CLI in a child process and reports that child's peak RSS (this wrapper is fresh per size)
_WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t,
                  "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def run_size(size: int, block_size: int, tmp: Path, threads: int) -> dict:
    from selfadapt_deploy.synthetic import write_slide

    slide = tmp / f"slide_{size}.ome.tif"
    t0 = time.perf_counter()
    write_slide(slide, size, size, seed=0, patch=1024)
    made = time.perf_counter() - t0
    out = tmp / f"out_{size}"
    cmd = [sys.executable, "-m", "selfadapt_deploy", "segment", str(slide), "--model", str(MODEL),
           "--out", str(out), "--device", "cpu", "--channels", "0", "--stream",
           "--block-size", str(block_size)]
    env_threads = {"OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True,
                            env={**os.environ, **env_threads}, cwd=REPO)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["rc"] != 0:
        sys.exit(f"segment failed on {size}²:\n{result.stderr[-2000:]}")
    summary = json.loads((out / f"slide_{size}_summary.json").read_text())
    slide.unlink()
    return {"size": size, "made_s": made, "seconds": measured["seconds"],
            "peak_gib": measured["peak_kib"] / 2**20, "objects": summary["objects"],
            "blocks": summary["blocks"]["total"], "flows_gib": 3 * size * size * 4 / 2**30,
            "cut": summary["cut_objects"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4096,8192,16384")
    ap.add_argument("--block-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not MODEL.is_file():
        sys.exit(f"{MODEL} missing: run tests/reference/make_cellpose3_fixtures.py")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"wsi_memory: sa-deploy segment --stream, block {args.block_size}, {args.threads} CPU threads, "
          f"model {MODEL.name}")
    print(f"{'slide':>12} {'blocks':>7} {'objects':>9} {'seconds':>9} {'peak RSS GiB':>13} "
          f"{'dense flows GiB':>16} {'cut':>5}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            r = run_size(size, args.block_size, Path(tmp), args.threads)
            rows.append(r)
            print(f"{size:>6}×{size:<5} {r['blocks']:>7} {r['objects']:>9} {r['seconds']:>9.1f} "
                  f"{r['peak_gib']:>13.2f} {r['flows_gib']:>16.2f} {r['cut']:>5}", flush=True)
    print(f"ratio={rows[-1]['peak_gib'] / rows[0]['peak_gib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
