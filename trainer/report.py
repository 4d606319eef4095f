"""``curves.png``: loss terms, FN rate and D_emb over iterations, thresholds and selection marked."""

from __future__ import annotations

import csv
from pathlib import Path

from selfadapt_deploy.io.writers import atomic_path


def plot_curves(metrics_csv: Path, out_png: Path, tau_fn: float, tau_emb: float,
                selected: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(metrics_csv)))
    steps = [r for r in rows if r["loss"]]
    evals = [r for r in rows if r["d_emb"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    for key in ("loss", "loss_prob", "loss_flow"):
        axes[0].plot([int(r["iteration"]) for r in steps], [float(r[key]) for r in steps], label=key)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss")
    for ax, key, tau, title in ((axes[1], "fn_rate", tau_fn, "FN rate vs θ0"),
                                (axes[2], "d_emb", tau_emb, "embedding distance to θ0")):
        ax.plot([int(r["iteration"]) for r in evals], [float(r[key]) for r in evals], "o-")
        ax.axhline(tau, color="tab:red", ls="--", label=f"threshold {tau:g}")
        ax.set_title(title)
    for ax in axes:
        ax.axvline(selected, color="tab:green", ls=":", label=f"selected {selected}")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
