"""Model families: contract, strict loading, name resolution, cellpose's own CPSAM forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from selfadapt_deploy.errors import ModelLoadError
from selfadapt_deploy.models import CellposeSAM, CPnet, detect_family, load_model


@pytest.mark.parametrize("family", ["tiny_cpnet", "tiny_cpsam", "tiny_cpdino"])
def test_contract_shapes_and_embedding(family, request):
    net = request.getfixturevalue(family)
    x = torch.randn(2, 2, net.tile_size if net.fixed_tile else 48, net.tile_size if net.fixed_tile else 64)
    with torch.no_grad():
        y, e = net(x), net.embed(x)
    assert y.shape == (2, 3, *x.shape[2:])
    assert e.ndim == 2 and e.shape[0] == 2
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("family", ["tiny_cpnet", "tiny_cpsam", "tiny_cpdino"])
def test_save_load_round_trip_detects_family(family, request, tmp_path):
    net = request.getfixturevalue(family)
    path = tmp_path / "w.pth"
    net.save(path)
    loaded = load_model(path)
    assert type(loaded) is type(net) and loaded.family == net.family
    assert loaded.diam_mean == net.diam_mean
    x = torch.randn(1, 2, net.tile_size, net.tile_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    # the file is the family's own cellpose format: no wrapper prefixes
    state = torch.load(path, weights_only=True)
    assert detect_family(state) == net.family
    assert not any(k.startswith("net.") for k in state)


def test_cpsam_forward_is_cellposes_own(tiny_cpsam):
    from cellpose.vit import CPSAM

    assert isinstance(tiny_cpsam.net, CPSAM)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tiny_cpsam(x), CPSAM.forward(tiny_cpsam.net, x)[0])


def test_cpnet_infers_architecture_from_weights():
    net = CPnet((1, 8, 16), sz=5, diam_mean=23.0)
    again = CPnet.from_state_dict(net.state_dict())
    assert again.nbase == [1, 8, 16] and again.sz == 5 and again.diam_mean == 23.0 and again.nchan == 1


def test_missing_key_is_an_error(tiny_cpnet, tmp_path):
    state = tiny_cpnet.state_dict()
    del state["output.2.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ModelLoadError, match=r"missing keys .*output\.2\.bias"):
        load_model(tmp_path / "broken.pth")


def test_extra_key_is_an_error(tiny_cpsam, tmp_path):
    state = tiny_cpsam.native_state_dict()
    state["surprise"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(ModelLoadError, match=r"unexpected keys .*surprise"):
        load_model(tmp_path / "extra.pth")


def test_unknown_and_corrupt_files_are_errors(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match=r"not a state dict of any known family \(Cellpose 3 U-Net"):
        load_model(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match="not a readable PyTorch weights file"):
        load_model(tmp_path / "junk.pth")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError) as info:  # one line naming the file, not torch's unpickler text
        load_model(tmp_path / "random.pth")
    assert str(info.value).startswith(str(tmp_path / "random.pth")) and "\n" not in str(info.value)
    assert "weights_only" not in str(info.value)
    torch.save({"w": np.zeros(2)}, tmp_path / "pickled.pth")  # a numpy object: never unpickled
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        load_model(tmp_path / "pickled.pth")


def test_mistyped_name_suggests_close_names():
    with pytest.raises(ModelLoadError, match=r"Did you mean .*cyto3"):
        load_model("cyto33")


def test_offline_name_says_what_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))

    def offline(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setattr("cellpose.utils.download_url_to_file", offline)
    with pytest.raises(ModelLoadError) as err:
        load_model("nuclei")
    msg = str(err.value)
    assert "nucleitorch_0" in msg and str(tmp_path / "nucleitorch_0") in msg
    assert not (tmp_path / "nucleitorch_0").exists()


def test_name_resolves_from_cellpose_cache(tmp_path, monkeypatch, tiny_cpnet):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    tiny_cpnet.save(tmp_path / "cyto3")
    assert isinstance(load_model("cyto3"), CPnet)
    assert CPnet.cache_file_name("cyto2") == "cyto2torch_0"


def test_run_directory_loads_model_pt(tmp_path, tiny_cpsam):
    tiny_cpsam.save(tmp_path / "model.pt")
    assert isinstance(load_model(tmp_path), CellposeSAM)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no model\.pt"):
        load_model(tmp_path / "empty")


@pytest.mark.slow
def test_full_size_cpsam_state_dict_builds_cellposes_class():
    from cellpose.vit import CPSAM

    state = CPSAM(dtype=torch.float32).state_dict()
    net = CellposeSAM.from_state_dict(state)
    assert type(net.net) is CPSAM and net.tile_size == 256


def test_an_unknown_family_is_an_error_never_a_cpnet():
    from selfadapt_deploy.models.families import family_class, family_of_model_name

    with pytest.raises(ModelLoadError,
                       match=r"unknown model family 'vit'; sa-deploy knows cpnet, cpsam, cpdino"):
        family_class("vit")
    assert family_class("cpsam") is CellposeSAM and family_of_model_name("cyto3") is CPnet
    assert family_of_model_name("cpsam_v2") is CellposeSAM and family_of_model_name("vit") is None


def test_every_family_declares_the_registry_facts():
    """What models/base.py says a family declares, present and of the right kind on each class."""
    from selfadapt_deploy.models.families import FAMILIES
    from selfadapt_deploy.runtime.graphs import PRECISIONS

    for name, cls in FAMILIES.items():
        assert cls.family == name and cls.title and cls.model_names and cls.download_url
        assert isinstance(cls.pads_missing_channels, bool) and cls.cuda_precision in PRECISIONS
        assert set(cls.adapt_defaults) == {"lr", "l2sp"} and len(cls.citation) == 2
    names = [n for cls in FAMILIES.values() for n in cls.model_names]
    assert len(names) == len(set(names))  # a released name belongs to one family


def test_no_family_name_is_compared_outside_models():
    """Family facts live on the family classes (models/): shipped code asks them, never compares
    ``family == "cpsam"``-style strings or keys dicts by family name."""
    import re

    root = Path(__file__).resolve().parents[1]
    families = "|".join(("cpnet", "cpsam", "cpdino"))
    pattern = re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({families})["']|["']({families})["']\s*(==|!=|:)""")
    found = []
    for folder in ("selfadapt_deploy", "trainer", "export"):
        for path in (root / folder).rglob("*.py"):
            if "models" in path.relative_to(root).parts:
                continue
            found += [f"{path.relative_to(root)}:{i}: {line.strip()}"
                      for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)
