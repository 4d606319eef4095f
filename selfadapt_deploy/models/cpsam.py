"""Cellpose-SAM (``cpsam``, ``cpsam_v2``) through cellpose ≥ 4.2's own ``cellpose.vit.CPSAM``.

The forward pass is cellpose's own code. ``embed`` pools the encoder neck (CPSAM's second output,
"style", is all zeros). Small networks of the same family (same module structure and forward,
a narrower/shallower ViT) are built for tests and the demo by :func:`build_cpsam`.
"""

from __future__ import annotations

from functools import partial
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from selfadapt_deploy.errors import ModelLoadError
from selfadapt_deploy.models.base import DemoRecipe, SegmentationNet, is_identity_readout, load_strict

# Cellpose-SAM as released: SAM ViT-L encoder, patch 8, 256-pixel tiles
VITL = {"embed_dim": 1024, "depth": 24, "num_heads": 16, "out_chans": 256, "ps": 8, "bsize": 256}


def _cpsam_class():
    """Import lazily: cellpose.vit pulls in segment_anything and sets a global TF32 flag."""
    try:
        from cellpose.vit import CPSAM
    except ImportError as exc:  # cellpose < 4.2 named the module vit_sam
        raise ModelLoadError(
            f"Cellpose-SAM needs cellpose>=4.2,<5 (cellpose.vit.CPSAM); import failed: {exc}"
        ) from exc
    return CPSAM


def _small_cpsam(embed_dim: int, depth: int, num_heads: int, out_chans: int, ps: int,
                 bsize: int, mlp_ratio: float, nout: int = 3) -> nn.Module:
    """A CPSAM instance with a small global-attention ViT; forward is cellpose's CPSAM.forward."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    CPSAM = _cpsam_class()
    net = CPSAM.__new__(CPSAM)
    super(CPSAM, net).__init__(dtype=torch.float32)  # BaseModel: diam_mean/diam_labels params
    net.rdrop, net.backbone, net.nout, net.ps = 0.4, "sam_vitl", nout, ps
    net.encoder = ImageEncoderViT(
        img_size=bsize, patch_size=ps, in_chans=3, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio, out_chans=out_chans,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=0,
    )
    net.out = nn.Conv2d(out_chans, nout * ps**2, kernel_size=1)
    net.W2 = nn.Parameter(
        torch.eye(nout * ps**2).reshape(nout * ps**2, nout, ps, ps), requires_grad=False
    )
    return net


def sdpa_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's ``Attention.forward`` (global attention, decomposed relative-position
    bias) with the softmax(QKᵀ·scale + bias)·V computed by ``scaled_dot_product_attention``, the
    bias as its additive mask: the same function, without the hand-written B·heads×N×N softmax
    (memory-efficient kernels on GPUs). ``scale`` is SDPA's default, head_dim^−½, as SAM's."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    b, h, w, _ = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if attn.use_rel_pos:
        r_q = q.reshape(b * heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, attn.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, attn.rel_pos_w))
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, heads, h * w, h * w)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return attn.proj(y.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def sdpa_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's ``Block.forward`` with :func:`sdpa_attention` (windowed blocks, which
    Cellpose-SAM does not have, keep their own forward)."""
    if block.window_size > 0:
        return block(x)
    x = x + sdpa_attention(block.attn, block.norm1(x))
    return x + block.mlp(block.norm2(x))


class CellposeSAM(SegmentationNet):
    """Wraps a ``cellpose.vit.CPSAM``; tiles are fixed (position embeddings are not interpolated)."""

    family = "cpsam"
    title = "Cellpose-SAM"
    model_names = ("cpsam", "cpsam_v2")
    download_url = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/"
    pads_missing_channels = False
    cuda_precision = "bf16"  # as cellpose 4 runs it (fp16 risks overflow in the ViT)
    has_attention = True
    adapt_defaults = MappingProxyType({"lr": 1e-5, "l2sp": 1e-2})  # cellpose 4's fine-tuning lr
    # the demo's 4-block ViT trains longer and adapts at 10× cellpose 4's fine-tuning lr (1e-5 is
    # for the 300 M-parameter network, under which this one barely moves)
    demo = DemoRecipe(source_iterations=800, source_lr=2e-3, adapt_lr=1e-4)
    citation = ("Pachitariu, Rariden & Stringer (2025). Cellpose-SAM: superhuman generalization for "
                "cellular segmentation. bioRxiv.", "10.1101/2025.04.28.651001")
    fixed_tile = True

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.tile_size = int(net.encoder.pos_embed.shape[1]) * int(net.ps)
        self.w2_is_identity = is_identity_readout(net.W2)  # how export_forward reads out

    @property
    def nchan(self) -> int:
        return 3  # CPSAM slices its patch-embedding weights to the 1–3 channels it is given

    @property
    def diam_mean(self) -> float:
        return float(self.net.diam_mean.item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]

    def export_forward(self, x: torch.Tensor, sdpa: bool = False) -> torch.Tensor:
        """cellpose's ``CPSAM.forward`` in eval mode, restated for tracing (equal outputs, tested):
        cellpose reads the patch embedding through ``.data``, which a tracer freezes into an
        anonymous constant (no refit, no weight sync); and the read-out ``W2`` is an identity
        kernel, so its transposed convolution is exactly a pixel shuffle — no ConvTranspose in
        the graph (TensorRT's weak spot in bf16). A file whose W2 is not the identity keeps the
        transposed convolution, in float32. With ``sdpa`` the encoder's attention runs through
        ``scaled_dot_product_attention`` (:func:`sdpa_block`), equal to rounding."""
        net = self.net
        proj = net.encoder.patch_embed.proj
        x = F.conv2d(x, proj.weight[:, : x.shape[1]], bias=proj.bias, stride=net.ps)
        x = x.permute(0, 2, 3, 1) + net.encoder.pos_embed
        for block in net.encoder.blocks:
            x = sdpa_block(block, x) if sdpa else block(x)
        y = net.out(net.encoder.neck(x.permute(0, 3, 1, 2)))
        if self.w2_is_identity:
            return F.pixel_shuffle(y, net.ps)
        return F.conv_transpose2d(y.float(), net.W2.float(), stride=net.ps).to(y.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = self.net.encoder.neck.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            self.net(x)
        finally:
            hook.remove()
        return F.normalize(captured[0].mean(dim=(-2, -1)), dim=1)

    def perturb_first_features(self, perturb):
        """The patch embeddings plus position embedding (B×H×W×C), as the first transformer block
        receives them. The hook fires in cellpose's own block forward (native attention), not in
        the fused ``sdpa_block``: run a perturbed network with ``attention="native"``."""
        def pre_hook(_module, args):
            return (perturb(args[0], -1), *args[1:])

        return self.net.encoder.blocks[0].register_forward_pre_hook(pre_hook)

    def native_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.net.state_dict().items()}

    @classmethod
    def recognises(cls, keys) -> bool:
        return ("W2" in keys and "encoder.patch_embed.proj.weight" in keys
                and "encoder.cls_token" not in keys)

    @classmethod
    def build_demo(cls, tile: int, diam_mean: float, seed: int) -> CellposeSAM:
        """A 4-block ViT, 8-pixel patches, the tile as its fixed input size. ``diam_mean`` is not
        used: Cellpose-SAM's is fixed at cellpose 4's 30 pixels."""
        return build_cpsam(embed_dim=64, depth=4, num_heads=4, out_chans=32, ps=8, bsize=tile, seed=seed)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str = "<state dict>"):
        """Infer the ViT's size from weight shapes, build it, load strictly."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            proj = state["encoder.patch_embed.proj.weight"]
            w2 = state["W2"]
            embed_dim, ps, nout = int(proj.shape[0]), int(w2.shape[-1]), int(w2.shape[1])
            depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
            head_dim = int(state["encoder.blocks.0.attn.rel_pos_h"].shape[1])
            out_chans = int(state["encoder.neck.0.weight"].shape[0])
            bsize = int(state["encoder.pos_embed"].shape[1]) * ps
            mlp_ratio = state["encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed_dim
        except (KeyError, ValueError, IndexError) as exc:
            raise ModelLoadError(f"{source}: not a Cellpose-SAM state dict (missing {exc})") from exc
        config = {"embed_dim": embed_dim, "depth": depth, "num_heads": embed_dim // head_dim,
                  "out_chans": out_chans, "ps": ps, "bsize": bsize}
        if config == VITL and nout == 3:
            net = _cpsam_class()(dtype=torch.float32)
        else:
            net = _small_cpsam(mlp_ratio=mlp_ratio, nout=nout, **config)
        load_strict(net, state, source)
        return cls(net)


def build_cpsam(embed_dim: int = 32, depth: int = 2, num_heads: int = 2, out_chans: int = 16,
                ps: int = 8, bsize: int = 64, seed: int = 0) -> CellposeSAM:
    """A small, randomly initialised Cellpose-SAM-family network for tests and the demo."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = _small_cpsam(embed_dim, depth, num_heads, out_chans, ps, bsize, mlp_ratio=4.0)
    return CellposeSAM(net)
