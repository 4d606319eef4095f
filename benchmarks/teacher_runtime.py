"""Benchmark: the SelfAdapt teacher's 8-view pseudo-labels on the CPU, torch against onnxruntime.

What is measured
    The teacher's part of an adaptation step for a Cellpose 3 net (``--model``, default the real
    ``../shared/models/cyto0_cp3.pth``, else a cyto3-size CPnet with random weights) on a batch of
    ``--batch-size`` 224² tiles of a real image (``../shared/data/bbbc047``, else generated cells):

    * **torch**: ``trainer.teacher.teacher_predict`` as ``adapt --teacher-runtime torch`` runs it
      on the CPU (one forward per view, the faster mode there: ``adapt_throughput.py``);
    * **onnx**: ``adapt --teacher-runtime onnx`` — ``engine_teacher.RunnerTeacher`` over the
      exported teacher-TTA graph in onnxruntime's CPU provider, with ``--teacher-sync`` (default
      10): every ``sync``-th step the EMA's weights go into a new session and the torch teacher is
      run as the reference (``teacher_err``), so a cycle of ``sync`` steps is timed whole.

    Both at ``--threads`` CPU threads; ``--cycles`` cycles each, alternating; medians.

Output: seconds per step both ways, the sync step's cost, teacher_err; last line
``ratio=<torch s per step ÷ onnx s per step (sync included)>`` (> 1: onnxruntime is faster).

Run (repository root)::

    python benchmarks/teacher_runtime.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from selfadapt_deploy.models import CPnet, load_model
from selfadapt_deploy.trainer.engine_teacher import open_engine_teacher
from selfadapt_deploy.trainer.teacher import teacher_predict

SHARED = Path(__file__).resolve().parents[2] / "shared"


def tiles(net, batch: int) -> torch.Tensor:
    """Normalised tiles of a real field (or generated cells) with the network's channels."""
    from selfadapt_deploy.io.normalize import normalize_image
    from selfadapt_deploy.io.readers import read_images

    real = SHARED / "data" / "bbbc047" / "cdp2bioactives_h15.ome.tif"
    if real.is_file():
        gray = read_images(real, series=0)[0].data[0]
    else:
        from selfadapt_deploy.synthetic import random_labels, render

        gray = render(random_labels((520, 696), 120, radius=(8, 14), seed=0), seed=0)
    gray = normalize_image(gray[None].astype(np.float32))[0]
    out = []
    for k in range(batch):
        y, x = (37 * k) % (gray.shape[0] - 224), (91 * k) % (gray.shape[1] - 224)
        crop = gray[y:y + 224, x:x + 224]
        out.append(np.stack([crop, np.zeros_like(crop)][: net.nchan]))
    return torch.from_numpy(np.stack(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "cyto0_cp3.pth")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--teacher-sync", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model.is_file():
        net, what = load_model(args.model), str(args.model)
    else:
        torch.manual_seed(0)
        net, what = CPnet().eval(), "cyto3-size CPnet, random weights"
    x = tiles(net, args.batch_size)
    print(f"teacher: {what}; {args.batch_size} tiles of 224², 8 views, {args.threads} threads, "
          f"sync every {args.teacher_sync} steps")
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        engine = open_engine_teacher(net, "onnx", "fp32", Path(tmp), torch.device("cpu"),
                                     args.teacher_sync, args.batch_size)
        print(f"export + first session: {time.perf_counter() - tic:.1f} s (once per run)")
        torch_s, onnx_s, sync_s, errs = [], [], [], []
        with torch.inference_mode():
            teacher_predict(net, x, batched=False)  # warm-up
            for _ in range(args.cycles):
                tic = time.perf_counter()
                for _ in range(args.teacher_sync):
                    teacher_predict(net, x, batched=False)
                torch_s.append((time.perf_counter() - tic) / args.teacher_sync)
                tic = time.perf_counter()
                for step in range(args.teacher_sync):
                    t = time.perf_counter()
                    _, logged = engine(x, step)
                    if logged:
                        sync_s.append(time.perf_counter() - t)
                        errs.append(logged["teacher_err"])
                onnx_s.append((time.perf_counter() - tic) / args.teacher_sync)
        engine.runner.deactivate()
    t, o = statistics.median(torch_s), statistics.median(onnx_s)
    print(f"torch: {t:.2f} s/step   onnx: {o:.2f} s/step (sync step {statistics.median(sync_s):.2f} s)"
          f"   teacher_err max {max(errs):.1e}")
    print(f"ratio={t / o:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
