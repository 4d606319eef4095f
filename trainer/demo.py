"""``sa-deploy demo``: SelfAdapt end to end on generated data — offline, a few CPU minutes.

1. Render a *source* domain (clean images) and a *target* domain (the same kind of cells under 6×
   the noise) with ground truth (``synthetic.SOURCE`` / ``synthetic.TARGET``).
2. Train a small network (a Cellpose 3 U-Net by default) on the source images with cellpose's
   loss (``source.py``).
3. Segment held-out labelled target images: AP before adaptation.
4. Adapt the source model to *unlabeled* target images with SelfAdapt (``loop.adapt``, the same
   code as ``sa-deploy adapt``) and segment the held-out target images again: AP after.

The output folder holds the source model, the adaptation run directory, the labelled test images
(to re-check with ``sa-deploy segment`` / ``evaluate``), overlays and ``results.json``. Running the
same command again resumes: a trained source model and a finished or interrupted run are reused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import tifffile
import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.io.writers import atomic_path, write_masks
from selfadapt_deploy.metrics import APResult, average_precision, pooled
from selfadapt_deploy.models import FAMILIES, load_model
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.segment import SegmentParams, segment_arrays
from selfadapt_deploy.synthetic import SOURCE, TARGET, Domain
from selfadapt_deploy.trainer.candidates import SELECTION_CSV
from selfadapt_deploy.trainer.data import TileSampler, prepare_image
from selfadapt_deploy.trainer.loop import MODEL, AdaptConfig, Validation, adapt
from selfadapt_deploy.trainer.report import plot_curves, plot_overlays
from selfadapt_deploy.trainer.source import LabelledTiles, SourceConfig, train_source

DIAMETER = 16.0  # mean cell diameter of the generated images (ellipse radii 6–10 px)
SETTINGS, RESULTS, SOURCE_MODEL, RUN = "demo.json", "results.json", "source_model.pt", "adapt"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults run in about three minutes on two CPU cores."""

    n_source: int = 12  # labelled source images (source training)
    n_target: int = 6  # unlabeled target images (adaptation)
    n_val: int = 2  # unlabeled target images (label-free stopping)
    n_test: int = 6  # labelled images per domain, only for the before/after table
    size: int = 192
    tile: int = 112
    source: SourceConfig = field(default_factory=lambda: SourceConfig(iterations=200))
    adapt: AdaptConfig = field(default_factory=lambda: AdaptConfig(iterations=80, eval_every=20))
    # selfadapt | actis (n_labelled labelled target images join every batch) | culpico (two
    # cooperating networks; with culpico_source, the labelled source images add the supervised loss)
    method: str = "selfadapt"
    n_labelled: int = 2
    culpico_source: bool = True
    # the small network of this family (its ``build_demo``), trained and adapted as its ``demo``
    # recipe says (models/base.py DemoRecipe)
    family: str = "cpnet"
    target: Domain = TARGET  # the target domain (benchmarks/selection_rules.py uses other shifts)

    @classmethod
    def for_family(cls, family: str, **changes) -> DemoConfig:
        """The demo's settings for ``family`` (any registered family), with ``changes`` applied."""
        if family not in FAMILIES:
            raise SaDeployError(f"--family must be one of {', '.join(FAMILIES)}, got '{family}'")
        fam, base = FAMILIES[family], cls()
        recipe, source = fam.demo, {"iterations": fam.demo.source_iterations}
        if fam.fixed_tile:  # the network's input size is the tile: source training uses it too
            source["tile"] = changes.get("tile", cls.tile)
        if recipe.source_lr is not None:
            source["lr"] = recipe.source_lr
        changes = {"source": replace(base.source, **source),
                   "adapt": replace(base.adapt, lr=recipe.adapt_lr), **changes}
        return cls(family=family, **changes)

    def network(self, seed: int) -> SegmentationNet:
        """The untrained source network, initialised from ``seed``."""
        return FAMILIES[self.family].build_demo(self.tile, DIAMETER, seed)

    @classmethod
    def quick(cls, method: str = "selfadapt") -> DemoConfig:
        """A smaller demo for the integration test (well under a minute)."""
        return cls(n_source=8, n_target=4, n_val=1, n_test=3, size=160, tile=96,
                   source=SourceConfig(iterations=120, tile=96),
                   adapt=AdaptConfig(iterations=30, eval_every=10), method=method)


@dataclass(frozen=True)
class DemoResult:
    """Pooled AP of the source model and the adapted model on both domains' test images."""

    before: dict[str, APResult]  # domain name → AP
    after: dict[str, APResult]
    selected: str  # the deployed candidate (iter_XXXXXX, or a weight average)

    def table(self) -> list[tuple[str, str, str]]:
        """(row label, before, after) rows of AP@0.5 and AP@0.75."""
        rows = []
        for domain in self.before:
            for i, t in enumerate(self.before[domain].thresholds[:2]):
                rows.append((f"{domain}: AP@{t:g}", f"{self.before[domain].ap[i]:.3f}",
                             f"{self.after[domain].ap[i]:.3f}"))
        return rows


def pooled_ap(net, pairs) -> tuple[APResult, list[np.ndarray]]:
    """Pooled AP of ``net`` on (image, ground truth) pairs, and its label images."""
    masks = segment_arrays(net, [im for im, _ in pairs], SegmentParams())
    return pooled([average_precision(gt, m) for (_, gt), m in zip(pairs, masks, strict=True)]), masks


def _check_settings(out: Path, config: DemoConfig, seed: int) -> None:
    """A demo folder can only be resumed with the settings it was started with."""
    settings = json.loads(json.dumps({"config": asdict(config), "seed": seed}))
    path = out / SETTINGS
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise SaDeployError(f"{out} holds a demo run with other settings; choose another --out or "
                            "delete that folder")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=2))


def run_demo(out: Path, config: DemoConfig = DemoConfig(), device: torch.device | str = "cpu",
             seed: int = 0, report: Callable[[str], None] = print,
             source_progress: Callable[[int, float], None] | None = None,
             adapt_progress: Callable[[int, dict], None] | None = None) -> DemoResult:
    """Generate both domains, train the source model, adapt it without labels, compare."""
    out, device = Path(out), torch.device(device)
    if out.exists() and not out.is_dir():
        raise SaDeployError(f"{out} is a file; choose a folder for --out (new, or a demo run to resume)")
    _check_settings(out, config, seed)
    shape = (config.size, config.size)
    source = SOURCE.sample(config.n_source, shape, seed=seed)
    target = config.target.sample(config.n_target + config.n_val, shape, seed=seed + 10_000)
    tests = {d.name: d.sample(config.n_test, shape, seed=seed + 20_000) for d in (SOURCE, config.target)}
    for i, (img, labels) in enumerate(tests[config.target.name]):  # for `sa-deploy segment`/`evaluate`
        with atomic_path(out / "target_test" / "images" / f"img{i}.tif") as tmp:
            tifffile.imwrite(tmp, img[0])
        write_masks(out / "target_test" / "labels" / f"img{i}.tif", labels)

    if (out / SOURCE_MODEL).is_file():
        report(f"reusing the trained source model {out / SOURCE_MODEL}")
    else:
        report(f"training a source model on {len(source)} clean labelled images ({SOURCE.name})")
        net = config.network(seed).to(device)
        train_source(net, [im for im, _ in source], [lab for _, lab in source],
                     SourceConfig(**{**asdict(config.source), "seed": seed}), source_progress)
        net.save(out / SOURCE_MODEL)
    net = load_model(out / SOURCE_MODEL, device)
    before = {name: pooled_ap(net, pairs) for name, pairs in tests.items()}

    labelled, pairs = None, []
    if config.method == "actis":  # a few labelled target images, never among the test images
        pairs = config.target.sample(config.n_labelled, shape, seed=seed + 30_000)
    elif config.method == "culpico" and config.culpico_source:
        pairs = source  # the labelled source images the source model was trained on
    elif config.method not in ("selfadapt", "culpico"):
        raise SaDeployError(f"--method must be selfadapt, actis or culpico, got '{config.method}'")
    if pairs:
        labelled = LabelledTiles([prepare_image(im, 1.0) for im, _ in pairs], [lab for _, lab in pairs],
                                 config.tile)
    report(f"adapting ({config.method}) to {config.n_target} unlabeled target images ({config.target.name})"
           + (f" with {len(pairs)} labelled {'source' if config.method == 'culpico' else 'target'} images"
              if pairs else "")
           + f", {config.n_val} held out for stopping")
    train = TileSampler([prepare_image(im, 1.0) for im, _ in target[: config.n_target]], config.tile)
    val = Validation.from_images([im for im, _ in target[config.n_target:]], 1.0, config.tile, None)
    adapt_config = AdaptConfig(**{**asdict(config.adapt), "seed": seed, "method": config.method})
    summary = adapt(net, train, val, out / RUN, adapt_config, resume=True, progress=adapt_progress,
                    labelled=labelled)
    plot_curves(out / RUN / "metrics.csv", out / RUN / "curves.png", adapt_config.tau_fn,
                adapt_config.tau_emb, summary["selected_iteration"], out / RUN / SELECTION_CSV)

    adapted = load_model(out / RUN / MODEL, device)
    after = {name: pooled_ap(adapted, pairs) for name, pairs in tests.items()}
    result = DemoResult({k: ap for k, (ap, _) in before.items()},
                        {k: ap for k, (ap, _) in after.items()}, summary["selected"])
    pick = tests[config.target.name][:2]
    plot_overlays(out / "overlays.png", [im[0] for im, _ in pick], [gt for _, gt in pick],
                  {"source model": before[config.target.name][1][:2],
                   "adapted": after[config.target.name][1][:2]})
    with atomic_path(out / RESULTS) as tmp:
        tmp.write_text(json.dumps({"before": {k: asdict(v) for k, v in result.before.items()},
                                   "after": {k: asdict(v) for k, v in result.after.items()},
                                   "selected": result.selected,
                                   "adapt_seconds": summary["seconds"]}, indent=2))
    return result
