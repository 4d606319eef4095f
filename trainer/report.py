"""Figures: ``curves.png`` (loss terms, FN rate, D_emb, flow error and mask agreement, and the
selection signals — consensus agreement, dropout disagreement — over iterations, thresholds and
the selected snapshot marked) and mask overlays (outlines of predictions and ground
truth on the image)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from selfadapt_deploy.io.writers import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: Path) -> None:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    _pyplot().close(fig)


def plot_curves(metrics_csv: Path, out_png: Path, tau_fn: float, tau_emb: float,
                selected: int | None, selection_csv: Path | None = None) -> None:
    """``selected``: the deployed snapshot's iteration (None when a weight average is deployed);
    ``selection_csv``: the run's candidate table, for the selection panel."""
    plt = _pyplot()
    rows = list(csv.DictReader(open(metrics_csv)))
    steps = [r for r in rows if r["loss"]]
    evals = [r for r in rows if r["d_emb"]]
    table = list(csv.DictReader(open(selection_csv))) if selection_csv and selection_csv.is_file() else []
    fig, axes = plt.subplots(1, 5, figsize=(21, 3.6), constrained_layout=True)
    # every loss term the method logged (SelfAdapt's, ACTIS's supervised term, CULPICO's per network)
    terms = [k for k in rows[0] if k.startswith("loss") and any(r[k] for r in steps)] if rows else []
    for key in terms:
        axes[0].plot([int(r["iteration"]) for r in steps if r[key]],
                     [float(r[key]) for r in steps if r[key]], label=key)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss")
    for ax, key, tau, title in ((axes[1], "fn_rate", tau_fn, "FN rate vs θ0"),
                                (axes[2], "d_emb", tau_emb, "embedding distance to θ0")):
        ax.plot([int(r["iteration"]) for r in evals], [float(r[key]) for r in evals], "o-")
        ax.axhline(tau, color="tab:red", ls="--", label=f"threshold {tau:g}")
        ax.set_title(title)
    for key, label in (("flow_err", "flow error (lower: flows agree with masks)"),
                       ("agree_prev", "mask agreement with the previous snapshot")):
        points = [(int(r["iteration"]), float(r[key])) for r in evals if r.get(key)]
        if points:
            axes[3].plot(*zip(*points, strict=True), "o-", label=label)
    axes[3].set_title("self-consistency")
    for key, label in (("consensus50_snapshots", "agreement with the consensus @0.5"),
                       ("consensus75_snapshots", "agreement with the consensus @0.75"),
                       ("dropout_err", "disagreement under feature dropout")):
        points = [(int(r["iteration"]), float(r[key])) for r in table if r["iteration"] and r.get(key)]
        if points:
            axes[4].plot(*zip(*points, strict=True), "o-", label=label)
    axes[4].set_title("selection (every candidate)")
    for ax in axes:
        if selected is not None:
            ax.axvline(selected, color="tab:green", ls=":", label=f"selected {selected}")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    _save(fig, out_png)


def outlines(masks: np.ndarray) -> np.ndarray:
    """Boolean map of mask pixels with a 4-neighbour of another label (or background)."""
    m = np.pad(masks, 1, mode="edge")
    centre = m[1:-1, 1:-1]
    edge = ((centre != m[:-2, 1:-1]) | (centre != m[2:, 1:-1]) | (centre != m[1:-1, :-2])
            | (centre != m[1:-1, 2:]))
    return edge & (centre > 0)


def plot_overlays(out_png: Path, images: list[np.ndarray], truth: list[np.ndarray],
                  predictions: dict[str, list[np.ndarray]]) -> None:
    """One row per image: the image, then each model's outlines (red) over ground truth (green)."""
    plt = _pyplot()
    cols = 1 + len(predictions)
    fig, axes = plt.subplots(len(images), cols, figsize=(3.2 * cols, 3.2 * len(images)),
                             squeeze=False, constrained_layout=True)
    for row, (img, gt) in enumerate(zip(images, truth, strict=True)):
        lo, hi = np.percentile(img, (1, 99))
        gray = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
        axes[row, 0].imshow(gray, cmap="gray")
        axes[row, 0].set_title("image")
        for col, (name, masks) in enumerate(predictions.items(), start=1):
            rgb = np.repeat(gray[..., None], 3, axis=-1)
            rgb[outlines(gt)] = (0.1, 0.9, 0.1)
            rgb[outlines(masks[row])] = (1.0, 0.2, 0.2)
            axes[row, col].imshow(rgb)
            axes[row, col].set_title(f"{name}: {int(masks[row].max())} masks / {int(gt.max())} true")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle("outlines: red = predicted, green = ground truth")
    _save(fig, out_png)
