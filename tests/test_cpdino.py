"""Cellpose-DINO in pure torch: cellpose's own outputs (fixtures), cellpose's own forward (training
included), strict loading of the released key tables, ONNX export, training, embed and perturbation."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from selfadapt_deploy.errors import ModelLoadError
from selfadapt_deploy.models.cpdino import (
    VITB16,
    VITL16,
    CellposeDINO,
    build_cpdino,
    cpdino_variant,
    is_cpdino_state,
)

# cellpose's outputs, made where dinov3 is importable (../shared/fixtures/cpdino/make_fixtures.py)
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "cpdino"


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@torch.no_grad()
def test_matches_cellpose_fixtures():
    state = torch.load(_fixture("cpdino_tiny.pth"), map_location="cpu", weights_only=True)
    io_ = torch.load(_fixture("cpdino_tiny_io.pt"), map_location="cpu", weights_only=True)
    assert is_cpdino_state(state) and cpdino_variant(state) is None  # toy width 128
    net = CellposeDINO.from_state_dict(state, "cpdino_tiny.pth").eval()
    assert net.net.encoder.blocks[0].attn.num_heads == 2 and net.w2_is_identity
    for x, y in ((io_["x3"], io_["y3"]), (io_["x2"], io_["y2"])):  # 3 channels; 2 (sliced weights)
        out = net(x)
        assert _max_diff(out, y) <= 1e-5
        for sdpa in (False, True):
            assert _max_diff(net.export_forward(x, sdpa=sdpa), out) <= 1e-5


def test_matches_cellpose_forward_in_training(monkeypatch):
    """cellpose's own CPDINO.forward around our encoder (cellpose builds it through the name
    ``dinov3_vitb16``): equal outputs and gradients in eval and in training (rdrop, RoPE rescale
    and their random draws in cellpose's order), and no gradient into the patch embedding."""
    import cellpose.vit as cv

    ours = build_cpdino(depth=3, layerscale_init=0.5, seed=1)
    monkeypatch.setattr(cv, "dinov3_vitb16", lambda pretrained=False: ours.net.encoder, raising=False)
    ref = cv.CPDINO(model_name="vitb")
    ref.load_state_dict(ours.net.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))

    def run(module: torch.nn.Module, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Output and gradients (by cellpose's names) of one seeded forward/backward."""
        module.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        y = forward(x)
        y.square().mean().backward()
        return y.detach(), {k.removeprefix("net."): p.grad.clone() for k, p in module.named_parameters()
                            if p.grad is not None}

    for training in (False, True):
        ours.train(training), ref.train(training)
        y_ref, g_ref = run(ref, lambda x: ref(x)[0])
        y_ours, g_ours = run(ours, ours)
        assert _max_diff(y_ours, y_ref) == 0
        assert g_ours.keys() == g_ref.keys() and "encoder.blocks.0.attn.qkv.weight" in g_ours
        assert all(torch.equal(g_ours[k], g_ref[k]) for k in g_ref)
        assert "encoder.patch_embed.proj.weight" not in g_ours  # cellpose reads it through .data


@pytest.mark.parametrize(("table", "variant", "config"),
                         [("keys_vitb16.json", "cpdino-vitb", VITB16),
                          ("keys_vitl16.json", "cpdino", VITL16)])
def test_released_key_tables_load_strictly(table, variant, config):
    """Shapes only (meta tensors): the 300 M-parameter network is never allocated."""
    keys = json.loads(_fixture(table).read_text())
    state = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    assert is_cpdino_state(state) and cpdino_variant(state) == variant
    net = CellposeDINO.from_state_dict(dict(state), table)
    built = net.net.state_dict()
    assert list(built) == list(keys)  # same names, in cellpose's order
    assert {k: list(v.shape) for k, v in built.items()} == keys
    enc = net.net.encoder
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads, enc.blocks[0].mlp.fc1.out_features,
            enc.n_storage_tokens) == tuple(config.values())
    assert net.tile_size == 384 and not net.fixed_tile and net.nchan == 3


def test_bad_state_dicts_raise_model_load_error():
    good = build_cpdino().native_state_dict()
    assert is_cpdino_state(good) and cpdino_variant(good) is None
    CellposeDINO.from_state_dict(dict(good))  # the unchanged state loads
    for key, pattern in (("encoder.blocks.1.ls2.gamma", "missing"),          # a block's weight
                         ("encoder.blocks.0.mlp.fc1.weight", "fc1"),          # one sizes are read from
                         ("encoder.storage_tokens", "not a Cellpose-DINO")):  # no storage tokens
        state = {k: v for k, v in good.items() if k != key}
        with pytest.raises(ModelLoadError, match=pattern):
            CellposeDINO.from_state_dict(state, "bad.pth")
    wrong = dict(good)
    wrong["encoder.blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    with pytest.raises(ModelLoadError, match="wrong shape"):
        CellposeDINO.from_state_dict(wrong, "bad.pth")
    extra = {**good, "encoder.blocks.2.norm1.weight": torch.ones(64)}  # a third, partial block
    with pytest.raises(ModelLoadError, match="missing"):
        CellposeDINO.from_state_dict(extra, "bad.pth")


def test_onnx_export_dynamic_tiles():
    """torch's dynamo exporter as the project runs it (opset 18, no optimiser), batch and H/W
    dynamic (multiples of 16): one graph serves 64×64 and 96×64 tiles."""
    ort = pytest.importorskip("onnxruntime")
    net = build_cpdino(seed=2).eval()

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, tiles: torch.Tensor) -> torch.Tensor:
            return self.net.export_forward(tiles)

    dims = {0: torch.export.Dim("batch", min=1), 2: 16 * torch.export.Dim("height16", min=1),
            3: 16 * torch.export.Dim("width16", min=1)}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Graph(), (torch.zeros(2, 3, 64, 64),), input_names=["tiles"],
                                    output_names=["flows"], opset_version=18, dynamo=True, optimize=False,
                                    dynamic_shapes={"tiles": dims}, verbose=False)
    model = program.model_proto
    names = {i.name for i in model.graph.initializer}
    assert "net.net.encoder.patch_embed.proj.weight" in names  # a named weight, not a constant
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in ((1, 3, 64, 64), (2, 3, 96, 64)):
        x = rng.standard_normal(shape, dtype=np.float32)
        with torch.no_grad():
            want = net(torch.from_numpy(x)).numpy()
        got = session.run(None, {"tiles": x})[0]
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4


def test_rope_rescale_only_in_training():
    """dinov3's RoPE restated: token centres in [-1, 1] per axis, in training scaled by one factor
    exp(U(−ln 2, ln 2)) per call (``rescale_coords=2``, drawn from the global RNG)."""
    rope = build_cpdino(embed_dim=64, num_heads=2).net.encoder.rope_embed
    h, w = 3, 5

    def dinov3(factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        coords = (2 * torch.stack([ys, xs], -1).reshape(-1, 2) - 1) * factor
        angles = (2 * math.pi * coords[:, :, None] / rope.periods).reshape(h * w, -1).tile(2)
        return angles.sin(), angles.cos()

    assert torch.allclose(rope.periods, 100 ** (torch.arange(8) / 8))  # base 100, head dim 32
    for training in (False, True):
        rope.train(training)
        torch.manual_seed(7)
        got = rope(H=h, W=w)
        torch.manual_seed(7)
        factor = float(torch.empty(1).uniform_(-math.log(2), math.log(2)).exp()) if training else 1.0
        assert all(_max_diff(g, e) <= 1e-6 for g, e in zip(got, dinov3(factor), strict=True))


def test_training_rdrop_embed_and_perturbation():
    net = build_cpdino(layerscale_init=0.5, seed=0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    state = torch.random.get_rng_state()
    build_cpdino(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # building leaves the global RNG alone
    with torch.no_grad():
        y_eval = net.eval()(x)
        net.train()
        torch.manual_seed(0)
        y_train = net(x)
        assert _max_diff(y_train, y_eval) > 1e-4  # training differs (layer drop, RoPE rescale) ...
        torch.manual_seed(0)
        assert torch.equal(net(x), y_train)  # ... reproducibly
        # without RoPE rescale and with rdrop 1, the last of 2 blocks is always skipped
        net.net.encoder.rope_embed.rescale_coords, net.net.rdrop = None, 1.0
        one_block = copy.deepcopy(net).eval()
        one_block.net.encoder.blocks = one_block.net.encoder.blocks[:1]
        assert _max_diff(net(x), one_block(x)) <= 1e-6
        net.net.rdrop = 0.0
        assert _max_diff(net(x), y_eval) <= 1e-6
    net.net.rdrop, net.net.encoder.rope_embed.rescale_coords = 0.4, 2.0
    net(x).square().mean().backward()
    assert net.net.encoder.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert net.net.out.weight.grad.abs().sum() > 0

    net.eval()
    with torch.no_grad():
        emb = net.embed(x)
        assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-6)
        seen: list[tuple[int, ...]] = []

        def halve(f: torch.Tensor, channel_dim: int) -> torch.Tensor:
            seen.append((tuple(f.shape), channel_dim))
            return f * 0.5

        handle = net.perturb_first_features(halve)
        perturbed = net(x)
        assert seen == [((2, 64, 64), -1)]  # the 8×8 patch tokens only, channels last
        assert _max_diff(perturbed, y_eval) > 1e-3
        assert _max_diff(net.export_forward(x), perturbed) <= 1e-5  # fires in export_forward too
        handle.remove()
        assert torch.equal(net(x), y_eval)


def test_state_dict_round_trip():
    net = build_cpdino(embed_dim=32, num_heads=2, seed=3, diam_mean=17.0, tile_size=96).eval()
    again = CellposeDINO.from_state_dict(net.native_state_dict(), tile_size=96).eval()
    x = torch.randn(1, 1, 48, 32, generator=torch.Generator().manual_seed(2))  # one channel
    with torch.no_grad():
        assert torch.equal(again(x), net(x)) and again(x).shape == (1, 3, 48, 32)
    assert again.diam_mean == pytest.approx(17.0) and again.tile_size == 96
    assert CellposeDINO.recognises(set(net.native_state_dict()))
    assert not CellposeDINO.recognises({"W2", "encoder.patch_embed.proj.weight", "encoder.pos_embed"})


@pytest.mark.slow
def test_cpdino_runs_everywhere_a_family_does(tmp_path):
    """A Cellpose-DINO weights file through the commands: segment with TTA, pseudo-label, ACTIS
    and CULPICO adaptation, export with a bioimage.io package (validated by bioimageio.spec)."""
    import tifffile
    from typer.testing import CliRunner

    from selfadapt_deploy.cli import app
    from selfadapt_deploy.synthetic import random_labels, render

    runner = CliRunner()
    weights = tmp_path / "dino.pt"
    build_cpdino(seed=0).save(weights)
    images, pairs = tmp_path / "images", tmp_path / "labelled"
    images.mkdir(), pairs.mkdir()
    for seed in range(3):
        labels = random_labels((80, 96), 10, seed=seed)
        tifffile.imwrite(images / f"a{seed}.tif", (render(labels, seed=seed) * 1000).astype(np.uint16))
    tifffile.imwrite(pairs / "b.tif", (render(labels, seed=9) * 1000).astype(np.uint16))
    tifffile.imwrite(pairs / "b_masks.tif", labels.astype(np.uint16))
    cpu = ["--device", "cpu"]
    seg = runner.invoke(app, ["segment", str(images / "a0.tif"), "--model", str(weights), "--out",
                              str(tmp_path / "masks"), "--tta", *cpu])
    assert seg.exit_code == 0, seg.output
    assert "model: cpdino" in seg.output and (tmp_path / "masks" / "a0_masks.tif").is_file()
    pseudo = runner.invoke(app, ["pseudo-label", str(images / "a0.tif"), "--model", str(weights),
                                 "--out", str(tmp_path / "pseudo"), *cpu])
    assert pseudo.exit_code == 0, pseudo.output
    assert (tmp_path / "pseudo" / "a0_pseudo.npz").is_file()
    short = ["--iterations", "2", "--batch-size", "2", "--eval-every", "1", *cpu]
    for method, extra in (("actis", ["--labelled", str(pairs)]), ("culpico", ["--source", str(pairs)])):
        run = runner.invoke(app, ["adapt", str(images), "--model", str(weights), "--out",
                                  str(tmp_path / method), "--method", method, *extra, *short])
        assert run.exit_code == 0, run.output
        assert json.loads((tmp_path / method / "run.json").read_text())["family"] == "cpdino"
    pytest.importorskip("bioimageio.spec")
    exported = runner.invoke(app, ["export", str(tmp_path / "actis"), "--out", str(tmp_path / "export"),
                                   "--bioimageio", str(tmp_path / "pkg"), "--author", "A. B."])
    assert exported.exit_code == 0, exported.output
    assert "validated by bioimageio.spec" in exported.output
    assert json.loads((tmp_path / "export" / "manifest.json").read_text())["family"] == "cpdino"
