"""The Python API: segment arrays, adapt and export from your own code, with the CLI's options.

``sa-deploy segment`` / ``adapt`` / ``export`` are thin layers over these functions
(:func:`segment_paths`, :func:`adapt`, :func:`export`; progress bars and exit codes are theirs);
errors are :class:`~selfadapt_deploy.errors.SaDeployError`
with the same one-line messages.

>>> from selfadapt_deploy.api import Segmenter
>>> with Segmenter("cyto3", device="cpu") as seg:
...     labels = seg.segment(image, diameter=30)  # Y×X uint16/uint32, as segment writes
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.readers import image_from_array, select_channels, stack_from_array
from selfadapt_deploy.io.writers import check_new_dir, label_dtype
from selfadapt_deploy.runner_choice import open_runner
from selfadapt_deploy.runtime.base import Runner
from selfadapt_deploy.runtime.torch_runner import resolve_device
from selfadapt_deploy.segment import Segmentation, SegmentParams, segment_images

if TYPE_CHECKING:
    from selfadapt_deploy.models.base import ModelSpec
    from selfadapt_deploy.trainer.run import RunInputs


class Segmenter:
    """One model opened once in one runtime; ``segment`` as many images as you like.

    ``model``: weights file, Cellpose name, adaptation run or export directory; ``runtime``,
    ``device``, ``precision``, ``onnx_provider`` and the torch options (``compile``,
    ``attention``, ``compile_cache``) as for ``sa-deploy segment``. ``defaults`` are
    :class:`SegmentParams` fields used by every call unless the call overrides them.
    """

    def __init__(self, model: str | Path, *, runtime: str = "auto", device: str = "auto",
                 precision: str = "auto", onnx_provider: str = "auto", compile: bool = False,
                 attention: str = "auto", compile_cache: Path | None = None, **defaults: Any):
        self.device = resolve_device(device)
        self.defaults = self._params(SegmentParams(), defaults)
        self.runner, self.description = open_runner(
            model, runtime, self.device, precision, onnx_provider=onnx_provider, compile=compile,
            attention=attention, compile_cache=compile_cache)
        self.runner.activate()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the runtime (GPU memory, sessions, engines)."""
        self.runner.deactivate()

    @staticmethod
    def _params(base: SegmentParams, changes: dict[str, Any]) -> SegmentParams:
        unknown = set(changes) - set(SegmentParams.__dataclass_fields__)
        if unknown:
            raise SaDeployError(f"unknown segmentation settings {sorted(unknown)}; use "
                                f"{', '.join(SegmentParams.__dataclass_fields__)}")
        return replace(base, **changes)

    def network_input(self, image: np.ndarray, channels: Sequence[int] | None = None,
                      channel_axis: int | None = None) -> np.ndarray:
        """``image`` (Y×X, Y×X×C or C×Y×X) as the C×Y×X the network takes, as segment reads files."""
        spec = self.runner.spec
        data = image_from_array(image, channel_axis)
        return select_channels(data, channels, spec.nchan, "image", pad=not spec.fewer_channels_ok)

    def segment_many(self, images: Sequence[np.ndarray], channels: Sequence[int] | None = None,
                     channel_axis: int | None = None, **settings: Any) -> list[Segmentation]:
        """Masks and network outputs of several images (small ones share network batches)."""
        if not self.runner.is_active:
            raise SaDeployError("this Segmenter was closed; open a new one")
        params = self._params(self.defaults, settings)
        data = [self.network_input(img, channels, channel_axis) for img in images]
        results = segment_images(self.runner, data, params, self.device)
        for seg in results:
            seg.masks = seg.masks.astype(label_dtype(seg.masks), copy=False)
        return results

    def segment_stack(self, stack: np.ndarray, stitch_threshold: float | None = None, *,
                      do_3d: bool = False, anisotropy: float = 1.0,
                      flow3d_smooth: Sequence[float] = (0.0,), channels: Sequence[int] | None = None,
                      z_axis: int = 0, channel_axis: int | None = None, **settings: Any) -> np.ndarray:
        """Z×Y×X labels of a Z-stack (Z×Y×X, or with channels): every plane segmented and masks of
        adjacent planes linked at IoU ≥ ``stitch_threshold``, or with ``do_3d`` segmented in 3-D —
        exactly ``sa-deploy segment --stitch-threshold`` / ``--do-3d`` (cellpose's modes)."""
        from selfadapt_deploy.batch import network_channels
        from selfadapt_deploy.volume import segment_3d, segment_stitched

        if not self.runner.is_active:
            raise SaDeployError("this Segmenter was closed; open a new one")
        if not (stitch_threshold or do_3d):
            raise SaDeployError("segment_stack needs a mode: stitch_threshold=T or do_3d=True")
        smooth = check_stack_options(stitch_threshold, False, None, do_3d, anisotropy, flow3d_smooth)
        data = network_channels(stack_from_array(stack, z_axis, channel_axis), self.runner, channels, "stack")
        params = self._params(self.defaults, settings)
        if do_3d:
            return segment_3d(self.runner, data, params, anisotropy, smooth)[0]
        return segment_stitched(self.runner, data, params, stitch_threshold, self.device)

    def segment(self, image: np.ndarray, channels: Sequence[int] | None = None,
                channel_axis: int | None = None, **settings: Any) -> np.ndarray:
        """Labels of one image (0 = background), exactly what ``sa-deploy segment`` writes for it.
        ``settings``: :class:`SegmentParams` fields (diameter, flow_threshold, ...)."""
        return self.segment_many([image], channels, channel_axis, **settings)[0].masks


def check_stack_options(stitch_threshold: float | None, planes: bool, z_axis: int | None,
                        do_3d: bool = False, anisotropy: float = 1.0,
                        flow3d_smooth: Sequence[float] = (0.0,)) -> tuple[float, float, float]:
    """The Z-stack options make sense together, before any work; the (Z, Y, X) smoothing sigmas."""
    from selfadapt_deploy.volume import check_anisotropy, check_flow3d_smooth, check_stitch_threshold

    smooth = check_flow3d_smooth(flow3d_smooth)
    check_anisotropy(anisotropy)
    modes = [name for name, on in (("--stitch-threshold", stitch_threshold), ("--do-3d", do_3d),
                                   ("--planes", planes)) if on]
    if len(modes) > 1:
        raise SaDeployError(f"{' and '.join(modes)} are different stack modes; choose one")
    if (anisotropy != 1.0 or any(smooth)) and not do_3d:
        raise SaDeployError("--anisotropy and --flow3d-smooth apply to --do-3d; add it or drop them")
    if stitch_threshold:
        check_stitch_threshold(stitch_threshold)
    elif z_axis is not None and not planes and not do_3d:
        raise SaDeployError(f"--z-axis {z_axis} names the Z axis of stacks, but no stack mode is "
                            "given: add --stitch-threshold T (planes linked in 3-D), --do-3d or --planes")
    return smooth


def segment_paths(images: Sequence[str | Path], out: str | Path, *, model: str | Path | None = None,
                  runner: tuple[Runner, str] | None = None, device: str = "auto",
                  runtime: str = "auto", precision: str = "auto", onnx_provider: str = "auto",
                  compile: bool = False, attention: str = "auto", compile_cache: Path | None = None,
                  channels: Sequence[int] | None = None, channel_axis: int | None = None,
                  series: int | None = None, save_flows: bool = False, overwrite: bool = False,
                  stream: bool | None = None, block_size: int = 2048, halo: int = 0,
                  out_format: str = "tiff", resume: bool = False, dask: str | None = None,
                  stitch_threshold: float | None = None, planes: bool = False,
                  z_axis: int | None = None, do_3d: bool = False, anisotropy: float = 1.0,
                  flow3d_smooth: Sequence[float] = (0.0,),
                  block_progress: Callable[[Path, int, int], None] | None = None,
                  stack_progress: Callable[[Path, int, int], None] | None = None,
                  report: Callable[[str], None] | None = None, **settings: Any) -> Iterator[tuple]:
    """``sa-deploy segment``: label image files (and folders of them) into ``out``. Images that fit
    in memory go through the batched pipeline; larger ones (by :func:`wsi.memory.choose`; all with
    ``stream``, none with ``stream=False``; OME-Zarr always) stream block by block, on this machine
    or dask workers (``dask``). Every option is checked
    before any work. ``model`` opens a runner as :class:`Segmenter` does; ``runner`` is an
    already made (runner, description) instead (``segment --triton``). ``settings``:
    :class:`SegmentParams` fields. Yields, in order: ``("model", description, device)``; one
    ``("choice", path, StreamChoice)`` per image whose whole-or-streamed choice is worth saying; one
    ``("slide", path, summary | SaDeployError)`` per streamed slide (``block_progress(path, done,
    total)`` as its blocks finish); ``("images", n)``; one ``("image", ImageResult)`` per image read
    whole (a failed image is a result, the others go on). ``report`` is told, before it starts,
    of a one-time export into the graph cache (``--runtime auto`` on the CPU). Z-stacks (a Z axis
    in the file, or ``z_axis``) are refused unless ``stitch_threshold`` links their planes' masks
    into 3-D labels (cellpose's ``stitch_threshold``), ``do_3d`` segments them in 3-D (cellpose's
    ``do_3D`` with ``anisotropy`` and ``flow3d_smooth``) or ``planes`` segments each plane as its own
    image; stacks are read whole (``stack_progress(path, planes done, planes)`` as they go)."""
    from selfadapt_deploy.batch import SegmentJob, segment_files
    from selfadapt_deploy.io.readers import expand_inputs, image_pixels, stack_headers
    from selfadapt_deploy.io.writers import ensure_writable_dir
    from selfadapt_deploy.postprocess.integrate import resolve_integrator
    from selfadapt_deploy.segment import rescale_factor, use_device_pipeline
    from selfadapt_deploy.wsi import segment_slide
    from selfadapt_deploy.wsi.memory import choose
    from selfadapt_deploy.wsi.slide import split_inputs, streamable
    from selfadapt_deploy.wsi.stream import StreamSettings, output_path

    if (model is None) == (runner is None):
        raise SaDeployError("give --model, or --triton URL to run the network on a Triton server")
    if runner is not None and dask is not None:
        raise SaDeployError("--triton runs the network on one server; drop --dask")
    if dask is not None and stream is False:
        raise SaDeployError("--dask streams every image's blocks to its workers; drop --no-stream")
    smooth = check_stack_options(stitch_threshold, planes, z_axis, do_3d, anisotropy,
                                 flow3d_smooth)
    out = Path(out)
    params = Segmenter._params(SegmentParams(), settings)
    picked = list(channels) if channels is not None else None
    stream_settings = StreamSettings(block_size, halo, out_format, resume, overwrite, dask)
    files = expand_inputs([Path(p) for p in images])
    output_path(out, "x", out_format)  # a bad --out-format fails before any work
    # with dask the workers run the network (every TIFF and OME-Zarr streams): here the model only
    # describes itself (CPU), unless other files are read whole here
    dev = resolve_device("cpu" if dask and all(map(streamable, files)) else device)
    resolve_integrator(params.integrator, dev)  # an unusable choice fails before any work
    torch_options = dict(compile=compile, attention=attention, compile_cache=compile_cache)
    if runner is None:
        def job_mpx(spec) -> float | None:  # what the one-time export of --runtime auto weighs
            pixels = [image_pixels(f, series) for f in files]
            rescale = rescale_factor(spec, params.diameter)
            return None if None in pixels else sum(pixels) * rescale**2 / 1e6

        runner = open_runner(model, runtime, dev, precision, onnx_provider=onnx_provider,
                             job_mpx=job_mpx, report=report, **torch_options)
    the_runner, description = runner
    use_device_pipeline(params, the_runner.device)  # a bad --pipeline fails here too
    spec = the_runner.spec
    mode = "stream" if stream or dask is not None else "whole" if stream is False else "auto"
    rescale = rescale_factor(spec, params.diameter)
    headers = {f: stack_headers(f, series, z_axis) for f in files} if stitch_threshold or planes or do_3d \
        else {}  # one header read per file: which are stacks, and what they need
    stacks = [f for f, h in headers.items() if z_axis is not None or any(z > 1 for z, *_ in h)]
    if stacks and stream:
        raise SaDeployError(f"--stream streams 2-D slides, but {stacks[0]} is a Z-stack (read whole, "
                            "plane by plane); drop --stream")
    if stitch_threshold or do_3d:  # one that cannot fit fails first
        check_stacks_fit({f: headers[f] for f in stacks}, spec, rescale, anisotropy if do_3d else None,
                         flows=save_flows)
    in_memory, slides, choices = split_inputs(
        [f for f in files if f not in stacks], series,
        lambda ly, lx: choose(ly, lx, spec.nchan, rescale, mode, block=block_size))
    in_memory = [f for f in files if f in stacks or f in in_memory]  # input order kept
    if slides and channel_axis is not None:  # the block reader takes axes from the file only
        raise SaDeployError(f"--channel-axis applies to images read whole, but {slides[0][0]} "
                            "streams block by block, with the axes its own metadata records; drop "
                            "--channel-axis (or record the axes in the file)")
    ensure_writable_dir(out)
    if in_memory or not dask:
        the_runner.activate()  # a provider, engine or device that cannot run fails before any image
    runner_args = dict(model=model, runtime=runtime, device=device, precision=precision,
                       onnx_provider=onnx_provider, **torch_options)
    try:
        yield "model", description, dev
        for path, choice in choices:
            yield "choice", path, choice
        for path, index in slides:
            def progress(done: int, total: int, _result: dict, path: Path = path) -> None:
                if block_progress is not None:
                    block_progress(path, done, total)

            try:
                summary = segment_slide(path, the_runner, out, params, stream_settings, index, picked,
                                        runner_args, progress)
            except SaDeployError as exc:
                summary = exc
            yield "slide", path, summary
        yield "images", len(in_memory)
        if in_memory:
            job = SegmentJob(the_runner, out, params, dev, picked, save_flows, overwrite,
                             stitch_threshold, z_axis, planes, do_3d, anisotropy, smooth, out_format)
            for result in segment_files(in_memory, job, channel_axis, series, stack_progress):
                yield "image", result
    finally:
        the_runner.deactivate()


def adapt(images: Sequence[str | Path], model: str | Path, out: str | Path, *,
          diameter: float | None = None, channels: Sequence[int] | None = None,
          channel_axis: int | None = None, series: int | None = None,
          val: Sequence[str | Path] = (), val_fraction: float = 0.2, keep_snapshots: bool = True,
          labelled: Sequence[str] = (), val_labelled: Sequence[str] = (), source: Sequence[str] = (),
          model2: str | None = None, z_axis: int | None = None, anisotropy: float = 1.0,
          flow3d_smooth: Sequence[float] = (0.0,), device: str = "auto",
          report: Callable[[str], None] = print,
          progress: Callable[[int, dict], None] | None = None, **options: Any) -> dict:
    """Adapt ``model`` to ``images`` into the new run directory ``out``; returns the run summary
    (``run.json``). ``options`` are :class:`~selfadapt_deploy.trainer.loop.AdaptConfig` fields
    (iterations, lr, stop, method, ...); ``labelled`` implies ``method="actis"``. The older
    spellings ``labeled``, ``val_labeled`` and ``labeled_fraction`` are accepted too. Z-stacks
    (axes recorded, or ``z_axis``) are trained on as their YX, ZX and ZY planes, Z resized by
    ``anisotropy``; held-out stacks score every candidate in 3-D at that anisotropy, flows smoothed
    by ``flow3d_smooth`` (give what ``segment --do-3d`` will use)."""
    from selfadapt_deploy.trainer.config import AdaptConfig, respelled
    from selfadapt_deploy.trainer.run import SETTINGS, RunInputs
    from selfadapt_deploy.trainer.selection import resolve_rule

    out = check_new_dir(Path(out), "--out", if_used=f", or continue it with --resume {out}"
                        if (Path(out) / SETTINGS).is_file() else "")
    options = respelled(options)
    labelled = options.pop("labelled", labelled)
    val_labelled = options.pop("val_labelled", val_labelled)
    if labelled and options.get("method", "selfadapt") == "selfadapt":
        options["method"] = "actis"
    try:
        config = AdaptConfig(**options)
    except TypeError as exc:  # an unknown option
        raise SaDeployError(f"adapt: {exc}") from None
    if config.method == "actis" and not labelled:
        raise SaDeployError("--method actis adapts with labelled target images: give --labelled")
    resolve_rule(config.select, bool(val_labelled))  # a rule that needs labels refuses before any work
    inputs = RunInputs(images=images, model=model, config=config, diameter=diameter or None,
                       channels=channels, channel_axis=channel_axis, series=series, val_images=val,
                       val_fraction=val_fraction, keep_snapshots=keep_snapshots, labelled=labelled,
                       val_labelled=val_labelled, source=source, model2=model2, z_axis=z_axis,
                       anisotropy=anisotropy, flow3d_smooth=flow3d_smooth)
    return _run(inputs, out, False, device, report, progress)


def resume(run: str | Path, *, device: str = "auto", report: Callable[[str], None] = print,
           progress: Callable[[int, dict], None] | None = None) -> dict:
    """Continue the interrupted adaptation run ``run`` with the settings it was started with."""
    from selfadapt_deploy.trainer.run import RunInputs

    return _run(RunInputs.load(Path(run)), Path(run), True, device, report, progress)


def _run(inputs, out: Path, resume: bool, device: str, report: Callable[[str], None],
         progress: Callable[[int, dict], None] | None) -> dict:
    from selfadapt_deploy.trainer.run import run_adapt

    if inputs.config.teacher_runtime == "tensorrt":  # fail before any work without it
        from selfadapt_deploy.runtime.trt_runner import import_tensorrt

        import_tensorrt()
    return run_adapt(inputs, out, resolve_device(device), resume, report, progress,
                     before_reading=functools.partial(check_held_out_stacks_fit, inputs))


def check_stacks_fit(headers: dict[Path, list[tuple[int, int, int, int]]], spec: ModelSpec,
                     rescale: float, anisotropy: float | None, flows: bool = False,
                     instead: str | None = None) -> None:
    """``memory.check_stack_fits`` for every series of every stack in ``headers`` (path → its
    series' (planes, Y, X, stored bytes)): the first that would not fit is one clear error."""
    from selfadapt_deploy.wsi import memory

    for path, series in headers.items():
        for planes, ly, lx, stored in series:
            memory.check_stack_fits(path, planes, ly, lx, stored, spec.nchan, rescale, anisotropy,
                                    flows=flows, instead=instead)


def check_held_out_stacks_fit(inputs: RunInputs, spec: ModelSpec) -> None:
    """Held-out Z-stacks are segmented in 3-D at every evaluation (candidates are scored as a run
    on volumes is used): one that would not fit fails before any image is read, with the estimate
    ``segment --do-3d`` uses. Without ``--val`` any input stack may be held out."""
    from selfadapt_deploy.io.readers import expand_inputs, stack_headers
    from selfadapt_deploy.segment import rescale_factor

    files = expand_inputs(inputs.val_images or inputs.images)
    stacks = {f: [h for h in stack_headers(f, inputs.series, inputs.z_axis) if h[0] > 1] for f in files}
    check_stacks_fit({f: h for f, h in stacks.items() if h}, spec, rescale_factor(spec, inputs.diameter),
                     inputs.anisotropy,
                     instead="a smaller --anisotropy, or a cropped stack held out with --val")


def export(model: str | Path, out: str | Path, *, precision: str = "fp32", trt: bool = False,
           max_batch: int = 8, opset: int | None = None, engines_from: Path | None = None,
           validate_on: Sequence[str | Path | np.ndarray] = (), channels: Sequence[int] | None = None,
           triton_repo: str | Path | None = None, bioimageio: str | Path | None = None,
           authors: Sequence[str] = ("sa-deploy user",), license: str = "BSD-3-Clause",
           device: str = "cuda", report: Callable[[str], None] = print):
    """Export ``model`` to ONNX (network and teacher-TTA graphs; TensorRT engines with ``trt``)
    into the new directory ``out``, validated against torch; returns its manifest.
    ``validate_on``: image files, or C×Y×X arrays with the network's channels (default: generated
    cells); ``channels`` picks the files' channels as in segment. ``triton_repo``: also write the
    network as a Triton model repository there (``export/triton_repo.py``); ``bioimageio``: also
    write a bioimage.io model package there, with ``authors`` and ``license`` in its rdf.yaml
    (``export/bioimageio.py``)."""
    from selfadapt_deploy.export.exporter import export_model
    from selfadapt_deploy.export.triton_repo import write_triton_repo
    from selfadapt_deploy.io.readers import read_network_images
    from selfadapt_deploy.models import load_model

    if triton_repo is not None:  # refuse before any work
        check_new_dir(Path(triton_repo), "--triton-repo")
    if bioimageio is not None:
        from selfadapt_deploy.export.bioimageio import require_spec

        check_new_dir(Path(bioimageio), "--bioimageio")
        require_spec()

    arrays = [v for v in validate_on if isinstance(v, np.ndarray)]
    files = [v for v in validate_on if not isinstance(v, np.ndarray)]
    if files:
        net = load_model(model, "cpu")
        arrays += read_network_images(files, net.nchan, net.pads_missing_channels, channels, None, None)
        if not arrays:
            raise SaDeployError("--validate-on: no readable images")
    manifest = export_model(str(model), Path(out), precision, opset, max_batch, trt, device, arrays,
                            report=report, engines_from=engines_from)
    if triton_repo is not None:
        names = write_triton_repo(Path(out), Path(triton_repo))
        report(f"Triton model repository → {triton_repo}: {', '.join(names)}")
    if bioimageio is not None:
        from selfadapt_deploy.export.bioimageio import write_bioimageio_package

        rdf = write_bioimageio_package(Path(out), Path(bioimageio), authors, license)
        report(f"bioimage.io package → {rdf} (validated by bioimageio.spec)")
    return manifest
