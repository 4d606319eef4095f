"""Cellpose-DINO (``cpdino``, ``cpdino-vitb``): cellpose 4.2's ``cellpose.vit.CPDINO`` in pure torch.

cellpose builds CPDINO's encoder with facebookresearch/dinov3, which is not on the package index.
This module restates the DINOv3 ViT that CPDINO uses (axial RoPE, CLS + storage tokens, masked
k-bias, layer scale, LayerNorm ε 1e-5, GELU MLP) with dinov3's module, parameter and buffer names,
so cellpose's state dicts load strictly, and CPDINO's forward on top of it with dinov3's arithmetic
(tested against cellpose's own outputs). Small variants for tests and the demo: :func:`build_cpdino`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from selfadapt_deploy.errors import ModelLoadError
from selfadapt_deploy.models.base import SegmentationNet, is_identity_readout, load_strict
from selfadapt_deploy.models.cpsam import CellposeSAM

#: cellpose's tile side for CPDINO (``bsize`` 384); any multiple of 16 works, RoPE has no fixed size
DEFAULT_TILE = 384
#: the encoders of the released networks (dinov3's ``dinov3_vitl16`` / ``dinov3_vitb16``)
VITL16 = {"embed_dim": 1024, "depth": 24, "num_heads": 16, "ffn_dim": 4096, "n_storage_tokens": 4}
VITB16 = {"embed_dim": 768, "depth": 12, "num_heads": 12, "ffn_dim": 3072, "n_storage_tokens": 4}
#: cellpose's name of a released network by feature width (``cellpose.models.get_backbone``)
VARIANTS = {1024: "cpdino", 768: "cpdino-vitb"}
_SIGNATURE = ("encoder.cls_token", "encoder.storage_tokens", "W2")


def is_cpdino_state(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are Cellpose-DINO's (CLS and storage tokens, and CPDINO's ``W2``)."""
    names = {k.removeprefix("module.") for k in keys}
    return all(k in names for k in _SIGNATURE)


def cpdino_variant(state: Mapping[str, Tensor]) -> str | None:
    """'cpdino' (ViT-L) or 'cpdino-vitb' from the patch embedding's width, as cellpose tells them
    apart; None for any other width (small networks built here)."""
    weight = state.get("encoder.patch_embed.proj.weight", state.get("module.encoder.patch_embed.proj.weight"))
    return None if weight is None else VARIANTS.get(int(weight.shape[0]))


# ---- the DINOv3 ViT, with dinov3's names (dinov3/layers/*, dinov3/models/vision_transformer.py) ----


class LayerScale(nn.Module):
    """Per-channel residual scale ``x · gamma``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class LinearKMaskedBias(nn.Linear):
    """The fused qkv projection whose bias is multiplied by the ``bias_mask`` buffer (1 for q and v,
    0 for k). dinov3 registers the mask as NaN and fills 1/0/1 in ``init_weights``; it is built
    filled here, so a network never holds a NaN mask (files carry the filled mask)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=True)
        mask = torch.ones(out_features)
        mask[out_features // 3: 2 * out_features // 3] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class Mlp(nn.Module):
    """fc1 → exact GELU → fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """``x·cos + rotate_half(x)·sin``, rotate_half([a, b]) = [−b, a] (halves of the head dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos) + (torch.cat([-x2, x1], dim=-1) * sin)


class SelfAttention(nn.Module):
    """Multi-head self-attention; RoPE rotates q and k of the patch tokens only (the tokens after
    the prefix: N − h·w, the CLS and storage tokens), in the RoPE's float32 as dinov3 does."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = LinearKMaskedBias(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, sdpa: bool = True) -> Tensor:
        """``sdpa``: ``scaled_dot_product_attention`` (dinov3's own); else softmax(q·kᵀ·scale)·v
        written out (the exported graph)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            sin, cos = rope
            prefix, dtype = q.shape[-2] - sin.shape[-2], q.dtype
            q, k = q.to(sin.dtype), k.to(sin.dtype)
            q = torch.cat((q[:, :, :prefix], rope_apply(q[:, :, prefix:], sin, cos)), dim=-2).to(dtype)
            k = torch.cat((k[:, :, :prefix], rope_apply(k[:, :, prefix:], sin, cos)), dim=-2).to(dtype)
        if sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, layerscale_init: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)  # dinov3's "layernormbf16"
        self.attn = SelfAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, ffn_dim)
        self.ls2 = LayerScale(dim, layerscale_init)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, sdpa: bool = True) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope, sdpa))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """16×16 patch convolution, re-strided by cellpose to ``ps`` with ``ps/2`` padding (h = H/ps)."""

    def __init__(self, in_chans: int, dim: int, ps: int, patch_size: int = 16):
        super().__init__()
        pad = ps // 2 if ps < patch_size else 0
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=ps, padding=pad)
        self.norm = nn.Identity()  # dinov3 builds PatchEmbed without a norm layer


class RopePositionEmbedding(nn.Module):
    """dinov3's axial RoPE, ``normalize_coords="separate"``: token centres (i + ½)/h and (j + ½)/w
    mapped to [−1, 1], angles 2π·coord/period per axis (periods ``base^(4i/D_head)``, a persistent
    buffer), tiled over both halves of the head dim. In training each call draws one log-uniform
    factor in [1/rescale, rescale] for the coordinates, as dinov3 does (``rescale_coords``)."""

    def __init__(self, head_dim: int, base: float = 100.0, rescale_coords: float | None = 2.0):
        super().__init__()
        self.base, self.rescale_coords, self.dtype = base, rescale_coords, torch.float32
        n = head_dim // 4
        self.register_buffer("periods", base ** (2 * torch.arange(n, dtype=self.dtype) / (head_dim // 2)))

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        dd = {"device": self.periods.device, "dtype": self.dtype}
        coords_h = torch.arange(0.5, H, **dd) / H
        coords_w = torch.arange(0.5, W, **dd) / W
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if self.training and self.rescale_coords is not None:
            top = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, **dd).uniform_(-top, top).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


class DinoVisionTransformer(nn.Module):
    """The encoder as ``dinov3.hub.backbones.dinov3_vit{l,b}16`` builds it (the parts CPDINO uses;
    ``mask_token`` is kept so state dicts match, and is not used, as in CPDINO)."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, ffn_dim: int, n_storage_tokens: int = 4,
                 ps: int = 8, layerscale_init: float = 1e-5, rope_base: float = 100.0,
                 rescale_coords: float | None = 2.0, in_chans: int = 3):
        super().__init__()
        if embed_dim % (4 * num_heads):
            raise ValueError(f"RoPE needs a head dim divisible by 4; got {embed_dim}/{num_heads}")
        self.embed_dim, self.n_storage_tokens = embed_dim, n_storage_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(in_chans, embed_dim, ps)
        self.rope_embed = RopePositionEmbedding(embed_dim // num_heads, rope_base, rescale_coords)
        self.blocks = nn.ModuleList(SelfAttentionBlock(embed_dim, num_heads, ffn_dim, layerscale_init)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def init_weights(self) -> None:
        """dinov3's ``init_weights`` (what ``pretrained=False`` gives): truncated-normal linears,
        zero biases, layer scale at its init value, uniform patch embedding, N(0, 0.02) tokens."""
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, m.init_values)
        proj = self.patch_embed.proj
        bound = math.sqrt(1 / (proj.in_channels * proj.kernel_size[0] ** 2))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.uniform_(proj.bias, -bound, bound)


class CPDINONet(nn.Module):
    """cellpose's ``CPDINO`` module (same state dict): the encoder's patch tokens → ``out`` (a linear
    read-out of 3·ps² values per token) → ``W2`` (fixed; identity) transposed convolution to pixels."""

    def __init__(self, encoder: DinoVisionTransformer, ps: int = 8, nout: int = 3, rdrop: float = 0.4):
        super().__init__()
        self.diam_labels = nn.Parameter(torch.tensor([30.0]), requires_grad=False)
        self.diam_mean = nn.Parameter(torch.tensor([30.0]), requires_grad=False)
        self.rdrop, self.ps, self.nout = rdrop, ps, nout
        self.encoder = encoder
        self.out = nn.Linear(encoder.embed_dim, nout * ps**2)
        eye = torch.eye(nout * ps**2).reshape(nout * ps**2, nout, ps, ps)
        self.W2 = nn.Parameter(eye, requires_grad=False)

    def encode(self, x: Tensor, sdpa: bool = True, frozen_patch_embed: bool = True
               ) -> tuple[Tensor, int, int]:
        """Final-norm patch tokens (B×h·w×D) and the token grid (h, w), as CPDINO.forward computes
        them. ``frozen_patch_embed``: the patch embedding enters detached, as cellpose's ``.data``
        reads make it (it is not trained); export passes False (named graph weights). In training,
        block i is skipped per sample with probability rdrop·i/(depth−1) (cellpose's ``rdrop``) and
        the RoPE draws a new rescale for every block, in cellpose's order of random draws."""
        enc = self.encoder
        proj = enc.patch_embed.proj
        weight, bias = proj.weight[:, : x.shape[1]], proj.bias
        if frozen_patch_embed:
            weight, bias = weight.detach(), bias.detach()
        x = F.conv2d(x, weight, bias, stride=proj.stride, padding=proj.padding)
        h, w = x.shape[-2], x.shape[-1]
        x = enc.patch_embed.norm(x.flatten(2).transpose(1, 2))
        b = x.shape[0]
        x = torch.cat([enc.cls_token.expand(b, -1, -1), enc.storage_tokens.expand(b, -1, -1), x], dim=1)
        nlay = len(enc.blocks)
        if self.training and self.rdrop > 0:
            skip = (torch.rand((b, nlay), device=x.device)
                    < torch.linspace(0, self.rdrop, nlay, device=x.device)).to(x.dtype)
            for i, blk in enumerate(enc.blocks):
                mask = skip[:, i, None, None]
                x = x * mask + blk(x, enc.rope_embed(H=h, W=w), sdpa) * (1 - mask)
        else:
            rope = enc.rope_embed(H=h, W=w)  # eval: the same for every block, computed once
            for blk in enc.blocks:
                x = blk(x, enc.rope_embed(H=h, W=w) if self.training else rope, sdpa)
        return enc.norm(x)[:, 1 + enc.n_storage_tokens:], h, w

    def readout(self, tokens: Tensor, h: int, w: int, pixel_shuffle: bool = False) -> Tensor:
        """Tokens → B×nout×(h·ps)×(w·ps); ``pixel_shuffle`` is exact when W2 is the identity."""
        y = self.out(tokens).reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)
        if pixel_shuffle:
            return F.pixel_shuffle(y, self.ps)
        return F.conv_transpose2d(y, self.W2, stride=self.ps, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """CPDINO.forward's first output (its second, a random 256-vector, is not drawn)."""
        return self.readout(*self.encode(x))


class CellposeDINO(SegmentationNet):
    """Cellpose-DINO behind the family contract; tiles may be any multiple of 16 (RoPE)."""

    family = "cpdino"
    title = "Cellpose-DINO"
    model_names = ("cpdino", "cpdino-vitb")
    download_url = CellposeSAM.download_url  # cellpose 4 downloads both from one place
    pads_missing_channels = False
    cuda_precision = "bf16"  # as cellpose 4 runs it (use_bfloat16=True)
    has_attention = True
    # Cellpose-SAM's: cellpose 4's fine-tuning lr (not tuned for this family) and the demo's ViT
    # recipe; cellpose ships CPDINO beside Cellpose-SAM, without a paper of its own (4.2.1.1)
    adapt_defaults = CellposeSAM.adapt_defaults
    demo = CellposeSAM.demo
    citation = CellposeSAM.citation
    fixed_tile = False

    def __init__(self, net: CPDINONet, tile_size: int = DEFAULT_TILE):
        super().__init__()
        if tile_size % 16:
            raise ValueError(f"tile_size must be a multiple of 16, got {tile_size}")
        self.net, self.tile_size = net, tile_size
        self.w2_is_identity = is_identity_readout(net.W2)  # how export_forward reads out

    @property
    def nchan(self) -> int:
        return 3  # CPDINO slices its patch-embedding weights to the 1–3 channels it is given

    @property
    def diam_mean(self) -> float:
        return float(self.net.diam_mean.item())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def export_forward(self, x: Tensor, sdpa: bool = False) -> Tensor:
        """CPDINO's forward in eval mode, restated for tracing (equal outputs, tested): the patch
        embedding is read as named weights (not ``.data``), the RoPE tables are computed once, the
        identity ``W2`` read-out is a pixel shuffle (a file whose W2 is not the identity keeps the
        transposed convolution, in float32), and attention is written out unless ``sdpa``."""
        tokens, h, w = self.net.encode(x, sdpa=sdpa, frozen_patch_embed=False)
        if self.w2_is_identity:
            return self.net.readout(tokens, h, w, pixel_shuffle=True)
        return self.net.readout(tokens.float(), h, w).to(tokens.dtype)

    def embed(self, x: Tensor) -> Tensor:
        """Mean of the final-norm patch tokens, L2-normalised (B×D)."""
        return F.normalize(self.net.encode(x)[0].mean(dim=1), dim=1)

    def perturb_first_features(self, perturb: Callable[[Tensor, int], Tensor]) -> RemovableHandle:
        """The patch tokens (B×h·w×D) as the first block receives them, not the CLS and storage
        tokens (learned constants, not image features). Fires in every path (forward, embed and
        export_forward with either attention): all call the block module."""
        prefix = 1 + self.net.encoder.n_storage_tokens

        def pre_hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (torch.cat([x[:, :prefix], perturb(x[:, prefix:], -1)], dim=1), *args[1:])

        return self.net.encoder.blocks[0].register_forward_pre_hook(pre_hook)

    def native_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.net.state_dict().items()}

    @classmethod
    def recognises(cls, keys: Iterable[str]) -> bool:
        return is_cpdino_state(keys)

    @classmethod
    def build_demo(cls, tile: int, diam_mean: float, seed: int) -> CellposeDINO:
        """A 4-block, 64-wide ViT (4 heads), 8-pixel patches, ``tile``-pixel tiles."""
        return build_cpdino(embed_dim=64, depth=4, num_heads=4, tile_size=tile, diam_mean=diam_mean,
                            seed=seed)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], source: str = "<state dict>",
                        tile_size: int = DEFAULT_TILE) -> CellposeDINO:
        """Read the sizes from the shapes (width: patch embedding; depth: block keys; FFN width:
        fc1; storage tokens; head dim: 4 × RoPE periods; ps and outputs: W2), build the network
        without initialising it (on the meta device, then allocated where the state lies; a
        meta-device state gives a meta network, shapes only), load strictly."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        absent = [k for k in _SIGNATURE if k not in state]
        if absent:
            raise ModelLoadError(f"{source}: not a Cellpose-DINO state dict (missing {', '.join(absent)})")
        try:
            proj = state["encoder.patch_embed.proj.weight"]
            w2 = state["W2"]
            embed_dim, ps, nout = int(proj.shape[0]), int(w2.shape[-1]), int(w2.shape[1])
            depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
            ffn_dim = int(state["encoder.blocks.0.mlp.fc1.weight"].shape[0])
            n_storage = int(state["encoder.storage_tokens"].shape[1])
            head_dim = 4 * int(state["encoder.rope_embed.periods"].shape[0])
        except (KeyError, ValueError, IndexError) as exc:
            raise ModelLoadError(f"{source}: not a Cellpose-DINO state dict (missing {exc})") from exc
        if head_dim == 0 or embed_dim % head_dim:
            raise ModelLoadError(f"{source}: width {embed_dim} is not a multiple of the RoPE's head "
                                 f"dim {head_dim}")
        with torch.device("meta"):
            encoder = DinoVisionTransformer(embed_dim, depth, embed_dim // head_dim, ffn_dim, n_storage, ps,
                                            in_chans=int(proj.shape[1]))
            net = CPDINONet(encoder, ps=ps, nout=nout)
        if proj.device.type != "meta":
            net = net.to_empty(device=proj.device)
        load_strict(net, state, source)
        return cls(net, tile_size)


def build_cpdino(embed_dim: int = 64, depth: int = 2, num_heads: int = 1, ffn_ratio: float = 4.0,
                 n_storage_tokens: int = 4, ps: int = 8, nout: int = 3, tile_size: int = 64,
                 diam_mean: float = 30.0, layerscale_init: float = 1e-5, seed: int = 0) -> CellposeDINO:
    """A small, randomly initialised Cellpose-DINO-family network (dinov3's and cellpose's
    initialisation) for tests and the demo; the global RNG is untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = DinoVisionTransformer(embed_dim, depth, num_heads, int(embed_dim * ffn_ratio),
                                        n_storage_tokens, ps, layerscale_init)
        encoder.init_weights()
        net = CPDINONet(encoder, ps=ps, nout=nout)
    net.diam_mean.data.fill_(diam_mean)
    return CellposeDINO(net, tile_size)
