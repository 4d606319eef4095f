"""Cellpose 3 residual U-Net (``CPnet``), state-dict compatible with cellpose 3.x weight files.

Cellpose ≥ 4 removed this class and refuses these files, so the project owns it. Module names
mirror cellpose 3's ``resnet_torch.py`` exactly, so ``state_dict()`` *is* a cellpose 3 file.
Parity with cellpose 3.1.1.2 is asserted in ``tests/test_cpnet_parity.py``.
"""

from __future__ import annotations

import re
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from selfadapt_deploy.errors import ModelLoadError
from selfadapt_deploy.models.base import DemoRecipe, SegmentationNet, load_strict

DEFAULT_NBASE = (2, 32, 64, 128, 256)
DEMO_NBASE = (1, 16, 32, 64)  # the demo's small grayscale U-Net


def _bn_relu_conv(cin: int, cout: int, sz: int) -> nn.Sequential:
    """BatchNorm → ReLU → conv (cellpose's ``batchconv``: indices 0, 1, 2)."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=1e-5, momentum=0.05),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, sz, padding=sz // 2),
    )


def _bn_conv(cin: int, cout: int, sz: int) -> nn.Sequential:
    """BatchNorm → conv, no ReLU (cellpose's ``batchconv0``, the residual projection)."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=1e-5, momentum=0.05),
        nn.Conv2d(cin, cout, sz, padding=sz // 2),
    )


class _ResDown(nn.Module):
    """Two residual pairs of 3×3 convs; the first pair has a 1×1 projection shortcut."""

    def __init__(self, cin: int, cout: int, sz: int):
        super().__init__()
        self.conv = nn.Sequential()  # registered before proj, as in cellpose (state-dict key order)
        for t in range(4):
            self.conv.add_module(f"conv_{t}", _bn_relu_conv(cin if t == 0 else cout, cout, sz))
        self.proj = _bn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](self.conv[0](x))
        return x + self.conv[3](self.conv[2](x))


class _Encoder(nn.Module):
    def __init__(self, nbase: list[int], sz: int, max_pool: bool):
        super().__init__()
        self.down = nn.Sequential()
        self.pool = nn.MaxPool2d(2, 2) if max_pool else nn.AvgPool2d(2, 2)
        for n in range(len(nbase) - 1):
            self.down.add_module(f"res_down_{n}", _ResDown(nbase[n], nbase[n + 1], sz))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for n, block in enumerate(self.down):
            feats.append(block(x if n == 0 else self.pool(feats[-1])))
        return feats


class _StyleConv(nn.Module):
    """Adds a linear projection of the style vector as a per-channel bias, then BN-ReLU-conv."""

    def __init__(self, cin: int, cout: int, style_channels: int, sz: int):
        super().__init__()
        self.conv = _bn_relu_conv(cin, cout, sz)
        self.full = nn.Linear(style_channels, cout)

    def forward(self, style: torch.Tensor, x: torch.Tensor, skip: torch.Tensor | None = None):
        if skip is not None:
            x = x + skip
        return self.conv(x + self.full(style)[:, :, None, None])


class _ResUp(nn.Module):
    def __init__(self, cin: int, cout: int, style_channels: int, sz: int):
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", _bn_relu_conv(cin, cout, sz))
        for t in (1, 2, 3):
            self.conv.add_module(f"conv_{t}", _StyleConv(cout, cout, style_channels, sz))
        self.proj = _bn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](style, self.conv[0](x), skip=skip)
        return x + self.conv[3](style, self.conv[2](style, x))


class _Decoder(nn.Module):
    def __init__(self, nbaseup: list[int], sz: int):
        super().__init__()
        self.up = nn.Sequential()
        for n in range(1, len(nbaseup)):
            self.up.add_module(
                f"res_up_{n - 1}", _ResUp(nbaseup[n], nbaseup[n - 1], nbaseup[-1], sz)
            )

    def forward(self, style: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        x = self.up[-1](feats[-1], feats[-1], style)
        for n in range(len(self.up) - 2, -1, -1):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self.up[n](x, feats[n], style)
        return x


def _style(deepest: torch.Tensor) -> torch.Tensor:
    """Cellpose's style vector: global mean of the deepest features, L2-normalised. Computed in
    float32 at any network precision (in fp16 the sum of squares overflows); fp32 is unchanged."""
    style = deepest.float().mean(dim=(-2, -1))
    return (style / torch.sum(style**2, dim=1, keepdim=True) ** 0.5).to(deepest.dtype)


class CPnet(SegmentationNet):
    """Cellpose 3 U-Net: nbase ``[nchan, 32, 64, 128, 256]`` by default, 224-pixel tiles."""

    family = "cpnet"
    title = "Cellpose 3 U-Net"
    # cyto/cyto2/cyto3/nuclei and the Cellpose 2.0 / 3.0 model zoo
    model_names = (
        "cyto3", "cyto2", "cyto", "nuclei", "cyto2_cp3", "tissuenet_cp3", "livecell_cp3",
        "yeast_PhC_cp3", "yeast_BF_cp3", "bact_phase_cp3", "bact_fluor_cp3", "deepbacs_cp3",
        "neurips_cellpose_default", "neurips_grayscale_cyto2",
        "CP", "CPx", "TN1", "TN2", "TN3", "LC1", "LC2", "LC3", "LC4",
    )
    download_url = "https://www.cellpose.org/models/"
    pads_missing_channels = True
    # fp16: on an H100 faster than bf16 (2036 vs 1825 tiles/s, ../shared/GPU_FACTS.md), and its
    # 10-bit mantissa keeps masks closer to fp32 (AP@0.5 agreement on the six real bbbc047
    # fields: fp16 0.992–1.0, bf16 0.977–1.0; the style vector stays fp32)
    cuda_precision = "fp16"
    channels_last_on_cuda = True
    cpu_runtime = "onnx"  # the same graph 1.5-2x faster than torch on 2 cores (issue 23)
    adapt_defaults = MappingProxyType({"lr": 1e-4, "l2sp": 1e-2})
    demo = DemoRecipe(source_iterations=200)
    citation = ("Stringer, Wang, Michaelos & Pachitariu (2021). Cellpose: a generalist algorithm for "
                "cellular segmentation. Nature Methods 18, 100–106.", "10.1038/s41592-020-01018-x")
    tile_size = 224
    fixed_tile = False

    @classmethod
    def cache_file_name(cls, name: str) -> str:
        """cellpose 3 adds ``torch_0`` to three legacy models' file names."""
        return f"{name}torch_0" if name in ("cyto", "cyto2", "nuclei") else name

    @classmethod
    def recognises(cls, keys) -> bool:
        return "output.2.weight" in keys and any(k.startswith("downsample.down.") for k in keys)

    @classmethod
    def build_demo(cls, tile: int, diam_mean: float, seed: int) -> CPnet:
        """The demo's grayscale U-Net (:data:`DEMO_NBASE`; any tile; seeded by ``seed``)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(DEMO_NBASE, diam_mean=diam_mean)

    def __init__(
        self,
        nbase: tuple[int, ...] | list[int] = DEFAULT_NBASE,
        nout: int = 3,
        sz: int = 3,
        max_pool: bool = True,
        diam_mean: float = 30.0,
    ):
        super().__init__()
        nbase = list(nbase)
        self.nbase, self.nout, self.sz = nbase, nout, sz
        nbaseup = [*nbase[1:], nbase[-1]]
        self.downsample = _Encoder(nbase, sz, max_pool)
        self.upsample = _Decoder(nbaseup, sz)
        self.output = _bn_relu_conv(nbaseup[0], nout, 1)
        # saved in cellpose 3 files; diam_labels is the training set's mean diameter
        self.diam_mean_ = nn.Parameter(torch.ones(1) * diam_mean, requires_grad=False)
        self.diam_labels = nn.Parameter(torch.ones(1) * diam_mean, requires_grad=False)

    # cellpose 3 stores the parameter under the name "diam_mean"; keep that key in the state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        items = list(destination.items())  # rename in place, keeping cellpose's key order
        destination.clear()
        for key, value in items:
            destination[prefix + "diam_mean" if key == prefix + "diam_mean_" else key] = value

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "diam_mean" in state_dict:
            state_dict[prefix + "diam_mean_"] = state_dict.pop(prefix + "diam_mean")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def nchan(self) -> int:
        return self.nbase[0]

    @property
    def diam_mean(self) -> float:
        return float(self.diam_mean_.item())

    @property
    def default_diameter(self) -> float:
        """cellpose 3 segments at the training set's scale: rescale = diam_mean / diam_labels."""
        return float(self.diam_labels.item())

    def forward_with_style(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs and the style vector, as cellpose 3's ``CPnet.forward`` returns them."""
        feats = self.downsample(x)
        style = _style(feats[-1])
        return self.output(self.upsample(style, feats)), style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_style(x)[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return _style(self.downsample(x)[-1])

    def perturb_first_features(self, perturb):
        """The first encoder block's output (B×C×H×W at full resolution)."""
        return self.downsample.down[0].register_forward_hook(lambda _m, _i, out: perturb(out, 1))

    def native_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str = "<state dict>") -> CPnet:
        """Build the architecture the weights describe (nbase, nout, kernel size) and load strictly."""
        pattern = re.compile(r"downsample\.down\.res_down_(\d+)\.conv\.conv_0\.2\.weight")
        blocks = sorted((int(m.group(1)), k) for k in state if (m := pattern.fullmatch(k)))
        if not blocks or "output.2.weight" not in state:
            raise ModelLoadError(f"{source}: not a Cellpose 3 U-Net (CPnet) state dict")
        first = state[blocks[0][1]]
        nbase = [int(first.shape[1])] + [int(state[k].shape[0]) for _, k in blocks]
        diam = float(state["diam_mean"].item()) if "diam_mean" in state else 30.0
        net = cls(nbase, nout=int(state["output.2.weight"].shape[0]), sz=int(first.shape[-1]),
                  diam_mean=diam)
        state = dict(state)
        if "diam_mean" not in state:
            raise ModelLoadError(f"{source}: CPnet file lacks 'diam_mean'; it is not a cellpose 3 file")
        state.setdefault("diam_labels", state["diam_mean"])  # absent in some older cellpose files
        load_strict(net, state, source)
        return net
