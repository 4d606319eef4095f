"""Benchmark: ``sa-deploy segment`` against cellpose 3 on the CPU, whole processes, same weights.

What is measured
    For each image set (default: every set under ``../shared/data/labelled/``; any folder of
    images, or of ``images/`` + ``masks/``, can be passed with ``--sets``), one process segments
    every image of the set and writes its masks, exactly as a user runs it:

    * **sa-deploy**: ``sa-deploy segment <images> --model W --out DIR --diameter D --device cpu``
      with every other setting at its default (``--runtime auto``: on the CPU a Cellpose 3 net is
      exported once into the graph cache and run by onnxruntime);
    * **cellpose 3** (3.1.1.x in its own virtual environment, ``--cellpose3``, as
      ``tests/reference/`` makes it): ``CellposeModel(pretrained_model=W, gpu=False)`` and
      ``eval(image, diameter=D, channels=…)`` per image, masks written with tifffile.

    Both processes use the same weights (``--model``, default ``../shared/models/cyto0_cp3.pth``),
    the set's median label diameter (cellpose's convention) and the same channel (grey sets: the
    image; RGB sets: the red channel, where hematoxylin nuclei contrast most — ``--channels 0``,
    cellpose's ``channels=[1, 0]``), with each tool's default thread counts. Each process is timed
    whole (interpreter start, imports, model loading, reading, network, masks, writing). The
    first sa-deploy process of a run starts with an empty graph cache and is reported on its own
    ("first use", the one-time export included); then ``--repeats`` pairs alternate, cellpose
    first, and medians are reported. Inside each process the stages are timed by wrapping the
    functions each pipeline looks up at call time (``stage_timing.py``): model opening, network,
    flow following, mask assembly, flow QC, clean-up; "other" is the rest (start-up, imports,
    reading, writing).

    The label sets are compared image by image (pooled AP@0.5 and AP@0.75 of ours against the
    reference): against cellpose 3's masks, and against cellpose 4.2's ``compute_masks`` run on
    cellpose 3's own flows (kept by the untimed warm-up run) — the post-processing sa-deploy
    follows; cellpose 3's CPU flow following interpolates differently from its GPU path and from
    cellpose 4, and that pair's agreement is printed too. The script exits with status 2 when
    AP@0.5 agreement with cellpose 4.2's masks is below 0.99.

    **Cellpose-SAM** (``--cellpose-sam yes``, the default; ``only`` skips cellpose 3): a small,
    randomly initialised Cellpose-SAM (:data:`CPSAM_SIZE`, saved once to a file) segments every
    set in both tools — ``sa-deploy segment`` with the file (``--runtime auto`` keeps Cellpose-SAM
    in torch on the CPU) against cellpose 4.2's ``CellposeModel.eval`` in this environment running
    the same network (cellpose 4.2 builds only the ViT-L from a file, so it is handed the net, as
    the tests do), the image's own channels, each set's diameter; AP agreement against cellpose
    4.2's masks. A random network's masks are not cells: this times the same computation on real
    image sizes, it says nothing of quality.

Output: per set the processes' seconds, the ratio, the agreement, and the stage table; last
line ``ratio=<cellpose s ÷ sa-deploy s, all sets, Cellpose 3 model>``.

Run (repository root; make the cellpose 3 environment once)::

    python3 -m venv .venv-cp3 && .venv-cp3/bin/pip install "torch==2.13.0" \\
        && .venv-cp3/bin/pip install "cellpose==3.1.1.2" "numpy<2.1"
    python benchmarks/cpu_vs_cellpose.py --repeats 3
    python benchmarks/cpu_vs_cellpose.py --sets ../shared/data/labelled/usiigaci_phasecontrast_cells
"""

from __future__ import annotations

# stdlib only at module level: the cellpose 3 child imports this file in its own environment
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_SETS = SHARED / "data" / "labelled"
DEFAULT_MODEL = SHARED / "models" / "cyto0_cp3.pth"
DEFAULT_CP3 = REPO / ".venv-cp3" / "bin" / "python"
MIN_AGREEMENT = 0.99
#: the small Cellpose-SAM both sides run (build_cpsam: embed_dim, depth, heads, out_chans, patch, tile)
CPSAM_SIZE = (192, 4, 3, 64, 8, 256)


# ---- the two children (each runs in its own process) --------------------------------------------
def child_ours(job: dict) -> dict:
    """``sa-deploy segment`` in this process, its stages timed."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from segment_vs_cellpose import our_targets
    from stage_timing import StageClock, patched

    import selfadapt_deploy.api as api
    from selfadapt_deploy.cli import app

    targets = {"open model": (api, "open_runner"), **our_targets()}
    args = ["segment", *job["images"], "--model", job["model"], "--out", job["out"], "--diameter",
            f"{job['diameter']:g}", "--device", "cpu",
            *(["--channels", ",".join(map(str, job["channels"]))] if job["channels"] else [])]
    clock = StageClock()
    with patched(clock, targets):
        try:
            app(args, standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise
    return clock.seconds


def child_cellpose3(job: dict) -> dict:
    """cellpose 3's ``CellposeModel.eval`` on every image, in cellpose's environment."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import tifffile
    from cellpose import dynamics, models, transforms, utils
    from stage_timing import StageClock, patched

    clock = StageClock()
    # the names of the matching stages of ours (segment_vs_cellpose.our_targets)
    targets = {"open model": (models, "CellposeModel"), "normalize": (transforms, "normalize_img"),
               "network": (models, "run_net"), "integrate": (dynamics, "follow_flows"),
               "assemble": (dynamics, "get_masks_torch"), "flow_qc": (dynamics, "remove_bad_flow_masks"),
               "cleanup": (utils, "fill_holes_and_remove_small_masks")}
    with patched(clock, targets):
        model = models.CellposeModel(gpu=False, pretrained_model=job["model"])
        channels = [job["channels"][0] + 1, 0] if job["channels"] else [0, 0]
        for path in job["images"]:
            image = tifffile.imread(path)
            masks, flows, _ = model.eval(image, diameter=job["diameter"], channels=channels,
                                         channel_axis=-1 if image.ndim == 3 else None)
            name = Path(path).name.split(".")[0]
            tifffile.imwrite(Path(job["out"]) / f"{name}_masks.tif", masks.astype("uint32"))
            if job.get("flows"):  # the untimed warm-up run keeps its flows for the parent
                import numpy as np

                np.savez(Path(job["flows"]) / f"{name}.npz", dP=flows[1], cellprob=flows[2],
                         niter=200 * job["diameter"] / model.diam_mean)  # eval's niter
    return clock.seconds


def child_cellpose4(job: dict) -> dict:
    """cellpose 4.2's ``CellposeModel.eval`` on every image, running the small Cellpose-SAM file
    (``job["model"]``) in this environment: cellpose 4.2 builds only the ViT-L from a file, so its
    ``CellposeModel`` is handed the same network (``tests.helpers.cellpose4_model``)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO))
    import tifffile
    from cellpose import dynamics, transforms, utils
    from stage_timing import StageClock, patched

    from selfadapt_deploy.models import load_model
    from tests.helpers import cellpose4_model

    clock = StageClock()
    model = cellpose4_model(clock.wrap("open model", load_model)(job["model"], "cpu").eval())
    targets = {"normalize": (transforms, "normalize_img"), "network": (model, "_run_net"),
               "integrate": (dynamics, "follow_flows"), "assemble": (dynamics, "get_masks_torch"),
               "flow_qc": (dynamics, "remove_bad_flow_masks"),
               "cleanup": (utils, "fill_holes_and_remove_small_masks")}
    with patched(clock, targets):
        for path in job["images"]:
            image = tifffile.imread(path)
            masks, _, _ = model.eval(image, diameter=job["diameter"], bsize=model.net.net.tile_size,
                                     channel_axis=-1 if image.ndim == 3 else None)
            name = Path(path).name.split(".")[0]
            tifffile.imwrite(Path(job["out"]) / f"{name}_masks.tif", masks.astype("uint32"))
    return clock.seconds


def run_child(python: str, which: str, job: dict, env: dict | None = None) -> tuple[float, dict, str]:
    """(whole-process seconds, stage seconds, the ``model:`` line sa-deploy printed) of one child."""
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    stages = Path(job["out"]) / "stages.json"
    tic = time.perf_counter()
    done = subprocess.run([python, __file__, f"--child-{which}", json.dumps(job), str(stages)],
                          check=True, env={**os.environ, "COLUMNS": "400", **(env or {})},
                          stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - tic
    said = [line for line in done.stdout.splitlines() if line.startswith("model:")]
    return seconds, json.loads(stages.read_text()), said[0] if said else ""


# ---- the parent ----------------------------------------------------------------------------------
def set_job(folder: Path, model: Path) -> dict:
    from selection_real import set_facts

    from selfadapt_deploy.io.readers import expand_inputs

    images = folder / "images" if (folder / "images").is_dir() else folder
    files = [p for p in expand_inputs([images]) if not p.name.split(".")[0].endswith("_masks")]
    diameter, channels = set_facts(folder)
    return {"images": [str(p) for p in files], "model": str(model), "diameter": round(diameter, 2),
            "channels": channels}


def agreement(ours: Path, reference: Path, images: list[str]) -> tuple[float, float]:
    import tifffile

    from selfadapt_deploy.metrics import average_precision, pooled

    results = []
    for path in images:
        name = f"{Path(path).name.split('.')[0]}_masks.tif"
        results.append(average_precision(tifffile.imread(reference / name), tifffile.imread(ours / name)))
    ap = pooled(results).ap
    return float(ap[0]), float(ap[1])


def cellpose4_masks(flows: Path, out: Path, images: list[str]) -> None:
    """cellpose 4.2's ``compute_masks`` on cellpose 3's own flows, written as label images: the
    masks cellpose 3's network gives under cellpose 4.2's post-processing, which sa-deploy follows.
    (On the CPU cellpose 3 follows flows with its own bilinear ``map_coordinates``; on a GPU, and in
    cellpose 4, with ``grid_sample``, which samples a fraction of a pixel apart, so cellpose 3's CPU
    masks differ from cellpose's GPU and 4.x masks by a few cells per image.)"""
    import numpy as np
    import tifffile
    from cellpose import dynamics

    out.mkdir(parents=True, exist_ok=True)
    for path in images:
        name = Path(path).name.split(".")[0]
        f = np.load(flows / f"{name}.npz")
        masks = dynamics.compute_masks(f["dP"], f["cellprob"], niter=int(f["niter"]), cellprob_threshold=0.0,
                                       flow_threshold=0.4, min_size=15, max_size_fraction=0.4)
        masks = masks[0] if isinstance(masks, tuple) else masks
        tifffile.imwrite(out / f"{name}_masks.tif", masks.astype("uint32"))


def alternate_pair(reference: tuple[str, str], job: dict, work: Path, repeats: int,
                   env: dict) -> tuple[dict[str, list[float]], dict[str, list[dict]], str]:
    """``repeats`` alternating runs of the reference child (python, name), then ours: seconds and
    stage seconds of each, and the ``model:`` line ours printed; outputs in ``work/<who><r>``."""
    said = ""
    times: dict[str, list[float]] = {"cellpose": [], "ours": []}
    stages: dict[str, list[dict]] = {"cellpose": [], "ours": []}
    for r in range(repeats):
        for who, python, child in (("cellpose", *reference), ("ours", sys.executable, "ours")):
            s, st, line = run_child(python, child, {**job, "out": str(work / f"{who}{r}")}, env)
            times[who].append(s)
            stages[who].append(st)
            said = line or said
    return times, stages, said


def print_times(times: dict[str, list[float]], stages: dict[str, list[dict]], label: str) -> dict:
    """The medians, the ratio and the per-stage table of one set; returns the medians."""
    med = {w: statistics.median(t) for w, t in times.items()}
    runs = {w: ", ".join(f"{t:.1f}" for t in ts) for w, ts in times.items()}
    print(f"  {label}: {med['cellpose']:.1f} s ({runs['cellpose']})   sa-deploy: {med['ours']:.1f} s "
          f"({runs['ours']})   ratio {med['cellpose'] / med['ours']:.2f}")
    print(f"  {'stage (median s)':<18} {label:>10} {'sa-deploy':>10}")
    names = list(dict.fromkeys([*stages["cellpose"][0], *stages["ours"][0]]))
    for name in [*names, "other"]:
        cells = []
        for w in ("cellpose", "ours"):
            values = [(t - sum(st.values())) if name == "other" else st.get(name, 0.0)
                      for t, st in zip(times[w], stages[w], strict=True)]
            cells.append(statistics.median(values))
        print(f"  {name:<18} {cells[0]:>10.2f} {cells[1]:>10.2f}")
    return med


def compare_cellpose3(sets: list[Path], args: argparse.Namespace, work: Path) -> tuple[dict, float]:
    """Every set with the Cellpose 3 weights against cellpose 3: (total medians, worst AP@0.5
    agreement with cellpose 4.2's masks from cellpose 3's flows)."""
    total = {"cellpose": 0.0, "ours": 0.0}
    worst = 1.0
    cache = {"SA_DEPLOY_CACHE": str(work / "cache")}  # empty: the first use exports
    for folder in sets:
        job = set_job(folder, args.model)
        here = work / "cp3" / folder.name
        print(f"\n{folder.name}: {len(job['images'])} images, diameter {job['diameter']:g}, "
              f"channels {job['channels'] or 'grey'}", flush=True)
        first, _, said_first = run_child(sys.executable, "ours", {**job, "out": str(here / "first")}, cache)
        flows = here / "cellpose3_flows"
        flows.mkdir(parents=True)
        run_child(args.cellpose3, "cellpose3", {**job, "out": str(here / "warm"), "flows": str(flows)})
        cellpose4_masks(flows, here / "cellpose4", job["images"])
        times, stages, said = alternate_pair((args.cellpose3, "cellpose3"), job, here, args.repeats, cache)
        med = print_times(times, stages, "cellpose 3")
        ap50, ap75 = agreement(here / "ours0", here / "cellpose0", job["images"])
        same50, same75 = agreement(here / "ours0", here / "cellpose4", job["images"])
        cp50, _ = agreement(here / "cellpose4", here / "cellpose0", job["images"])
        worst = min(worst, same50)
        for w in total:
            total[w] += med[w]
        print(f"  sa-deploy first use (empty graph cache): {first:.1f} s (ratio "
              f"{med['cellpose'] / first:.2f})\n    {said_first}\n  then:\n    {said}")
        print(f"  masks: AP@0.5 {ap50:.4f}, AP@0.75 {ap75:.4f} (sa-deploy against cellpose 3); "
              f"{same50:.4f}, {same75:.4f} against cellpose 4.2's masks from cellpose 3's flows "
              f"(cellpose 4.2 against cellpose 3 on the same flows: AP@0.5 {cp50:.4f})", flush=True)
    return total, worst


def compare_cellpose_sam(sets: list[Path], args: argparse.Namespace, work: Path) -> tuple[dict, float]:
    """Every set with a small random Cellpose-SAM (the same file both sides) against cellpose 4.2's
    ``eval``: (total medians, worst AP@0.5 agreement with cellpose 4.2's masks)."""
    from selfadapt_deploy.models import build_cpsam

    weights = work / "small_cpsam.pt"
    build_cpsam(*CPSAM_SIZE, seed=0).save(weights)
    total = {"cellpose": 0.0, "ours": 0.0}
    worst = 1.0
    for folder in sets:
        job = {**set_job(folder, weights), "channels": None}  # both take the image's channels
        here = work / "cpsam" / folder.name
        print(f"\n{folder.name} (Cellpose-SAM): {len(job['images'])} images, diameter "
              f"{job['diameter']:g}, the image's channels", flush=True)
        run_child(sys.executable, "cellpose4", {**job, "out": str(here / "warm")})  # numba caches
        times, stages, said = alternate_pair((sys.executable, "cellpose4"), job, here, args.repeats, {})
        med = print_times(times, stages, "cellpose 4.2")
        print(f"    {said}")
        ap50, ap75 = agreement(here / "ours0", here / "cellpose0", job["images"])
        worst = min(worst, ap50)
        for w in total:
            total[w] += med[w]
        print(f"  masks: AP@0.5 {ap50:.4f}, AP@0.75 {ap75:.4f} (sa-deploy against cellpose 4.2)",
              flush=True)
    return total, worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", nargs="*", type=Path)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--cellpose3", default=str(DEFAULT_CP3), help="python of cellpose 3's environment")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cellpose-sam", choices=["yes", "no", "only"], default="yes",
                    help="also (or only) compare a small Cellpose-SAM against cellpose 4.2")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    sets = args.sets or sorted(p for p in DEFAULT_SETS.iterdir() if p.is_dir())
    cp3 = args.cellpose_sam != "only"
    if cp3 and (not args.model.is_file() or not Path(args.cellpose3).is_file()):
        print(f"cpu_vs_cellpose: needs {args.model} and cellpose 3's python {args.cellpose3} (see the "
              "docstring); nothing run")
        return 0
    worst = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.cellpose_sam != "no":
            sam, sam_worst = compare_cellpose_sam(sets, args, work)
            worst = min(worst, sam_worst)
            print(f"\nall sets, small Cellpose-SAM: cellpose 4.2 {sam['cellpose']:.1f} s, sa-deploy "
                  f"{sam['ours']:.1f} s, ratio {sam['cellpose'] / sam['ours']:.2f}; worst AP@0.5 "
                  f"agreement {sam_worst:.4f}")
        if cp3:
            total, cp3_worst = compare_cellpose3(sets, args, work)
            worst = min(worst, cp3_worst)
            print(f"\nall sets: cellpose 3 {total['cellpose']:.1f} s, sa-deploy {total['ours']:.1f} s; worst "
                  f"AP@0.5 agreement with cellpose's masks from cellpose 3's flows {cp3_worst:.4f}")
            print(f"ratio={total['cellpose'] / total['ours']:.2f}")
    return 0 if worst >= MIN_AGREEMENT else 2


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1].startswith("--child-"):
        child = {"--child-ours": child_ours, "--child-cellpose3": child_cellpose3,
                 "--child-cellpose4": child_cellpose4}[sys.argv[1]]
        Path(sys.argv[3]).write_text(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
