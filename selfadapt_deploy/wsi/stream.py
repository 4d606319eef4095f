"""Streaming segmentation of a slide larger than memory, block by block, with bounded memory.

1. **Plan**: the block grid, the halo, and the slide's normalisation — cellpose's percentiles,
   computed once from the same strided subsample cellpose takes of a large image, read band by
   band (per-block percentiles would make seams). Saved with the settings in ``plan.json``.
2. **Blocks** (any runner; in this process or on dask workers): each block's region (core +
   halo) goes through the ordinary pipeline; its core's labels go to a chunk of a zarr store of
   local labels, its core ± a strip to ``blocks/<key>.npz``, written last and atomically — the
   marker that the block is done, so an interrupted slide resumes from its finished blocks.
3. **Stitch** (:mod:`wsi.stitch`): labels matched across every border, numbered 1..N.
4. **Write** the label image band by band (:mod:`wsi.output`) and a JSON summary.

Peak memory depends on the block size (and the slide's width, for one band of rows), never on
the slide's area.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.normalize import apply_percentiles, percentiles, subsample_steps
from selfadapt_deploy.io.readers import select_channels
from selfadapt_deploy.io.writers import OUT_FORMATS, atomic_path
from selfadapt_deploy.models.base import ModelSpec
from selfadapt_deploy.runtime.base import Runner
from selfadapt_deploy.segment import SegmentParams, segment_images
from selfadapt_deploy.wsi.output import final_band, write_bigtiff, write_ome_zarr
from selfadapt_deploy.wsi.plan import TILE, Block, block_grid, default_halo
from selfadapt_deploy.wsi.slide import Slide, open_slide, slide_info
from selfadapt_deploy.wsi.stitch import UnionFind, cut_labels, final_numbering, matching_labels

STRIP = 8  # pixels each side of a border on which neighbouring blocks' labels are matched
WORK_SUFFIX = ".sa-deploy-work"


@dataclass(frozen=True)
class StreamSettings:
    """How a slide is streamed (``segment --block-size/--halo/--out-format/--resume/--dask``)."""

    block_size: int = 2048
    halo: int = 0  # 0 → default_halo(diameter)
    out_format: str = "tiff"
    resume: bool = False
    overwrite: bool = False
    dask: str | None = None  # scheduler address, or local:N


@dataclass(frozen=True)
class Plan:
    """Everything a block needs, on any machine (``plan.json`` in the work directory)."""

    work: str
    slide: dict
    series: int | None
    channels: list[int] | None
    params: dict
    spec: dict
    block_size: int
    halo: int
    lo: list[float]
    hi: list[float]
    flat: list[bool]

    @property
    def blocks(self) -> list[Block]:
        return block_grid(self.slide["height"], self.slide["width"], self.block_size, self.halo)

    def segment_params(self) -> SegmentParams:
        return SegmentParams(**self.params)

    def settings_key(self) -> dict:
        """What must be equal for a resumed run to continue this one."""
        return {k: v for k, v in asdict(self).items() if k not in ("work", "lo", "hi", "flat")}


def network_channels(raw: np.ndarray, channels: Sequence[int] | None, spec: ModelSpec,
                     where: str) -> np.ndarray:
    """The channels the network sees, as for a whole image (``select_channels``)."""
    return select_channels(raw, channels, spec.nchan, where, pad=not spec.fewer_channels_ok)


def slide_normalisation(slide: Slide, channels: Sequence[int] | None, spec: ModelSpec
                        ) -> tuple[list[float], list[float], list[bool]]:
    """Per network channel (lo, hi, flat): exactly what ``normalize_image`` computes for the whole
    image — the percentiles of cellpose's strided subsample — read in bands of rows."""
    h, w = slide.height, slide.width
    sy, sx = subsample_steps((h, w))
    samples: list[list[np.ndarray]] = []
    lows: list[float] = []
    highs: list[float] = []
    for y0 in range(0, h, TILE):
        y1 = min(y0 + TILE, h)
        band = network_channels(slide.read(y0, y1, 0, w), channels, spec, str(slide.source))
        if not samples:
            samples = [[] for _ in band]
            lows, highs = [np.inf] * len(band), [-np.inf] * len(band)
        first = (-y0) % sy  # first row of the band on the global stride
        for c, plane in enumerate(band):
            samples[c].append(plane[first::sy, ::sx].astype(np.float32))
            lows[c], highs[c] = min(lows[c], float(plane.min())), max(highs[c], float(plane.max()))
    lo, hi = [], []
    for c in range(len(samples)):
        p_lo, p_hi = percentiles(np.concatenate(samples[c]))
        lo.append(float(p_lo))
        hi.append(float(p_hi))
    return lo, hi, [not highs[c] > lows[c] for c in range(len(samples))]


def normalise_region(raw: np.ndarray, plan: Plan) -> np.ndarray:
    """A region's network channels with the slide's percentiles (float32, cellpose's arithmetic)."""
    out = np.zeros(raw.shape, np.float32)
    for c in range(raw.shape[0]):
        if not plan.flat[c]:
            out[c] = apply_percentiles(raw[c].astype(np.float32),
                                       np.float32(plan.lo[c]), np.float32(plan.hi[c]))
    return out


def work_dir(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}{WORK_SUFFIX}"


def output_path(out_dir: Path, name: str, out_format: str) -> Path:
    if out_format not in OUT_FORMATS:
        raise SaDeployError(f"--out-format must be one of {', '.join(OUT_FORMATS)}, got '{out_format}'")
    return out_dir / f"{name}{OUT_FORMATS[out_format]}"


# ---- blocks ------------------------------------------------------------------------------------
def run_block(plan: Plan, block: Block, runner: Runner, slide: Slide) -> dict:
    """Segment one block's region, keep its core (zarr chunk) and core ± strip (npz marker)."""
    import zarr

    t0 = time.perf_counter()
    raw = slide.read(block.ry0, block.ry1, block.rx0, block.rx1)
    x = normalise_region(network_channels(raw, plan.channels, runner.spec, str(slide.source)), plan)
    t1 = time.perf_counter()
    area = plan.slide["height"] * plan.slide["width"]
    region_area = (block.ry1 - block.ry0) * (block.rx1 - block.rx0)
    # masks above max_size_fraction of the *slide* go, as for the whole image
    params = replace(plan.segment_params(), normalize=False,
                     max_size_fraction=plan.segment_params().max_size_fraction * area / region_area)
    seg = segment_images(runner, [x], params)[0]
    t2 = time.perf_counter()
    masks = seg.masks.astype(np.uint32)
    core = (slice(block.y0 - block.ry0, block.y1 - block.ry0),
            slice(block.x0 - block.rx0, block.x1 - block.rx0))
    h, w = plan.slide["height"], plan.slide["width"]
    open_edges = (block.ry0 > 0, block.ry1 < h, block.rx0 > 0, block.rx1 < w)
    cut = cut_labels(masks, core, open_edges)
    ext = (max(block.ry0, block.y0 - STRIP), min(block.ry1, block.y1 + STRIP),
           max(block.rx0, block.x0 - STRIP), min(block.rx1, block.x1 + STRIP))
    local = zarr.open_array(str(Path(plan.work) / "local.zarr"), mode="r+")
    local[block.y0 : block.y1, block.x0 : block.x1] = masks[core]
    seconds = {"read": t1 - t0, "network": seg.timings.get("network", 0.0),
               "masks": seg.timings.get("masks", 0.0), "segment": t2 - t1}
    marker = Path(plan.work) / "blocks" / f"{block.key}.npz"
    with atomic_path(marker) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, ext=masks[ext[0] - block.ry0 : ext[1] - block.ry0,
                                         ext[2] - block.rx0 : ext[3] - block.rx0],
                            ext_box=np.array(ext), n=np.array(int(masks.max(initial=0))),
                            core_labels=np.unique(masks[core][masks[core] > 0]),
                            cut=np.array(len(cut)), seconds=np.array(json.dumps(seconds)))
    seconds["save"] = time.perf_counter() - t2
    return {"block": block.key, "objects": int(masks.max(initial=0)), "cut": len(cut), "seconds": seconds}


def run_planned_block(work: str, block: Block, runner: Runner,
                      slide_for: Callable[[str, int | None], Slide]) -> dict:
    """``run_block`` where only the work directory is known (a dask worker): the plan is read
    from its ``plan.json``, the slide opened (or reused) by ``slide_for(path, series)``."""
    plan = Plan(**json.loads((Path(work) / "plan.json").read_text()))
    return run_block(plan, block, runner, slide_for(plan.slide["source"], plan.series))


def _done(plan: Plan) -> set[str]:
    return {p.stem for p in (Path(plan.work) / "blocks").glob("*.npz")}


# ---- stitching and output ----------------------------------------------------------------------
def stitch(plan: Plan) -> tuple[list[np.ndarray], int, int]:
    """(per-block lookups local → final label, objects, cut objects) from the saved blocks."""
    blocks = plan.blocks
    folder = Path(plan.work) / "blocks"
    meta = []
    for block in blocks:
        with np.load(folder / f"{block.key}.npz") as d:
            meta.append((int(d["n"]), d["core_labels"].astype(np.int64), int(d["cut"])))
    offsets = np.concatenate([[0], np.cumsum([n for n, _, _ in meta])])
    uf = UnionFind(int(offsets[-1]) + 1)
    index = {(b.row, b.col): b for b in blocks}
    for a in blocks:
        for b in (index.get((a.row, a.col + 1)), index.get((a.row + 1, a.col))):
            if b is None:
                continue
            if b.col != a.col:  # vertical border at x = a.x1: rows of the block row
                box = (a.y0, a.y1, a.x1 - STRIP, a.x1 + STRIP)
            else:  # horizontal border at y = a.y1
                box = (a.y1 - STRIP, a.y1 + STRIP, a.x0, a.x1)
            for la, lb in matching_labels(_strip(folder, a, box), _strip(folder, b, box)):
                uf.union(int(offsets[a.index]) + la, int(offsets[b.index]) + lb)
    mappings = final_numbering(offsets, [labels for _, labels, _ in meta], uf)
    objects = max((int(m.max(initial=0)) for m in mappings), default=0)
    return mappings, objects, sum(cut for _, _, cut in meta)


def _strip(folder: Path, block: Block, box: tuple[int, int, int, int]) -> np.ndarray:
    """A block's labels on ``box`` (inside its core ± strip, clipped to the slide)."""
    with np.load(folder / f"{block.key}.npz") as d:
        ext, (ey0, ey1, ex0, ex1) = d["ext"], d["ext_box"]
    y0, y1, x0, x1 = max(box[0], ey0), min(box[1], ey1), max(box[2], ex0), min(box[3], ex1)
    return ext[y0 - ey0 : y1 - ey0, x0 - ex0 : x1 - ex0]


def peak_rss_bytes() -> int:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# ---- the whole slide -----------------------------------------------------------------------------
def prepare_plan(slide: Slide, spec: ModelSpec, params: SegmentParams, settings: StreamSettings,
                 out_dir: Path, series: int | None, channels: Sequence[int] | None) -> Plan:
    """The run's plan: a resumed run's, when it matches, else a new one (percentiles computed)."""
    work = work_dir(out_dir, slide.name)
    diameter_px = params.diameter or spec.default_diameter
    halo = settings.halo or default_halo(diameter_px)
    key = dict(work=str(work), slide=slide_info(slide), series=series,
               channels=list(channels) if channels is not None else None, params=asdict(params),
               spec=spec.to_dict(), block_size=settings.block_size, halo=halo)
    block_grid(slide.height, slide.width, settings.block_size, halo)  # bad sizes fail here
    if work.exists() and not (work / "plan.json").exists():
        shutil.rmtree(work)  # stopped before its plan was written: no finished block in it
    if work.exists():
        if settings.overwrite:
            shutil.rmtree(work)
        elif not settings.resume:
            raise SaDeployError(f"{work} holds an interrupted run of {slide.source}; pass --resume to "
                                "continue it or --overwrite to start again")
        else:
            saved = Plan(**json.loads((work / "plan.json").read_text()))
            new = {k: v for k, v in key.items() if k != "work"}
            if saved.settings_key() != new:
                changed = sorted(k for k in new if saved.settings_key().get(k) != new[k])
                raise SaDeployError(f"{work}: the interrupted run used other {', '.join(changed)}; run "
                                    "with the same settings, or with --overwrite to start again")
            return saved
    import zarr  # (--resume without an interrupted run simply starts one)

    lo, hi, flat = slide_normalisation(slide, channels, spec)
    plan = Plan(**key, lo=lo, hi=hi, flat=flat)
    (work / "blocks").mkdir(parents=True)
    zarr.create_array(str(work / "local.zarr"), shape=(slide.height, slide.width),
                      chunks=(settings.block_size, settings.block_size), dtype=np.uint32, fill_value=0)
    with atomic_path(work / "plan.json") as tmp:
        tmp.write_text(json.dumps(asdict(plan), indent=1))
    return plan


def segment_slide(path: Path, runner: Runner, out_dir: Path, params: SegmentParams,
                  settings: StreamSettings = StreamSettings(), series: int | None = None,
                  channels: Sequence[int] | None = None, runner_args: dict | None = None,
                  progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Stream one slide to ``<name>_masks.tif`` / ``.ome.zarr`` and ``<name>_summary.json`` in
    ``out_dir``; returns the summary. ``runner`` runs the blocks here (it must be active), or
    only describes the model when ``settings.dask`` sends blocks to workers, which open their own
    runner from ``runner_args`` (``open_runner``'s arguments) once each."""
    t_start = time.perf_counter()
    slide = open_slide(path, series)
    try:
        target = output_path(out_dir, slide.name, settings.out_format)
        if target.exists() and not settings.overwrite:
            return {"source": str(path), "output": str(target), "status": "skipped"}
        plan = prepare_plan(slide, runner.spec, params, settings, out_dir, series, channels)
        t_plan = time.perf_counter()
        blocks = plan.blocks
        done = _done(plan)
        todo = [b for b in blocks if b.key not in done]
        totals: dict[str, float] = {}
        if progress is not None:
            progress(len(blocks) - len(todo), len(blocks), {})
        if settings.dask:
            from selfadapt_deploy.wsi.distributed import run_blocks_on_dask

            results = run_blocks_on_dask(settings.dask, plan.work, todo, runner_args or {},
                                         run_planned_block)
        else:
            results = (run_block(plan, block, runner, slide) for block in todo)
        for k, result in enumerate(results, start=1):
            for stage, seconds in result["seconds"].items():
                totals[stage] = totals.get(stage, 0.0) + seconds
            if progress is not None:
                progress(len(blocks) - len(todo) + k, len(blocks), result)
        t_blocks = time.perf_counter()
        mappings, objects, cut = stitch(plan)
        t_stitch = time.perf_counter()
        import zarr

        local = zarr.open_array(str(Path(plan.work) / "local.zarr"), mode="r")
        band = final_band(local, blocks, mappings)
        if settings.out_format == "zarr":
            write_ome_zarr(target, band, slide.height, slide.width, slide.name)
        else:
            write_bigtiff(target, band, slide.height, slide.width)
        t_write = time.perf_counter()
    finally:
        slide.close()
    summary = {
        "source": str(path), "output": str(target), "status": "done", "format": settings.out_format,
        "height": slide.height, "width": slide.width, "objects": objects,
        "blocks": {"total": len(blocks), "computed": len(todo), "resumed": len(blocks) - len(todo),
                   "block_size": plan.block_size, "halo": plan.halo,
                   "workers": settings.dask or "this process"},
        "seconds": {"plan (percentiles)": t_plan - t_start, "blocks": t_blocks - t_plan,
                    **{f"blocks: {k}": v for k, v in totals.items()},
                    "stitch": t_stitch - t_blocks, "write": t_write - t_stitch,
                    "total": t_write - t_start},
        "peak_rss_bytes": peak_rss_bytes(), "cut_objects": cut,
        "warnings": [] if not cut else [
            f"{cut} objects reached the edge of a block's context (halo {plan.halo} px) and may be "
            f"cut at block borders; run again with a larger --halo (e.g. {2 * plan.halo}) or a "
            "smaller --diameter"],
    }
    with atomic_path(out_dir / f"{slide.name}_summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(plan.work, ignore_errors=True)
    return summary


