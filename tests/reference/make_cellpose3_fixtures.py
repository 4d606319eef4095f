#!/usr/bin/env python
"""Generate cellpose 3.1.1.x reference fixtures for sa-deploy's CPnet / pipeline parity tests.

What it makes (in ``--out``, normally ``tests/fixtures/cellpose3``):

* ``cpnet_<name>.pth`` -- small, randomly initialised ``cellpose.resnet_torch.CPnet``
  networks (nout=3, sz=3, mkldnn=False) with randomised BatchNorm statistics/affine
  parameters and non-default ``diam_mean``/``diam_labels``, written with the network's
  own ``CPnet.save_model`` (i.e. exactly cellpose 3's file format:
  ``torch.save(net.state_dict(), path)``).
* ``cpnet_<name>_io.npz`` -- random inputs and the ``net.eval()`` / ``torch.no_grad()``
  forward outputs (``y`` = B x 3 x H x W, ``style`` = B x nbase[-1]) of those networks.
* ``tiny_cyto.pth`` -- a tiny CPnet trained for ~1 minute with cellpose 3's own
  ``cellpose.train.train_seg`` on synthetic fluorescence-like cell images.
* ``pipeline_<case>.npz`` -- inputs/outputs of ``cellpose.models.CellposeModel.eval``
  (tiny model, CPU) plus ``masks_from_flows`` (mask assembly re-run directly on the
  saved flows with ``cellpose.dynamics``) and cheap intermediate facts
  (normalisation percentiles, resize shape, padding, tile grid, effective
  rescale/niter).
* ``config.json`` -- constructor kwargs of every network, versions, AP of the tiny
  model and sha256 of every fixture file.
* ``README.md`` -- generated description of every file (keys, shapes, dtypes).

Two unavoidable shims are used for the tiny model (see README / ``load_cellpose3_model``):
cellpose 3.1.1.2's ``CellposeModel`` hard-codes ``nbase=[nchan, 32, 64, 128, 256]``
(models.py:339-343) and ``core.run_net`` hard-codes 256 style channels
(core.py:239, 261).  ``load_cellpose3_model`` therefore builds the model through the
unmodified ``CellposeModel.__init__`` while temporarily substituting the CPnet class
with one of the tiny width whose forward zero-pads the style vector to 256 entries
(numerically exact: the network output ``y`` is untouched and zero padding does not
change the style L2 normalisation in run_net).

This script MUST run with cellpose 3.1.1.x (tested with 3.1.1.2) in a separate
virtual environment -- not in sa-deploy's own environment.  From the repository root:

    python3 -m venv .venv-cp3
    .venv-cp3/bin/pip install "torch==2.13.0"      # a CPU build was used (2.13.0+cpu)
    .venv-cp3/bin/pip install "cellpose==3.1.1.2" "numpy<2.1"
    .venv-cp3/bin/python tests/reference/make_cellpose3_fixtures.py --out tests/fixtures/cellpose3

Runs in ~1.5 minutes on 2 idle CPU cores (training 65-90 s; no GPU needed or used) --
several times longer when the cores are shared with other busy processes (one run next
to two other CPU-bound jobs took ~12 min).  Everything is seeded; re-running on the same
software stack and thread count reproduced all files bit-for-bit (floating-point
results may differ in the last bits on other CPUs / thread counts / library versions).

``--profile spec`` regenerates with the network widths / image sizes of the original
request (random nets nbase=[2,8,16,32,64], [2,16,32,64], [1,8,16,32,64]; tiny model
nbase=[2,16,32,64,128]; ~300x260 images).  That output is ~19 MB and is not committed;
the default ``--profile small`` keeps the committed fixtures under 3 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

try:
    import cellpose
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from cellpose import core, dynamics, metrics, models, train, transforms
    from cellpose.resnet_torch import CPnet
except ImportError as exc:  # pragma: no cover - only hit when run in the wrong env
    sys.exit(f"this script needs cellpose 3.1.1.x + torch (separate venv, see docstring): {exc}")

from scipy import ndimage as ndi

try:
    from importlib.metadata import version as _pkg_version
except ImportError:  # pragma: no cover
    _pkg_version = None

CELLPOSE_VERSION = _pkg_version("cellpose") if _pkg_version else getattr(cellpose, "__version__", "?")

BBBC047_PATH = Path("/work/shared/data/bbbc047/cdp2bioactives_h15.ome.tif")
STYLE_DIM_RUN_NET = 256  # hard-coded in cellpose/core.py:239,261 (3.1.1.2)

# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------

PROFILES = {
    # committed fixtures: < 3 MB in total
    "small": {
        "nets": [
            # 4 levels, nchan 2, non-doubling widths, max pooling
            dict(name="a4_nchan2", nbase=[2, 3, 6, 10, 16], max_pool=True,
                 diam_mean=17.0, diam_labels=14.25, seed=101),
            # 3 levels (only 2 poolings), nchan 2
            dict(name="b3_nchan2", nbase=[2, 4, 8, 16], max_pool=True,
                 diam_mean=24.5, diam_labels=27.0, seed=202),
            # 4 levels, nchan 1, AvgPool2d instead of MaxPool2d (max_pool=False)
            dict(name="c4_nchan1_avgpool", nbase=[1, 3, 6, 8, 12], max_pool=False,
                 diam_mean=45.0, diam_labels=40.5, seed=303),
        ],
        "io_batch": 2, "io_hw": (24, 40), "io_sq_hw": (24, 24),
        "tiny": dict(nbase=[2, 4, 8, 16, 32], diam_mean=17.0, n_epochs=70, bsize=160,
                     n_train=24, train_hw=(256, 256), learning_rate=0.005,
                     weight_decay=1e-5, batch_size=8),
        "cases": {
            "synthetic_gray": (232, 216),
            "synthetic_rescale": (130, 104),  # L*17/26 integral: float32 vs float64 edge
            "synthetic_2ch": (96, 112),
            "bbbc047_crop": (128, 160),
            "synthetic_thresholds": (96, 96),
            "synthetic_diam_none": (80, 96),
        },
        "n_heldout": 4, "heldout_hw": (256, 256),
    },
    # the widths / sizes of the original request (~15 MB, not committed)
    "spec": {
        "nets": [
            dict(name="a4_nchan2", nbase=[2, 8, 16, 32, 64], max_pool=True,
                 diam_mean=17.0, diam_labels=14.25, seed=101),
            dict(name="b3_nchan2", nbase=[2, 16, 32, 64], max_pool=True,
                 diam_mean=24.5, diam_labels=27.0, seed=202),
            dict(name="c4_nchan1_avgpool", nbase=[1, 8, 16, 32, 64], max_pool=False,
                 diam_mean=45.0, diam_labels=40.5, seed=303),
        ],
        "io_batch": 2, "io_hw": (64, 80), "io_sq_hw": (64, 64),
        "tiny": dict(nbase=[2, 16, 32, 64, 128], diam_mean=17.0, n_epochs=70, bsize=160,
                     n_train=24, train_hw=(256, 256), learning_rate=0.005,
                     weight_decay=1e-5, batch_size=8),
        "cases": {
            "synthetic_gray": (300, 260),
            "synthetic_rescale": (300, 260),
            "synthetic_2ch": (256, 256),
            "bbbc047_crop": (256, 320),
            "synthetic_thresholds": (300, 260),
            "synthetic_diam_none": (256, 240),
        },
        "n_heldout": 4, "heldout_hw": (256, 256),
    },
}

SEED_TINY_INIT = 1234
SEED_TRAIN_DATA = 1
SEED_HELDOUT = 123
SEED_CASES = {
    "synthetic_gray": 1001,
    "synthetic_rescale": 1002,
    "synthetic_2ch": 1003,
    "synthetic_thresholds": 1027,  # seed where min_size=30 removes a small border mask
    "synthetic_diam_none": 1006,
}
SEED_NET_INPUT = 4242

log = logging.getLogger("make_cellpose3_fixtures")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _jsonable(obj):
    """Recursively convert numpy / torch scalars & arrays to JSON-compatible objects."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _min_divisor(nbase):
    """CPnet applies len(nbase)-2 2x2 poolings; H and W must be divisible by 2**that."""
    return 2 ** (len(nbase) - 2)


def _describe_npz(path: Path):
    rows = []
    with np.load(path) as z:
        for k in z.files:
            a = z[k]
            rows.append((k, str(a.dtype), tuple(a.shape)))
    return rows


# --------------------------------------------------------------------------------------
# synthetic images
# --------------------------------------------------------------------------------------

def _relabel(lab):
    u = np.unique(lab)
    u = u[u > 0]
    lut = np.zeros(int(lab.max()) + 1, np.int32)
    lut[u] = np.arange(1, len(u) + 1, dtype=np.int32)
    return lut[lab]


def make_cells(rng, shape, diam_range=(12.0, 20.0), fill=0.30, two_channel=False):
    """Synthetic 2-D fluorescence-like image of cells + instance labels (numpy/scipy only).

    Cells are filled ellipses (axis diameters drawn from ``diam_range``) with random
    brightness and a little texture on a dim, slightly graded, noisy background; ~30%
    of the area is covered and neighbours may overlap (overlaps are split by nearest
    normalised ellipse distance, so some cells touch; touching borders are darkened).
    With ``two_channel`` a second "nucleus" channel (a concentric ellipse of 0.45x the
    cell size) is returned and the image is H x W x 2 (cyto, nucleus).

    Returns (image float32 in ~[0, 1.3], labels int32 with 0 = background).
    """
    Ly, Lx = shape
    dmean = 0.5 * (diam_range[0] + diam_range[1])
    n_target = int(fill * Ly * Lx / (np.pi * (dmean / 2) ** 2))
    cells = []
    tries = 0
    while len(cells) < n_target and tries < 50 * max(n_target, 1):
        tries += 1
        da, db = rng.uniform(*diam_range, size=2)
        ra, rb = da / 2, db / 2
        cy, cx = rng.uniform(-2, Ly + 2), rng.uniform(-2, Lx + 2)
        fac = rng.uniform(0.72, 1.25)  # < 1 lets neighbours overlap -> touching cells
        r = 0.5 * (ra + rb)
        if all(np.hypot(cy - y, cx - x) >= fac * (r + 0.5 * (a + b)) for (y, x, a, b, _) in cells):
            cells.append((cy, cx, ra, rb, rng.uniform(0, np.pi)))

    labels = np.zeros(shape, np.int32)
    dist = np.full(shape, np.inf, np.float32)
    inten = np.zeros(shape, np.float32)
    nuc = np.zeros(shape, np.float32)
    yy, xx = np.mgrid[:Ly, :Lx].astype(np.float32)
    tex = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    tex /= tex.std() + 1e-6
    for k, (cy, cx, ra, rb, th) in enumerate(cells):
        R = int(np.ceil(max(ra, rb))) + 1
        y0, y1 = max(0, int(cy) - R), min(Ly, int(cy) + R + 2)
        x0, x1 = max(0, int(cx) - R), min(Lx, int(cx) + R + 2)
        if y1 <= y0 or x1 <= x0:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = (dx * np.cos(th) + dy * np.sin(th)) / ra
        v = (-dx * np.sin(th) + dy * np.cos(th)) / rb
        d = u * u + v * v
        sel = (d <= 1.0) & (d < dist[y0:y1, x0:x1])
        base = rng.uniform(0.35, 1.0)
        labels[y0:y1, x0:x1][sel] = k + 1
        dist[y0:y1, x0:x1][sel] = d[sel]
        inten[y0:y1, x0:x1][sel] = base * (0.8 + 0.2 * (1 - d[sel]))
        if two_channel:
            dn = d / 0.45 ** 2
            seln = sel & (dn <= 1.0)
            nuc[y0:y1, x0:x1][seln] = rng.uniform(0.5, 1.0) * (0.85 + 0.15 * (1 - dn[seln]))
    labels = _relabel(labels)

    edge = np.zeros(shape, bool)
    for ax in (0, 1):
        b = np.roll(labels, 1, axis=ax)
        e = (labels != b) & (labels > 0) & (b > 0)
        edge |= e | np.roll(e, -1, axis=ax)
    inten = inten * (1 + 0.12 * tex) * np.where(edge, 0.65, 1.0)

    def finish(img):
        bg = 0.06 + 0.04 * (yy / Ly) + 0.03 * (xx / Lx)
        img = ndi.gaussian_filter(img + bg * (img == 0), 1.0)
        img = img + rng.normal(0, 0.025, shape) + rng.poisson(img * 200) / 200.0 - img
        return img.astype(np.float32)

    out = finish(inten)
    if two_channel:
        out = np.stack([out, finish(nuc)], axis=-1)
    return out, labels


def to_uint16(img):
    return np.clip(np.round(img * 3000.0 + 150.0), 0, 65535).astype(np.uint16)


# --------------------------------------------------------------------------------------
# random CPnet fixtures
# --------------------------------------------------------------------------------------

def build_random_cpnet(cfg):
    torch.manual_seed(cfg["seed"])
    net = CPnet(list(cfg["nbase"]), 3, 3, mkldnn=False, conv_3D=False,
                max_pool=cfg["max_pool"], diam_mean=cfg["diam_mean"])
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
        net.diam_labels.data.fill_(cfg["diam_labels"])
    net.eval()
    return net


def cpnet_forward(net, x):
    net.eval()
    with torch.no_grad():
        y, style, _ = net(torch.from_numpy(x))
    return y.numpy(), style.numpy()


def make_network_fixtures(out: Path, prof):
    rng = np.random.default_rng(SEED_NET_INPUT)
    entries = {}
    for cfg in prof["nets"]:
        nbase = cfg["nbase"]
        div = _min_divisor(nbase)
        net = build_random_cpnet(cfg)
        pth = out / f"cpnet_{cfg['name']}.pth"
        net.save_model(str(pth))  # == torch.save(net.state_dict(), pth)
        B = prof["io_batch"]
        H, W = prof["io_hw"]
        Hs, Ws = prof["io_sq_hw"]
        assert H % div == 0 and W % div == 0 and Hs % div == 0 and Ws % div == 0
        x = rng.standard_normal((B, nbase[0], H, W)).astype(np.float32)
        x_sq = rng.standard_normal((1, nbase[0], Hs, Ws)).astype(np.float32)
        y, style = cpnet_forward(net, x)
        y_sq, style_sq = cpnet_forward(net, x_sq)
        assert np.isfinite(y).all() and np.isfinite(y_sq).all()
        np.savez_compressed(out / f"cpnet_{cfg['name']}_io.npz", x=x, y=y, style=style,
                            x_sq=x_sq, y_sq=y_sq, style_sq=style_sq)
        kwargs = dict(nbase=list(nbase), nout=3, sz=3, mkldnn=False, conv_3D=False,
                      max_pool=cfg["max_pool"], diam_mean=cfg["diam_mean"])
        entries[cfg["name"]] = {
            "class": "cellpose.resnet_torch.CPnet",
            "kwargs": kwargs,
            "diam_labels": cfg["diam_labels"],
            "nchan": nbase[0],
            "style_dim": nbase[-1],
            "style_on": bool(net.style_on),
            "spatial_divisor_required": div,
            "n_parameters_in_state_dict": int(sum(v.numel() for v in net.state_dict().values())),
            "torch_seed": cfg["seed"],
            "bn_perturbation": "weight~U(0.5,1.5), bias~0.2*N(0,1), running_mean~0.2*N(0,1), "
                               "running_var~U(0.5,2.0) (torch.Generator seed = torch_seed+1)",
            "files": {"weights": pth.name, "io": f"cpnet_{cfg['name']}_io.npz"},
            "io_stats": {"y_absmax": float(np.abs(y).max()), "y_std": float(y.std())},
        }
        log.info("net %-18s nbase=%s max_pool=%s  y|max|=%.3g", cfg["name"], nbase,
                 cfg["max_pool"], np.abs(y).max())
    return entries


# --------------------------------------------------------------------------------------
# tiny trained model
# --------------------------------------------------------------------------------------

def _make_cpnet_padstyle_class():
    class CPnetPadStyle256(CPnet):
        """CPnet whose style output is zero-padded to run_net's hard-coded 256 entries."""

        def forward(self, data):
            y, style, t0 = super().forward(data)
            if style.shape[1] < STYLE_DIM_RUN_NET:
                style = F.pad(style, (0, STYLE_DIM_RUN_NET - style.shape[1]))
            return y, style, t0

    return CPnetPadStyle256


@contextlib.contextmanager
def _cpnet_width_override(nbase):
    """Make cellpose.models.CellposeModel build a CPnet of width ``nbase`` (see docstring)."""
    orig = models.CPnet
    cls = _make_cpnet_padstyle_class()

    def factory(nbase_ignored, nout, sz, **kwargs):
        return cls(list(nbase), nout, sz, **kwargs)

    models.CPnet = factory
    try:
        yield
    finally:
        models.CPnet = orig


def load_cellpose3_model(path, nbase, mkldnn=False):
    """CellposeModel(gpu=False, pretrained_model=path) for a non-default-width CPnet.

    Runs the unmodified CellposeModel.__init__ (get_model_params, device selection,
    CPnet.load_model, diam_mean/diam_labels read from the file); only the CPnet class it
    instantiates is swapped for the tiny width (models.py:339-343 hard-codes
    [nchan,32,64,128,256]).
    """
    with _cpnet_width_override(nbase):
        model = models.CellposeModel(gpu=False, pretrained_model=str(path), mkldnn=mkldnn,
                                     nchan=nbase[0])
    model.nbase = list(nbase)  # cosmetic; eval does not read it
    return model


def train_tiny_model(out: Path, prof):
    tc = prof["tiny"]
    rng = np.random.default_rng(SEED_TRAIN_DATA)
    train_x, train_y = [], []
    for i in range(tc["n_train"]):
        two = (i % 3 == 2)  # every 3rd image has a nucleus channel, others a zero 2nd channel
        img, lab = make_cells(rng, tc["train_hw"], two_channel=two)
        x = (np.stack([img[..., 0], img[..., 1]]) if two
             else np.stack([img, np.zeros_like(img)]))
        train_x.append(x.astype(np.float32))
        train_y.append(lab)
    torch.manual_seed(SEED_TINY_INIT)
    net = CPnet(list(tc["nbase"]), 3, 3, mkldnn=False, max_pool=True,
                diam_mean=tc["diam_mean"])
    train_kwargs = dict(channels=None, normalize=True, n_epochs=tc["n_epochs"],
                        batch_size=tc["batch_size"], learning_rate=tc["learning_rate"],
                        weight_decay=tc["weight_decay"], SGD=False, rescale=True,
                        bsize=tc["bsize"], min_train_masks=1, save_every=10 ** 9)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        fn, train_losses, _ = train.train_seg(net, train_data=train_x, train_labels=train_y,
                                              save_path=tmp, model_name="tiny_cyto",
                                              **train_kwargs)
        shutil.copyfile(fn, out / "tiny_cyto.pth")
    t_train = time.time() - t0
    log.info("trained tiny model in %.1fs, final train loss %.4f, diam_labels %.3f",
             t_train, train_losses[-1], net.diam_labels.item())
    info = {
        "class": "cellpose.resnet_torch.CPnet",
        "kwargs": dict(nbase=list(tc["nbase"]), nout=3, sz=3, mkldnn=False, conv_3D=False,
                       max_pool=True, diam_mean=tc["diam_mean"]),
        "diam_labels": float(net.diam_labels.item()),
        "train_seg_kwargs": _jsonable(train_kwargs),
        "train_data": (f"{tc['n_train']} synthetic {tc['train_hw'][0]}x{tc['train_hw'][1]} images "
                       "(make_cells, rng seed %d); every 3rd image 2-channel (cyto, nucleus), "
                       "the others (gray, zeros); passed as float32 C x H x W arrays" % SEED_TRAIN_DATA),
        "torch_init_seed": SEED_TINY_INIT,
        "train_seconds": round(t_train, 1),
        "train_loss_first_last": [float(train_losses[0]), float(train_losses[-1])],
        "n_parameters_in_state_dict": int(sum(v.numel() for v in net.state_dict().values())),
    }
    return info


def evaluate_tiny(model, prof):
    rng = np.random.default_rng(SEED_HELDOUT)
    gray = [make_cells(rng, prof["heldout_hw"]) for _ in range(prof["n_heldout"])]
    two = [make_cells(rng, prof["heldout_hw"], two_channel=True) for _ in range(2)]
    thr = [0.5, 0.75, 0.9]
    res = {}
    for tag, data, kw in [
        ("gray_diameter_diam_mean", gray, dict(channels=[0, 0], diameter=float(model.diam_mean))),
        ("gray_diameter_None", gray, dict(channels=[0, 0], diameter=None)),
        ("2ch_channels_1_2", two, dict(channels=[1, 2], channel_axis=-1,
                                        diameter=float(model.diam_mean))),
    ]:
        preds = [model.eval(im, **kw)[0] for im, _ in data]
        ap = metrics.average_precision([lab for _, lab in data], preds, threshold=thr)[0]
        res[tag] = {f"AP@{t}": float(ap[:, i].mean()) for i, t in enumerate(thr)}
        res[tag]["n_images"] = len(data)
        res[tag]["n_true_masks"] = int(sum(lab.max() for _, lab in data))
        res[tag]["n_pred_masks"] = int(sum(p.max() for p in preds))
    return res


# --------------------------------------------------------------------------------------
# pipeline fixtures
# --------------------------------------------------------------------------------------

EVAL_DEFAULTS = dict(
    batch_size=8, resample=True, channels=None, channel_axis=None, z_axis=None,
    normalize=True, invert=False, rescale=None, diameter=None, flow_threshold=0.4,
    cellprob_threshold=0.0, do_3D=False, anisotropy=None, flow3D_smooth=0,
    stitch_threshold=0.0, min_size=15, max_size_fraction=0.4, niter=None, augment=False,
    tile_overlap=0.1, bsize=224, interp=True, compute_masks=True,
)


def load_bbbc047_crop(hw):
    import tifffile
    with tifffile.TiffFile(BBBC047_PATH) as tf:
        arr = tf.series[0].asarray()  # (5, 520, 696) uint16, axes CYX
    ch = 0  # DNA / Hoechst stain: bright, well separated nuclei
    H, W = hw
    y0 = (arr.shape[1] - H) // 2
    x0 = (arr.shape[2] - W) // 2
    crop = np.ascontiguousarray(arr[ch, y0:y0 + H, x0:x0 + W])
    src = {"file": str(BBBC047_PATH), "series": 0, "channel": ch,
           "channel_note": "channel 0 of the 5-channel Cell Painting image = DNA (Hoechst) stain, nuclei",
           "crop_yx": [int(y0), int(y0 + H), int(x0), int(x0 + W)],
           "series_shape": list(arr.shape), "dtype": str(arr.dtype)}
    return crop, src


def build_cases(prof, diam_mean):
    sizes = prof["cases"]
    cases = []
    rng = np.random.default_rng(SEED_CASES["synthetic_gray"])
    img, lab = make_cells(rng, sizes["synthetic_gray"])
    cases.append(("synthetic_gray", to_uint16(img), lab,
                  dict(channels=[0, 0], diameter=float(diam_mean)),
                  "single-channel uint16 synthetic image, cells 12-20 px; diameter = diam_mean "
                  "so rescale == 1.0 exactly; larger than one 224 tile after padding -> 2x2 tiles"))

    rng = np.random.default_rng(SEED_CASES["synthetic_rescale"])
    img, lab = make_cells(rng, sizes["synthetic_rescale"], diam_range=(18.0, 30.0))
    cases.append(("synthetic_rescale", to_uint16(img), lab,
                  dict(channels=[0, 0], diameter=26.0),
                  "cells 1.5x larger (18-30 px); diameter=26 -> rescale = diam_mean/26, image "
                  "resized before the net and flows resized back (resample=True); H, W are "
                  "multiples of 26, so int(L*rescale) depends on float32 arithmetic (see "
                  "derived.resized_shape_if_float64_arithmetic)"))

    rng = np.random.default_rng(SEED_CASES["synthetic_2ch"])
    img, lab = make_cells(rng, sizes["synthetic_2ch"], two_channel=True)
    cases.append(("synthetic_2ch", to_uint16(img), lab,
                  dict(channels=[1, 2], channel_axis=-1, diameter=float(diam_mean)),
                  "H x W x 2 uint16 (channel 0 = cytoplasm, channel 1 = nucleus), channel "
                  "axis last; channels=[1,2] (1-based: segment channel 1, nuclear channel 2)"))

    crop, src = load_bbbc047_crop(sizes["bbbc047_crop"])
    cases.append(("bbbc047_crop", crop, None,
                  dict(channels=[0, 0], diameter=30.0),
                  "real image: BBBC047 cdp2bioactives_h15, series 0, channel 0 (DNA), uint16 "
                  "as stored, centre crop; nuclei are ~30 px so diameter=30 (rescale 17/30)"))

    rng = np.random.default_rng(SEED_CASES["synthetic_thresholds"])
    img, lab = make_cells(rng, sizes["synthetic_thresholds"])
    cases.append(("synthetic_thresholds", img.astype(np.float32), lab,
                  dict(channels=[0, 0], diameter=float(diam_mean), flow_threshold=0.8,
                       cellprob_threshold=-1.0, min_size=30, niter=100),
                  "float32 synthetic image; non-default flow_threshold/cellprob_threshold/"
                  "min_size/niter"))

    rng = np.random.default_rng(SEED_CASES["synthetic_diam_none"])
    img, lab = make_cells(rng, sizes["synthetic_diam_none"])
    cases.append(("synthetic_diam_none", to_uint16(img), lab,
                  dict(channels=[0, 0], diameter=None),
                  "diameter=None: cellpose 3.1.1.2 then uses rescale = diam_mean / diam_labels "
                  "(NOT 1.0), so the image is resized and niter = 200 / rescale"))
    return cases, src


def _pipeline_facts(model, img, kw):
    """Cheap intermediate facts of CellposeModel.eval, recomputed with cellpose functions."""
    x = transforms.convert_image(img, kw["channels"], channel_axis=kw["channel_axis"],
                                 z_axis=kw["z_axis"], do_3D=False, nchan=model.nchan)
    if x.ndim < 4:
        x = x[np.newaxis]
    Ly, Lx = x.shape[1:3]
    if kw["diameter"] is not None and kw["diameter"] > 0:
        rescale = model.diam_mean / kw["diameter"]
    elif kw["rescale"] is None:
        rescale = model.diam_mean / model.diam_labels
    else:
        rescale = kw["rescale"]
    lowhigh = []
    for c in range(x.shape[-1]):
        xc = x[..., c]
        if np.ptp(xc) > 0:
            lowhigh.append([float(np.percentile(xc, 1.0)), float(np.percentile(xc, 99.0))])
        else:
            lowhigh.append(None)  # channel left untouched (all zeros here)
    if rescale != 1.0:
        Lyr, Lxr = int(Ly * rescale), int(Lx * rescale)
    else:
        Lyr, Lxr = Ly, Lx
    ypad1, ypad2, xpad1, xpad2 = transforms.get_pad_yx(Lyr, Lxr)
    Lyp, Lxp = Lyr + ypad1 + ypad2, Lxr + xpad1 + xpad2
    _, ysub, xsub, _, _ = transforms.make_tiles(np.zeros((1, Lyp, Lxp), np.float32),
                                                bsize=kw["bsize"], augment=kw["augment"],
                                                tile_overlap=kw["tile_overlap"])
    if kw["niter"] is None or kw["niter"] == 0:
        niter = 200 if not kw["resample"] else (1 / rescale * 200)
    else:
        niter = kw["niter"]
    return x, rescale, {
        "net_input_shape_YXC": [int(Ly), int(Lx), int(x.shape[-1])],
        "normalize_percentiles_1_99_per_channel": lowhigh,
        "rescale": float(rescale),
        "rescale_dtype": type(rescale).__name__,
        "rescale_is_exactly_one": bool(rescale == 1.0),
        "resized_shape_before_padding": [int(Lyr), int(Lxr)],
        # what int(L * rescale) gives in float64 arithmetic (numpy 1.x promotion) instead
        "resized_shape_if_float64_arithmetic": ([int(Ly * float(rescale)), int(Lx * float(rescale))]
                                                if rescale != 1.0 else [int(Ly), int(Lx)]),
        "pads_y1_y2_x1_x2": [int(ypad1), int(ypad2), int(xpad1), int(xpad2)],
        "padded_shape": [int(Lyp), int(Lxp)],
        "tiles_ysub": [[int(a), int(b)] for a, b in ysub],
        "tiles_xsub": [[int(a), int(b)] for a, b in xsub],
        "n_tiles": len(ysub),
        "niter_passed_to_dynamics": float(niter),
        "niter_steps_run": int(np.uint32(niter)),
        "compute_masks_resize": (None if (kw["resample"] or rescale == 1.0) else [int(Ly), int(Lx)]),
    }


def make_pipeline_fixtures(out: Path, prof, model, tiny_nbase):
    cases, bbbc_src = build_cases(prof, model.diam_mean)
    summary = {}
    cpu = torch.device("cpu")
    for name, img, lab, kw_case, desc in cases:
        kw = dict(EVAL_DEFAULTS)
        kw.update(kw_case)
        img_passed = img.copy()
        masks, flows, styles = model.eval(img, **kw)
        assert np.array_equal(img, img_passed), "eval modified its input"
        dP, cellprob = flows[1], flows[2]
        x_conv, rescale_raw, facts = _pipeline_facts(model, img, kw)
        assert tuple(dP.shape) == (2, *masks.shape) and cellprob.shape == masks.shape

        # mask assembly on the saved flows, exactly as CellposeModel._compute_masks does
        # (models.py:610-624 -> dynamics.resize_and_compute_masks, dynamics.py:823-872)
        cm_kwargs = dict(niter=facts["niter_passed_to_dynamics"],
                         cellprob_threshold=kw["cellprob_threshold"],
                         flow_threshold=kw["flow_threshold"], interp=kw["interp"],
                         max_size_fraction=kw["max_size_fraction"])
        masks_from_flows = dynamics.resize_and_compute_masks(
            dP.copy(), cellprob.copy(), do_3D=False, min_size=kw["min_size"],
            resize=facts["compute_masks_resize"], device=cpu, **cm_kwargs)
        # the raw output of dynamics.compute_masks (before resize / fill holes / min_size)
        masks_raw = dynamics.compute_masks(dP.copy(), cellprob.copy(), device=cpu, **cm_kwargs)
        assert np.array_equal(masks_from_flows, masks), f"{name}: masks_from_flows != eval masks"

        style_dim = tiny_nbase[-1]
        styles = np.asarray(styles, np.float32)
        assert np.all(styles[style_dim:] == 0)
        extra = {}
        if name == "synthetic_rescale":
            # network output at the resized resolution, before resample back to the input size
            xn = transforms.normalize_img(x_conv.copy(), **models.normalize_default)
            yf, _ = core.run_net(model.net, xn, bsize=kw["bsize"], augment=kw["augment"],
                                 batch_size=kw["batch_size"], tile_overlap=kw["tile_overlap"],
                                 rsz=rescale_raw)
            yf_back = transforms.resize_image(yf, x_conv.shape[1], x_conv.shape[2])
            assert np.array_equal(yf_back[0, ..., 2], cellprob)
            extra["net_yf_resized"] = yf[0]
        params = {
            "eval_kwargs": kw,
            "diam_mean": float(model.diam_mean),
            "diam_labels": float(model.diam_labels),
            "model": {"file": "tiny_cyto.pth", "nbase": list(tiny_nbase), "mkldnn": False,
                      "gpu": False, "loader": "load_cellpose3_model (CellposeModel + width shim)"},
            "derived": facts,
            "masks_from_flows_call": {
                "function": "cellpose.dynamics.resize_and_compute_masks",
                "kwargs": {**cm_kwargs, "do_3D": False, "min_size": kw["min_size"],
                           "resize": facts["compute_masks_resize"], "device": "cpu"}},
            "masks_raw_call": {"function": "cellpose.dynamics.compute_masks",
                               "kwargs": {**cm_kwargs, "min_size": -1, "device": "cpu"}},
            "description": desc,
        }
        if name == "bbbc047_crop":
            params["source"] = bbbc_src
        data = dict(img=img, masks=masks, dP=dP.astype(np.float32),
                    cellprob=cellprob.astype(np.float32), styles=styles[:style_dim],
                    masks_from_flows=masks_from_flows, masks_raw=masks_raw,
                    params_json=np.array(json.dumps(_jsonable(params), indent=1)), **extra)
        if lab is not None:
            data["labels_true"] = lab.astype(np.uint16)
            ap = metrics.average_precision(lab, masks.astype(np.int32), threshold=[0.5])[0]
            params_ap = float(ap[0, 0]) if ap.ndim == 2 else float(np.ravel(ap)[0])
        else:
            params_ap = None
        np.savez_compressed(out / f"pipeline_{name}.npz", **data)
        summary[name] = {"n_masks": int(masks.max()), "AP@0.5_vs_labels_true": params_ap,
                         "img_shape": list(img.shape), "img_dtype": str(img.dtype),
                         "rescale": facts["rescale"], "n_tiles": facts["n_tiles"],
                         "niter_steps_run": facts["niter_steps_run"], "description": desc}
        log.info("case %-22s img %s %s  masks=%d  rescale=%.4f tiles=%d niter=%d", name,
                 img.shape, img.dtype, masks.max(), facts["rescale"], facts["n_tiles"],
                 facts["niter_steps_run"])
    return summary


# --------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------

def verify(out: Path, prof, net_entries, tiny_nbase):
    report = {}
    cpu = torch.device("cpu")
    for cfg in prof["nets"]:
        name = cfg["name"]
        pth = out / f"cpnet_{name}.pth"
        with np.load(out / f"cpnet_{name}_io.npz") as z:
            io = {k: z[k] for k in z.files}
        # (1) cellpose's own loader: fresh CPnet + CPnet.load_model (resnet_torch.py:262-285)
        net = CPnet(list(cfg["nbase"]), 3, 3, mkldnn=False, max_pool=cfg["max_pool"])
        net.load_model(str(pth), device=cpu)
        y, s = cpnet_forward(net, io["x"])
        y2, s2 = cpnet_forward(net, io["x_sq"])
        d_loader = max(np.abs(y - io["y"]).max(), np.abs(s - io["style"]).max(),
                       np.abs(y2 - io["y_sq"]).max(), np.abs(s2 - io["style_sq"]).max())
        pool_after = type(net.downsample.maxpool).__name__
        # (2) plain state-dict load into a CPnet built with the recorded kwargs
        net = CPnet(**net_entries[name]["kwargs"])
        sd = torch.load(pth, map_location="cpu", weights_only=True)
        net.load_state_dict(sd, strict=True)
        y, s = cpnet_forward(net, io["x"])
        y2, s2 = cpnet_forward(net, io["x_sq"])
        d_sd = max(np.abs(y - io["y"]).max(), np.abs(s - io["style"]).max(),
                   np.abs(y2 - io["y_sq"]).max(), np.abs(s2 - io["style_sq"]).max())
        assert d_sd == 0.0, f"{name}: state-dict reload differs by {d_sd}"
        assert float(sd["diam_mean"]) == cfg["diam_mean"]
        assert float(sd["diam_labels"]) == cfg["diam_labels"]
        if cfg["max_pool"]:
            assert d_loader == 0.0, f"{name}: CPnet.load_model reload differs by {d_loader}"
        report[name] = {"CPnet.load_model_max_abs_diff": float(d_loader),
                        "CPnet.load_model_pool_layer": pool_after,
                        "load_state_dict_strict_max_abs_diff": float(d_sd)}
        log.info("verify %-18s load_model diff=%.3g (pool=%s)  state_dict diff=%.3g", name,
                 d_loader, pool_after, d_sd)

    # tiny model: reload via CellposeModel and re-run every pipeline case
    model = load_cellpose3_model(out / "tiny_cyto.pth", tiny_nbase, mkldnn=False)
    rep_tiny = {"diam_mean": float(model.diam_mean), "diam_labels": float(model.diam_labels)}
    for f in sorted(out.glob("pipeline_*.npz")):
        with np.load(f) as z:
            kw = json.loads(str(z["params_json"]))["eval_kwargs"]
            masks, flows, styles = model.eval(z["img"], **kw)
            same = (np.array_equal(masks, z["masks"]) and np.array_equal(flows[1], z["dP"])
                    and np.array_equal(flows[2], z["cellprob"])
                    and np.array_equal(np.asarray(styles)[:tiny_nbase[-1]], z["styles"]))
        assert same, f"re-running {f.name} does not reproduce the saved outputs"
        rep_tiny[f.stem] = "identical"
    report["tiny_cyto"] = rep_tiny
    log.info("verify tiny_cyto: all pipeline cases reproduce bit-for-bit after reload")

    # informational: CellposeModel's CPU default is mkldnn=True (net converted to MKLDNN
    # modules in core._forward); how far is that from the plain fp32 path stored here?
    try:
        model_mkl = load_cellpose3_model(out / "tiny_cyto.pth", tiny_nbase, mkldnn=True)
        with np.load(out / "pipeline_synthetic_gray.npz") as z:
            kw = json.loads(str(z["params_json"]))["eval_kwargs"]
            masks, flows, _ = model_mkl.eval(z["img"], **kw)
            report["mkldnn_true_vs_fixture_synthetic_gray"] = {
                "net_mkldnn_flag": bool(model_mkl.net.mkldnn),
                "dP_max_abs_diff": float(np.abs(flows[1] - z["dP"]).max()),
                "cellprob_max_abs_diff": float(np.abs(flows[2] - z["cellprob"]).max()),
                "masks_identical": bool(np.array_equal(masks, z["masks"])),
            }
    except Exception as exc:  # pragma: no cover - informational only
        report["mkldnn_true_vs_fixture_synthetic_gray"] = {"error": repr(exc)}
    log.info("mkldnn=True vs fixture: %s", report["mkldnn_true_vs_fixture_synthetic_gray"])
    return report


# --------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------

EVAL_STEPS = [
    "1. `transforms.convert_image(x, channels, channel_axis, z_axis, do_3D=False, nchan=2)` "
    "(models.py:479-482, transforms.py:452-560): float32, channels last; with `channels` given, "
    "`transforms.reshape` (563-612): `[0,0]` -> mean over channels (a 2-D image stays as is) + a "
    "zero 2nd channel; `[c1,c2]` (1-based) -> channels c1-1 (and c2-1, else zeros). A batch axis "
    "is added (483-484).",
    "2. rescale (487-490): `diam_mean/diameter` if diameter > 0, else `diam_mean/diam_labels` "
    "if `rescale is None` -- so diameter=None/0 does NOT mean rescale 1 for a trained model. "
    "`diam_mean` comes from the file as numpy.float32, so with numpy 2 (NEP 50) rescale is a "
    "float32 and run_net's `int(L * rescale)` is evaluated in float32 (e.g. 130*17/26 -> 85 in "
    "float32, 84 in float64; numpy 1.x would promote to float64); likewise niter = 200/rescale.",
    "3. `transforms.normalize_img(x, **normalize_default)` (493-516, transforms.py:615-742): "
    "per channel, only if ptp > 0, `normalize99`: (x - p1)/(p99 - p1) with `np.percentile` 1 and "
    "99 over the whole channel (transforms.py:164-194; a channel with p99-p1 <= 1e-3 becomes 0). "
    "Note `normalize_params = normalize_default` aliases and mutates the module-level dict.",
    "4. `core.run_net(net, x, bsize=224, augment=False, batch_size=8, tile_overlap=0.1, "
    "rsz=rescale if rescale != 1 else None)` (models.py:577-580, core.py:197-279): "
    "`resize_image(img, rsz=rescale)` = cv2.resize INTER_LINEAR to (int(Ly*r), int(Lx*r)); "
    "zero pad with `get_pad_yx` (div 16 + 8 px each side, transforms.py:835-849); "
    "`make_tiles` (transforms.py:90-161): tile = min(224, L), n = 1 if L <= 224 else "
    "ceil(1.2*L/224), starts `linspace(0, L-tile, n).astype(int)`; forward in batches of 8 "
    "(`_forward`: net.eval(), no_grad; core.py:175-194); `average_tiles` with `_taper_mask` "
    "(sig 7.5, transforms.py:17-37, 65-87); crop the padding; style = sum over tiles, L2 "
    "normalised (core.py:273-275).",
    "5. resample (models.py:581-583): if rescale != 1, the (Lyr, Lxr, 3) output is resized back "
    "to (Ly, Lx) with cv2 INTER_LINEAR (flow magnitudes are NOT rescaled). dP = y[..., :2] "
    "(dy, dx), cellprob = y[..., 2].",
    "6. niter (models.py:531-532): `200/rescale` (a float) when resample=True and niter is None/0, "
    "200 when resample=False; `follow_flows` truncates with `np.uint32` (dynamics.py:591).",
    "7. `dynamics.resize_and_compute_masks(dP, cellprob, niter, cellprob_threshold, "
    "flow_threshold, interp=True, resize=None unless resample=False and rescale != 1, min_size, "
    "max_size_fraction=0.4)` (models.py:610-624, dynamics.py:823-872) = `compute_masks` "
    "(874-941: pixels with cellprob > threshold; Euler integration of dP*mask/5 for niter steps "
    "with bilinear interpolation and clamping (450-523); truncation to int; `get_masks_torch` "
    "(724-820: histogram with 20 px pad, 5x5 max-pool seeds with > 10 counts, 5 rounds of 3x3 "
    "growth over bins with > 2 counts, masks > 40% of the image removed, fastremap.renumber); "
    "`remove_bad_flow_masks` if flow_threshold > 0 (605-651, metrics.flow_error: mean squared "
    "difference between masks_to_flows of each mask and dP/5, summed over y and x; removed "
    "labels are NOT renumbered)), then optional nearest-neighbour resize, then "
    "`utils.fill_holes_and_remove_small_masks(min_size)` (utils.py:620-665; note it indexes "
    "label counts positionally, which is only right for gap-free labels).",
    "8. returns `masks.squeeze()`, `[plot.dx_to_circ(dP), dP, cellprob]`, styles (540-542).",
]

def write_readme(out: Path, meta):
    L = []
    a = L.append
    a("# cellpose 3 reference fixtures")
    a("")
    a("Generated by `tests/reference/make_cellpose3_fixtures.py` (profile "
      f"`{meta['profile']}`) with cellpose {meta['versions']['cellpose']} in a separate venv "
      "(`.venv-cp3`, see the script docstring for the exact commands). **Do not edit by hand; "
      "re-run the script.**")
    a("")
    a("Regenerate:")
    a("")
    a("```")
    a(".venv-cp3/bin/python tests/reference/make_cellpose3_fixtures.py --out tests/fixtures/cellpose3")
    a("```")
    a("")
    a("## Versions")
    a("")
    for k, v in meta["versions"].items():
        a(f"- {k}: `{v}`")
    a("")
    a("## Files")
    a("")
    a("| file | bytes | what |")
    a("|---|---:|---|")
    for fname, info in meta["files"].items():
        a(f"| `{fname}` | {info['bytes']} | {info['what']} |")
    a("")
    a("## Random CPnet networks (network-level parity)")
    a("")
    a("`cellpose.resnet_torch.CPnet(**kwargs)` (nout=3, sz=3, mkldnn=False, conv_3D=False), "
      "initialised with `torch.manual_seed(seed)`; every BatchNorm2d then gets random "
      "weight/bias/running_mean/running_var (so BN is not the identity) and `diam_labels` "
      "is set to a value different from `diam_mean`. Saved with `net.save_model(path)` "
      "(= `torch.save(net.state_dict(), path)`). The `_io.npz` holds `x` (float32, "
      "B x nchan x H x W, standard normal), `y` (B x 3 x H x W) and `style` (B x nbase[-1]) "
      "from `net.eval()` + `torch.no_grad()` (`y, style, _ = net(x)`), and the same for a square "
      "input (`x_sq`, `y_sq`, `style_sq`). H and W only need to be multiples of "
      "2**(len(nbase)-2) (the number of 2x2 poolings); other sizes raise a shape error in "
      "the decoder. Constructor kwargs are in `config.json`.")
    a("")
    a("| name | nbase | max_pool | diam_mean | diam_labels | params |")
    a("|---|---|---|---:|---:|---:|")
    for name, e in meta["networks"].items():
        k = e["kwargs"]
        a(f"| `{name}` | {k['nbase']} | {k['max_pool']} | {k['diam_mean']} | "
          f"{e['diam_labels']} | {e['n_parameters_in_state_dict']} |")
    a("")
    a("State-dict layout (all files): an OrderedDict of tensors, first keys "
      "`diam_mean` (float32, shape [1]) and `diam_labels` (float32, shape [1]) -- the "
      "CPnet's own `nn.Parameter`s (requires_grad=False) -- then "
      "`downsample.down.res_down_{i}.{conv.conv_{j}.{0,2},proj.{0,1}}.*`, "
      "`upsample.up.res_up_{i}.{conv.conv_0.{0,2},conv.conv_{1,2,3}.{conv.{0,2},full},proj.{0,1}}.*`, "
      "`output.{0,2}.*`; every BatchNorm has weight/bias/running_mean/running_var and an int64 "
      "`num_batches_tracked` scalar. No other metadata (no nbase, no max_pool flag) is stored: "
      "nbase must be inferred from tensor shapes or taken from `config.json`.")
    a("")
    a("Reload caveat (cellpose 3.1.1.2 bug): `CPnet.load_model(path)` on CPU re-runs "
      "`self.__init__(self.nbase, self.nout, self.sz, self.mkldnn, self.conv_3D, self.diam_mean)` "
      "(resnet_torch.py:273-274), which passes `diam_mean` into the `max_pool` slot, so a "
      "`max_pool=False` net silently comes back with MaxPool2d. Verification results:")
    a("")
    a("```")
    a(json.dumps(meta["verification"], indent=1))
    a("```")
    a("")
    a("## tiny_cyto.pth (trained model)")
    a("")
    t = meta["tiny_cyto"]
    a(f"CPnet kwargs `{json.dumps(t['kwargs'])}`, diam_labels (mean training diameter, "
      f"written by train_seg) = {t['diam_labels']:.6f}. Trained with "
      f"`cellpose.train.train_seg(net, train_data, train_labels, **{json.dumps(t['train_seg_kwargs'])})` "
      f"in {t['train_seconds']} s on {t['train_data']}. Train loss first/last epoch: "
      f"{t['train_loss_first_last']}.")
    a("")
    a("Held-out accuracy (`cellpose.metrics.average_precision`, synthetic images from a new seed):")
    a("")
    a("```")
    a(json.dumps(meta["tiny_cyto_ap"], indent=1))
    a("```")
    a("")
    a("Loading: stock `CellposeModel(pretrained_model=path)` in 3.1.1.2 cannot load this "
      "file: it always builds `CPnet([nchan,32,64,128,256], ...)` (models.py:339-343) and "
      "run_net assumes a 256-long style (core.py:239,261). The script's `load_cellpose3_model` "
      "runs the unmodified `CellposeModel.__init__` with the CPnet class swapped for the tiny "
      "width (style zero-padded to 256 -- exact). `mkldnn=False` was used for all pipeline "
      "fixtures (plain fp32 PyTorch path).")
    a("")
    a("## pipeline_<case>.npz (pipeline parity)")
    a("")
    a("`masks, flows, styles = model.eval(img, **eval_kwargs)` with every eval argument "
      "passed explicitly (stored in `params_json['eval_kwargs']`). Keys:")
    a("")
    a("- `img`: the image exactly as passed to eval")
    a("- `masks`: eval masks (uint16, 0 = background, labels 1..N numbered by "
      "`fastremap.renumber` order)")
    a("- `dP`: `flows[1]`, float32 (2, H, W) = (dy, dx) network flow at input resolution "
      "(x5 scale as output by the net, not divided by 5)")
    a("- `cellprob`: `flows[2]`, float32 (H, W) logits")
    a("- `styles`: eval styles (first nbase[-1] entries; the rest of run_net's 256 are zero "
      "padding)")
    a("- `masks_from_flows`: `dynamics.resize_and_compute_masks(dP, cellprob, ...)` on the "
      "saved flows with the kwargs in `params_json['masks_from_flows_call']` (what "
      "`CellposeModel._compute_masks` calls); equals `masks`")
    a("- `masks_raw`: `dynamics.compute_masks(...)` output before fill-holes / min_size "
      "(kwargs in `params_json['masks_raw_call']`)")
    a("- `labels_true` (synthetic cases only): ground-truth instance labels")
    a("- `net_yf_resized` (synthetic_rescale only): run_net output (Lyr, Lxr, 3) = "
      "(dy, dx, cellprob) at the resized resolution, before resample back to input size")
    a("- `params_json`: JSON string with `eval_kwargs`, `diam_mean`, `diam_labels`, `model`, "
      "`derived` (normalisation 1/99 percentiles per channel, rescale, resized shape, pads, "
      "padded shape, tile grid, niter passed to dynamics and steps actually run), the "
      "`masks_from_flows_call` / `masks_raw_call` and, for the real image, its source")
    a("")
    a("| case | img | rescale | tiles | niter steps | masks | AP@0.5 vs labels_true | notes |")
    a("|---|---|---:|---:|---:|---:|---:|---|")
    for name, s in meta["pipeline"].items():
        ap = "-" if s["AP@0.5_vs_labels_true"] is None else f"{s['AP@0.5_vs_labels_true']:.3f}"
        a(f"| `{name}` | {s['img_shape']} {s['img_dtype']} | {s['rescale']:.4f} | {s['n_tiles']} | "
          f"{s['niter_steps_run']} | {s['n_masks']} | {ap} | {s['description']} |")
    a("")
    a("## What CellposeModel.eval does in 3.1.1.2 (2-D, single image; file:line in cellpose/)")
    a("")
    for line in EVAL_STEPS:
        a(line)
    a("")
    a("## Keys / shapes / dtypes of every npz")
    a("")
    for fname, rows in meta["npz_layout"].items():
        a(f"- `{fname}`: " + ", ".join(f"`{k}` {dt} {list(sh)}" for k, dt, sh in rows))
    a("")
    (out / "README.md").write_text("\n".join(L) + "\n")


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def _generate(out: Path, prof, args):
    """Write every fixture into ``out``; returns (file names, start time)."""
    t_start = time.time()

    net_entries = make_network_fixtures(out, prof)
    tiny_info = train_tiny_model(out, prof)
    tiny_nbase = prof["tiny"]["nbase"]
    model = load_cellpose3_model(out / "tiny_cyto.pth", tiny_nbase, mkldnn=False)
    assert float(model.diam_mean) == prof["tiny"]["diam_mean"]
    tiny_ap = evaluate_tiny(model, prof)
    log.info("tiny model AP: %s", json.dumps(tiny_ap))
    if tiny_ap["gray_diameter_diam_mean"]["AP@0.5"] <= 0.6:
        log.warning("tiny model AP@0.5 <= 0.6 -- training did not converge well")
    pipeline = make_pipeline_fixtures(out, prof, model, tiny_nbase)
    verification = verify(out, prof, net_entries, tiny_nbase)

    import cv2
    import scipy
    import tifffile
    versions = {
        "cellpose": CELLPOSE_VERSION, "torch": torch.__version__, "numpy": np.__version__,
        "scipy": scipy.__version__, "opencv": cv2.__version__,
        "fastremap": _pkg_version("fastremap") if _pkg_version else "?",
        "numba": _pkg_version("numba") if _pkg_version else "?",
        "tifffile": tifffile.__version__, "python": platform.python_version(),
        "torch_num_threads": torch.get_num_threads(),
    }
    what = {"tiny_cyto.pth": "trained tiny CPnet (train_seg), cellpose 3 state-dict format",
            "config.json": "constructor kwargs, versions, AP, verification, sha256 of all files",
            "README.md": "generated description of the fixtures (this file)"}
    for name, e in net_entries.items():
        what[e["files"]["weights"]] = f"random CPnet `{name}` (save_model)"
        what[e["files"]["io"]] = f"input / eval-forward output of `{name}`"
    for name in pipeline:
        what[f"pipeline_{name}.npz"] = f"CellposeModel.eval case `{name}`"

    meta = {
        "generator": "tests/reference/make_cellpose3_fixtures.py",
        "profile": args.profile,
        "versions": versions,
        "networks": net_entries,
        "tiny_cyto": tiny_info,
        "tiny_cyto_ap": tiny_ap,
        "pipeline": pipeline,
        "verification": verification,
        "runtime_seconds": None,
    }
    # config.json / README need the final file list; write twice (README size is then stable)
    files = [*sorted(p.name for p in out.iterdir() if p.is_file()), "config.json", "README.md"]
    files = sorted(set(files))
    meta["npz_layout"] = {f: _describe_npz(out / f) for f in files if f.endswith(".npz")}
    meta["files"] = {}
    write_readme(out, {**meta, "files": {f: {"bytes": "?", "what": what.get(f, "")} for f in files}})
    meta["runtime_seconds"] = round(time.time() - t_start, 1)
    sha = {f: _sha256(out / f) for f in files if f not in ("config.json", "README.md")}
    cfg = {k: meta[k] for k in ("generator", "profile", "versions", "runtime_seconds")}
    cfg.update({"networks": net_entries, "tiny_cyto": {**tiny_info, "ap": tiny_ap},
                "pipeline": pipeline, "verification": verification, "sha256": sha})
    (out / "config.json").write_text(json.dumps(_jsonable(cfg), indent=1) + "\n")
    meta["files"] = {f: {"bytes": (out / f).stat().st_size if f != "README.md" else "(this file)",
                         "what": what.get(f, "")} for f in files}
    write_readme(out, meta)

    return files, t_start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="small")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="override the tiny model's n_epochs (smoke tests only; the committed "
                         "fixtures use the profile default)")
    ap.add_argument("--allow-other-cellpose", action="store_true",
                    help="do not abort if cellpose is not 3.1.1.x")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("cellpose", "cellpose.core", "cellpose.models", "cellpose.dynamics",
                 "cellpose.transforms", "cellpose.metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("cellpose.train").setLevel(logging.INFO)  # loss every 10 epochs
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

    if not CELLPOSE_VERSION.startswith("3.1.1") and not args.allow_other_cellpose:
        sys.exit(f"cellpose {CELLPOSE_VERSION} found; these fixtures must be made with 3.1.1.x")
    torch.set_num_threads(args.threads)
    prof = copy.deepcopy(PROFILES[args.profile])
    if args.epochs is not None:
        prof["tiny"]["n_epochs"] = args.epochs
    final_out = args.out.resolve()
    final_out.mkdir(parents=True, exist_ok=True)
    # build everything in a scratch directory next to the target, then swap the files in
    # (so readers of the fixture directory never see a half-written set)
    out = Path(tempfile.mkdtemp(prefix=".tmp_cp3fix_", dir=final_out.parent))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the scratch dir is removed
    try:
        files, t_start = _generate(out, prof, args)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise

    for old in (list(final_out.glob("cpnet_*")) + list(final_out.glob("pipeline_*.npz"))
                + [final_out / n for n in ("tiny_cyto.pth", "config.json", "README.md")]):
        if old.name not in files and old.exists():
            old.unlink()
    for f in files:
        os.replace(out / f, final_out / f)
    shutil.rmtree(out, ignore_errors=True)
    out = final_out

    total = sum((out / f).stat().st_size for f in files)
    log.info("wrote %d files, %.2f MB, in %.1f s", len(files), total / 1e6, time.time() - t_start)
    for f in files:
        log.info("  %-40s %9d", f, (out / f).stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
