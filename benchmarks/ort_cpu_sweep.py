"""Benchmark: onnxruntime CPU settings for the network, on real tiles, to pick the CPU defaults.

What is measured
    The real Cellpose 3 net (``--model``) exported as ``segment`` runs it (``export_onnx``, model
    graph), on a batch of real 224² tiles cut as ``segment`` cuts them (the first image of
    ``--images``, default the real H&E set, normalised and resized to the network's scale at its
    median label diameter). Each setting is one onnxruntime CPU session; settings alternate,
    ``--repeats`` rounds, medians of milliseconds per tile:

    * batch size (``segment --batch-size``: tiles per network call);
    * graph optimisation level (``basic``, ``extended``, ``all`` — ``all`` is onnxruntime's default
      and sa-deploy's);
    * intra-op thread spinning on or off (off frees the core sooner for the overlapped masks
      thread);
    * fp16 graph against fp32 — with ``--agreement N`` also the masks of the first N images of the
      set segmented end to end with the fp16 graph against the fp32 graph (pooled AP@0.5/0.75).

Output: one line per setting; last line ``ratio=<default s/tile ÷ fastest s/tile>``.

Run (repository root)::

    python benchmarks/ort_cpu_sweep.py --threads 2 --repeats 3 --agreement 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT = {"batch": 8, "level": "all", "spin": True, "precision": "fp32"}


def set_images(folder: Path, count: int | None = None) -> tuple[list[np.ndarray], float, list[int] | None]:
    """The set's first ``count`` images as read from disk, its median diameter and its channels."""
    import tifffile
    from selection_real import set_facts

    from selfadapt_deploy.io.readers import expand_inputs

    diameter, channels = set_facts(folder)
    images = folder / "images" if (folder / "images").is_dir() else folder
    files = [p for p in expand_inputs([images]) if not p.name.split(".")[0].endswith("_masks")]
    return [tifffile.imread(p) for p in files[:count]], diameter, channels


def real_tiles(model: Path, folder: Path, count: int) -> tuple[np.ndarray, float]:
    """``count`` tiles of the set's first image at the network's scale, and the set's diameter."""
    from selfadapt_deploy.api import Segmenter
    from selfadapt_deploy.segment import prepare_image, rescale_factor

    (first,), diameter, channels = set_images(folder, 1)
    with Segmenter(model, runtime="torch", device="cpu") as seg:
        img = seg.network_input(first, channels, -1 if first.ndim == 3 else None)
        big = prepare_image(img, rescale_factor(seg.runner.spec, diameter))
    tiles = [big[:, y:y + 224, x:x + 224] for y in range(0, big.shape[1] - 224, 200)
             for x in range(0, big.shape[2] - 224, 200)][:count]
    return np.ascontiguousarray(np.stack(tiles), dtype=np.float32), diameter


def session(onnx: bytes, level: str, spin: bool, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])


def ms_per_tile(sess, tiles: np.ndarray, batch: int) -> float:
    """Milliseconds per tile over ``tiles`` in network calls of ``batch`` (float32 in, as segment
    feeds every graph: an fp16 graph casts inside)."""
    name = sess.get_inputs()[0].name
    tic = time.perf_counter()
    for i in range(0, len(tiles), batch):
        sess.run(None, {name: tiles[i:i + batch]})
    return 1000 * (time.perf_counter() - tic) / len(tiles)


def agreement(model: Path, folder: Path, count: int) -> tuple[float, float]:
    """fp16-graph masks against fp32-graph masks on the set's first ``count`` images."""
    from selfadapt_deploy.api import Segmenter
    from selfadapt_deploy.metrics import average_precision, pooled

    imgs, diameter, channels = set_images(folder, count)
    masks = {}
    for precision in ("fp32", "fp16"):
        with Segmenter(model, runtime="onnx", device="cpu", precision=precision, diameter=diameter) as seg:
            masks[precision] = [seg.segment(img, channels, -1 if img.ndim == 3 else None) for img in imgs]
    ap = pooled([average_precision(a, b) for a, b in zip(masks["fp32"], masks["fp16"], strict=True)]).ap
    return float(ap[0]), float(ap[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "cyto0_cp3.pth")
    ap.add_argument("--images", type=Path, default=SHARED / "data" / "labelled" / "miccai_he_tissue_nuclei")
    ap.add_argument("--tiles", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--agreement", type=int, default=0, help="images for the fp16 mask agreement")
    args = ap.parse_args(argv)
    if not args.model.is_file() or not args.images.is_dir():
        print(f"ort_cpu_sweep: needs {args.model} and {args.images}; nothing run")
        return 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    torch.set_num_threads(args.threads)
    from selfadapt_deploy.export.onnx_export import export_onnx
    from selfadapt_deploy.models import load_model
    from selfadapt_deploy.runtime.base import MODEL_GRAPH

    net = load_model(args.model)
    tiles, diameter = real_tiles(args.model, args.images, args.tiles)
    graphs = {p: export_onnx(net, MODEL_GRAPH, p).SerializeToString() for p in ("fp32", "fp16")}
    settings = [DEFAULT, *({**DEFAULT, "batch": b} for b in (4, 16, 32)),
                *({**DEFAULT, "level": lv} for lv in ("basic", "extended")),
                {**DEFAULT, "spin": False}, {**DEFAULT, "precision": "fp16"}]
    sessions = [session(graphs[s["precision"]], s["level"], s["spin"], args.threads) for s in settings]
    print(f"ort_cpu_sweep: {len(tiles)} real 224² tiles of {args.images.name} (diameter {diameter:.2f}), "
          f"{args.threads} threads, {args.repeats} rounds")
    times: list[list[float]] = [[] for _ in settings]
    for sess, s in zip(sessions, settings, strict=True):  # warm-up
        ms_per_tile(sess, tiles[: s["batch"]], s["batch"])
    for _ in range(args.repeats):
        for k, (sess, s) in enumerate(zip(sessions, settings, strict=True)):
            times[k].append(ms_per_tile(sess, tiles, s["batch"]))
    med = [statistics.median(t) for t in times]
    for s, m, t in zip(settings, med, times, strict=True):
        spin = "on " if s["spin"] else "off"
        label = f"batch {s['batch']:>2}  level {s['level']:<8}  spin {spin}  {s['precision']}"
        print(f"  {label}   {m:7.1f} ms/tile   ({', '.join(f'{v:.1f}' for v in t)})   "
              f"×{med[0] / m:.2f} of the default")
    if args.agreement:
        a50, a75 = agreement(args.model, args.images, args.agreement)
        print(f"fp16 graph masks against fp32 on {args.agreement} images: AP@0.5 {a50:.4f}, "
              f"AP@0.75 {a75:.4f}")
    print(f"ratio={med[0] / min(med):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
