"""An export directory as a bioimage.io model package (``export --bioimageio DIR``).

The package holds the network graph (tiles → dY, dX, cell-probability logit) as ONNX and
TorchScript weights, described in ``rdf.yaml`` (bioimage.io model spec 0.5) with cellpose's
per-channel 1–99th percentile normalisation as ``scale_range`` preprocessing, test input/output
tensors computed here with sa-deploy's own normalisation, a cover image and documentation. Masks
come from the flows by cellpose's dynamics (or ``sa-deploy segment``); bioimage.io runs only the
network. Needs the ``bioimageio`` extra (``bioimageio.spec``).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.normalize import normalize_image
from selfadapt_deploy.io.writers import atomic_dir
from selfadapt_deploy.manifest import read_manifest, verified_file
from selfadapt_deploy.models import family_class, load_model
from selfadapt_deploy.models.base import ModelSpec
from selfadapt_deploy.runtime.base import MODEL_GRAPH
from selfadapt_deploy.runtime.graphs import graph_module
from selfadapt_deploy.synthetic import random_labels, render

OUTPUT_CHANNELS = ["dY", "dX", "cellprob"]


def require_spec() -> None:
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise SaDeployError("--bioimageio needs the bioimageio extra: pip install 'sa-deploy[bioimageio]'"
                            ) from None


def test_input(spec: ModelSpec, channels: int, seed: int = 0) -> np.ndarray:
    """1×C×T×T float32 raw cells at the tile size: channel 0 holds cells, the others zeros (a
    one-channel image on a two-channel Cellpose 3 model, as cellpose pads it)."""
    side = spec.tile_size
    cells = render(random_labels((side, side), max(4, side // 12), seed=seed), seed=seed) * 1000
    x = np.zeros((1, channels, side, side), np.float32)
    x[0, 0] = cells
    return x


def write_bioimageio_package(export_dir: Path, out: Path, authors: Sequence[str] = ("sa-deploy user",),
                             license: str = "BSD-3-Clause", name: str | None = None) -> Path:
    """Write the bioimage.io package of the export in ``export_dir`` into the new directory
    ``out`` (atomically); returns the path of its ``rdf.yaml``, validated by bioimageio.spec."""
    require_spec()
    from bioimageio.spec import ValidationContext, load_description, save_bioimageio_package_as_folder

    manifest = read_manifest(export_dir)
    spec = ModelSpec(**manifest.spec)
    onnx_artifact = next((a for a in manifest.artifacts
                          if a.graph == MODEL_GRAPH.name and a.format == "onnx"), None)
    if onnx_artifact is None:
        raise SaDeployError(f"{export_dir}: holds no ONNX graph of the network; re-export it")
    net = load_model(export_dir, "cpu").eval()
    module = graph_module(net, MODEL_GRAPH)
    x = test_input(spec, manifest.graph_channels)
    with torch.no_grad():
        (y,) = module(torch.from_numpy(normalize_image(x[0])[None]))
    with atomic_dir(Path(out), "--bioimageio") as work:
        files = work / "files"
        files.mkdir()
        shutil.copy2(verified_file(export_dir, onnx_artifact.file, onnx_artifact.sha256),
                     files / "model.onnx")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # bioimage.io still takes TorchScript
            torch.jit.trace(module, torch.from_numpy(x), check_trace=False).save(str(files / "model_ts.pt"))
        np.save(files / "test_input.npy", x)
        np.save(files / "test_output.npy", y.numpy())
        tifffile.imwrite(files / "sample_input.tif", x[0])
        tifffile.imwrite(files / "sample_output.tif", y[0].numpy())
        _cover(x[0, 0], y[0].numpy(), files / "cover.png")
        (files / "README.md").write_text(_documentation(manifest.family, spec))
        descr = _description(manifest, spec, files, authors, license,
                             name or f"sa-deploy {manifest.family} {Path(export_dir).name}")
        package = work / "package"
        save_bioimageio_package_as_folder(descr, output_path=package)
        rdf = package / "rdf.yaml"
        with ValidationContext(perform_io_checks=True):
            loaded = load_description(rdf)
        summary = loaded.validation_summary
        if summary.status not in ("valid-format", "passed"):
            raise SaDeployError(f"{out}: bioimageio.spec rejected the package: {summary.format()[:2000]}")
        for item in package.iterdir():
            item.rename(work / item.name)
        shutil.rmtree(files)
        package.rmdir()
    return Path(out) / "rdf.yaml"


def _description(manifest, spec: ModelSpec, files: Path, authors: Sequence[str], license: str, name: str):
    from bioimageio.spec.model import v0_5 as bio

    side: int | bio.ParameterizedSize = (spec.tile_size if spec.fixed_tile
                                         else bio.ParameterizedSize(min=16, step=16))
    input_id, output_id = bio.TensorId("tiles"), bio.TensorId("flows_cellprob")
    channels = [f"c{k}" for k in range(manifest.graph_channels)]
    scale = bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(
        axes=[bio.AxisId("y"), bio.AxisId("x")], min_percentile=1.0, max_percentile=99.0))
    inputs = [bio.InputTensorDescr(
        id=input_id, description="raw image tiles; channel 0 the cytoplasm/cells channel",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=channels),
              bio.SpaceInputAxis(id=bio.AxisId("y"), size=side),
              bio.SpaceInputAxis(id=bio.AxisId("x"), size=side)],
        test_tensor=bio.FileDescr(source=files / "test_input.npy"),
        sample_tensor=bio.FileDescr(source=files / "sample_input.tif"),
        preprocessing=[scale])]
    outputs = [bio.OutputTensorDescr(
        id=output_id, description="cellpose flows (dY, dX, in network units) and cell-probability logit",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=OUTPUT_CHANNELS),
              bio.SpaceOutputAxis(id=bio.AxisId("y"), size=bio.SizeReference(
                  tensor_id=input_id, axis_id=bio.AxisId("y"))),
              bio.SpaceOutputAxis(id=bio.AxisId("x"), size=bio.SizeReference(
                  tensor_id=input_id, axis_id=bio.AxisId("x")))],
        test_tensor=bio.FileDescr(source=files / "test_output.npy"),
        sample_tensor=bio.FileDescr(source=files / "sample_output.tif"))]
    text, doi = family_class(manifest.family).citation
    weights = bio.WeightsDescr(
        onnx=bio.OnnxWeightsDescr(source=files / "model.onnx", opset_version=manifest.opset),
        torchscript=bio.TorchscriptWeightsDescr(source=files / "model_ts.pt", parent="onnx",
                                                pytorch_version=bio.Version(torch.__version__.split("+")[0])))
    return bio.ModelDescr(
        name=name,
        description=f"{manifest.family} cell segmentation network exported by sa-deploy "
                    f"(diameter {spec.diam_mean:g} px at the network's scale)",
        authors=[bio.Author(name=a) for a in authors],
        cite=[bio.CiteEntry(text=text, doi=bio.Doi(doi))],
        license=license,
        documentation=bio.FileDescr(source=files / "README.md"),
        covers=[bio.FileDescr(source=files / "cover.png")],
        tags=["cellpose", "segmentation", "cells", "sa-deploy", manifest.family],
        inputs=inputs, outputs=outputs, weights=weights)


def _cover(image: np.ndarray, output: np.ndarray, path: Path) -> None:
    """Input and cell probability side by side, 2:1 as bioimage.io asks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3), dpi=100)
    axes[0].imshow(image, cmap="gray")
    axes[1].imshow(1 / (1 + np.exp(-output[2])), cmap="magma", vmin=0, vmax=1)
    for ax, title in zip(axes, ("input", "cell probability"), strict=True):
        ax.set_title(title)
        ax.axis("off")
    fig.savefig(path)
    plt.close(fig)


def _documentation(family: str, spec: ModelSpec) -> str:
    return f"""# sa-deploy {family} network

Input `tiles`: B×C×Y×X float32, raw pixels; each channel is normalised to its 1st–99th
percentiles (`scale_range`), as cellpose does. Y and X: {'exactly ' + str(spec.tile_size) if spec.fixed_tile
else 'multiples of 16'}. Cells should be about {spec.diam_mean:g} px across: rescale the image
by {spec.diam_mean:g} / (your cell diameter) first.

Output `flows_cellprob`: B×3×Y×X — the flows dY, dX and the cell-probability logit. Instance masks
come from following the flows (cellpose's `dynamics.compute_masks`, or `sa-deploy segment`).

## Validation

`sa-deploy export` checked the ONNX graph against the PyTorch network (onnxruntime, CPU) before
packaging; the test tensors were computed with sa-deploy's cellpose-exact normalisation and
network, and bioimage.io's own test run reproduces them from `rdf.yaml`.
"""
