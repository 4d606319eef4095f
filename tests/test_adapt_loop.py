"""The adaptation loop on CPU: run-directory files, snapshot selection, exact resume after a kill."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from selfadapt_deploy.models import load_model
from selfadapt_deploy.segment import SegmentParams
from selfadapt_deploy.synthetic import random_labels, render
from selfadapt_deploy.trainer.data import TileSampler, prepare_image
from selfadapt_deploy.trainer.loop import AdaptConfig, Validation, adapt, split_indices

CONFIG = AdaptConfig(iterations=6, batch_size=2, eval_every=3, stop="none", seed=3, select="last")


def kill_at(kill_step: int):
    """A progress callback that interrupts the run after ``kill_step`` (as a kill would)."""
    def progress(step, terms):
        if step == kill_step:
            raise KeyboardInterrupt
    return progress


def setup(trained_cpnet_path):
    net = load_model(trained_cpnet_path)
    raw = [np.stack([render(random_labels((96, 96), 14, seed=s), seed=s, gamma=1.5),
                     np.zeros((96, 96), np.float32)]) for s in range(3)]
    train = TileSampler([prepare_image(im, 1.0) for im in raw[:2]], tile=64)
    tiles = TileSampler([prepare_image(raw[2], 1.0)], tile=64).sample(2, torch.Generator())
    return net, train, Validation(images=[raw[2]], tiles=tiles, params=SegmentParams())


def test_adapt_writes_the_run_directory(tmp_path, trained_cpnet_path):
    net, train, val = setup(trained_cpnet_path)
    summary = adapt(net, train, val, tmp_path / "run", CONFIG)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "iter_000000.pt", "iter_000003.pt", "iter_000006.pt"]
    assert summary["selected_iteration"] == 6 and not summary["stopped_early"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["iteration"] for r in rows if r["d_emb"]] == ["0", "3", "6"]
    assert float(rows[0]["d_emb"]) == 0 and float(rows[0]["fn_rate"]) == 0
    evals = [r for r in rows if r["d_emb"]]  # every label-free signal is logged at every evaluation
    assert all(float(r["flow_err"]) >= 0 and float(r["tta_spread"]) >= 0 for r in evals)
    assert evals[0]["agree_prev"] == "" and all(0 <= float(r["agree_prev"]) <= 1 for r in evals[1:])
    assert all(float(r["loss"]) > 0 for r in rows if r["loss"])
    assert json.loads((run / "run.json").read_text())["config"]["lr"] == 1e-4  # CPnet default
    adapted = load_model(run)  # model.pt loads wherever a model is accepted
    before = load_model(trained_cpnet_path).state_dict()["output.2.weight"]
    assert not torch.equal(adapted.state_dict()["output.2.weight"], before)


def test_stopping_selects_the_snapshot_before_the_crossing(tmp_path, trained_cpnet_path):
    net, train, val = setup(trained_cpnet_path)
    cfg = AdaptConfig(**{**CONFIG.__dict__, "stop": "emb", "tau_emb": 1e-9, "lr": 1e-2, "select": "stop"})
    summary = adapt(net, train, val, tmp_path / "run", cfg)
    assert summary["stopped_early"] and summary["selected_iteration"] == 0
    assert summary["selection"]["pretrained_deployed"]
    assert "the pretrained model is deployed" in summary["selection"]["why"]
    assert "d_emb" in summary["stop_reason"]
    assert summary["iterations_run"] == 3


@pytest.mark.parametrize("kill_step", [2, 4])  # before the first evaluation after θ0's, and after it
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, trained_cpnet_path, kill_step):
    net, train, val = setup(trained_cpnet_path)
    adapt(net, train, val, tmp_path / "full", CONFIG)

    net, train, val = setup(trained_cpnet_path)
    with pytest.raises(KeyboardInterrupt):
        adapt(net, train, val, tmp_path / "killed", CONFIG, progress=kill_at(kill_step))
    assert not (tmp_path / "killed" / "model.pt").exists()
    net, train, val = setup(trained_cpnet_path)
    adapt(net, train, val, tmp_path / "killed", CONFIG, resume=True)
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    assert ((tmp_path / "killed" / "metrics.csv").read_text()
            == (tmp_path / "full" / "metrics.csv").read_text())


@pytest.mark.parametrize("select", ["consensus-averages", "guarded-dropout-averages"])
def test_a_resumed_run_keeps_its_pool_and_selects_as_an_uninterrupted_run(tmp_path, trained_cpnet_path,
                                                                          select):
    cfg = AdaptConfig(**{**CONFIG.__dict__, "select": select, "lr": 1e-2})
    net, train, val = setup(trained_cpnet_path)
    full = adapt(net, train, val, tmp_path / "full", cfg)
    net, train, val = setup(trained_cpnet_path)
    with pytest.raises(KeyboardInterrupt):
        adapt(net, train, val, tmp_path / "killed", cfg, progress=kill_at(4))
    assert sorted(p.name for p in (tmp_path / "killed" / "pool").iterdir()) == ["iter_000000", "iter_000003"]
    net, train, val = setup(trained_cpnet_path)
    resumed = adapt(net, train, val, tmp_path / "killed", cfg, resume=True)
    assert {k: v for k, v in resumed["selection"].items() if k != "seconds"} == {
        k: v for k, v in full["selection"].items() if k != "seconds"}
    assert ((tmp_path / "killed" / "selection.csv").read_text()
            == (tmp_path / "full" / "selection.csv").read_text())
    a, b = (torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("full", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    table = list(csv.DictReader(open(tmp_path / "full" / "selection.csv")))
    names = [r["candidate"] for r in table]
    assert names[:3] == ["iter_000000", "iter_000003", "iter_000006"]
    assert names[3:] == ["swa", "wise-0.25", "wise-0.50", "wise-0.75"]
    assert all(0 <= float(r["consensus50_averages"]) <= 1 for r in table)
    assert load_model(tmp_path / "full" / "averages" / "swa.pt").family == "cpnet"
    if select == "guarded-dropout-averages":  # every candidate, the averages too, has its dropout signal
        assert all(0 <= float(r["dropout_err"]) <= 1 for r in table)


def test_resume_refuses_a_checkpoint_that_holds_more_than_tensors(tmp_path, trained_cpnet_path):
    from selfadapt_deploy.errors import SaDeployError

    net, train, val = setup(trained_cpnet_path)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"step": 1, "payload": np.arange(3)}, run / "checkpoint.pt")  # a pickled object
    with pytest.raises(SaDeployError, match=r"checkpoint\.pt: the checkpoint holds pickled Python objects"):
        adapt(net, train, val, run, CONFIG, resume=True)
    (run / "checkpoint.pt").write_bytes(b"\x00garbage")
    with pytest.raises(SaDeployError, match=r"checkpoint\.pt: not a readable PyTorch checkpoint"):
        adapt(net, train, val, run, CONFIG, resume=True)


def test_flow_rule_deploys_the_snapshot_with_the_lowest_flow_error(tmp_path, trained_cpnet_path):
    net, train, val = setup(trained_cpnet_path)
    summary = adapt(net, train, val, tmp_path / "run", AdaptConfig(**{**CONFIG.__dict__, "stop": "flow",
                                                                      "lr": 1e-2, "select": "stop"}))
    evals = [r for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["d_emb"]]
    expected, lowest = 0, float(evals[0]["flow_err"])
    for r in evals[1:]:  # a new lowest must beat the lowest so far by 2 %
        if float(r["flow_err"]) < 0.98 * lowest:
            expected, lowest = int(r["iteration"]), float(r["flow_err"])
    assert summary["selected_iteration"] == expected
    assert "flow_err" in summary["selection"]["why"]


def test_split_indices():
    assert split_indices(1, 0.2, 0) == ([0], [0])
    train, val = split_indices(10, 0.2, 0)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert split_indices(2, 0.9, 0)[0]  # never leaves training empty


def test_teacher_in_onnxruntime_gives_the_torch_pseudo_labels_at_every_sync(tmp_path,
                                                                            trained_cpnet_path):
    """--teacher-runtime onnx: at each sync point (every 2 steps) the exported teacher graph, with
    the EMA's weights pushed in, gives the torch teacher's pseudo-labels on that step's tiles."""
    net, train, val = setup(trained_cpnet_path)
    cfg = AdaptConfig(**{**CONFIG.__dict__, "teacher_runtime": "onnx", "teacher_sync": 2})
    adapt(net, train, val, tmp_path / "run", cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    synced = {int(r["iteration"]): float(r["teacher_err"]) for r in rows if r["teacher_err"]}
    assert sorted(synced) == [1, 3, 5]  # steps 0, 2, 4
    assert max(synced.values()) <= 1e-4
    assert (tmp_path / "run" / "teacher_engine" / "teacher_tta.onnx").is_file()
    assert load_model(tmp_path / "run").family == "cpnet"


def test_a_teacher_runtime_that_disagrees_with_torch_stops_the_run(trained_cpnet_path, monkeypatch,
                                                                  tmp_path):
    """A runner whose weights did not follow the EMA (here: the sync is skipped after the teacher
    moved) is caught at the sync point instead of silently training on wrong pseudo-labels."""
    from selfadapt_deploy.errors import SaDeployError
    from selfadapt_deploy.trainer.engine_teacher import open_engine_teacher

    net = load_model(trained_cpnet_path)
    engine = open_engine_teacher(net, "onnx", "fp32", tmp_path, torch.device("cpu"), 1, 2)
    x = torch.rand(2, 2, 64, 64)
    _, metrics = engine(x, 0)
    assert metrics["teacher_err"] <= 1e-4
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    monkeypatch.setattr(engine.runner, "update_weights", lambda weights: None)
    with pytest.raises(SaDeployError, match="disagrees with the torch teacher at step 1"):
        engine(x, 1)
    engine.close()


# ---- ACTIS: labelled target tiles in every batch; selection by held-out labelled AP ----------
def labelled_tiles(seed: int = 7, n: int = 2):
    from selfadapt_deploy.trainer.source import LabelledTiles

    labels = [random_labels((96, 96), 14, seed=seed + k) for k in range(n)]
    images = [prepare_image(np.stack([render(lab, seed=seed + k, gamma=1.5), np.zeros((96, 96), np.float32)]),
                            1.0) for k, lab in enumerate(labels)]
    return LabelledTiles(images, labels, tile=64)


def test_actis_loss_is_the_supervised_plus_the_consistency_term(trained_cpnet_path, monkeypatch):
    import selfadapt_deploy.trainer.step as step_module
    from selfadapt_deploy.trainer.augment import StrongAugment
    from selfadapt_deploy.trainer.confidence import ConfidenceMasks
    from selfadapt_deploy.trainer.ema import EMA
    from selfadapt_deploy.trainer.source import cellpose_loss
    from selfadapt_deploy.trainer.step import Adaptation, train_step

    net, train, _ = setup(trained_cpnet_path)
    params = [p for p in net.parameters() if p.requires_grad]
    state = Adaptation(student=net, teacher=EMA(net), optimizer=torch.optim.AdamW(params, lr=1e-4),
                       anchors=[p.detach().clone() for p in params], masks=ConfidenceMasks(),
                       augment=StrongAugment(), lambda_bal=0.5, lambda_l2sp=1e-2)
    g = torch.Generator().manual_seed(0)
    x, (x_l, t_l) = train.sample(3, g), labelled_tiles().sample(1, g)
    outputs, consistency_inputs = [], []
    net.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))  # the student only
    original = step_module.cellprob_loss
    monkeypatch.setattr(step_module, "cellprob_loss",
                        lambda y, *a: consistency_inputs.append(y.detach()) or original(y, *a))
    terms = train_step(state, x, 0, g, (x_l, t_l))
    (y,) = outputs
    assert y.shape[0] == 4  # one forward: 3 unlabelled tiles and the labelled one
    torch.testing.assert_close(consistency_inputs[0], y[:3, 2])  # consistency on the unlabelled
    assert terms["loss_sup"] == pytest.approx(cellpose_loss(y[3:], t_l).item(), rel=1e-5)
    total = terms["loss_prob"] + 0.5 * terms["loss_flow"] + 1e-2 * terms["loss_l2sp"] + terms["loss_sup"]
    assert terms["loss"] == pytest.approx(total, rel=1e-5)


def test_actis_without_labelled_tiles_is_selfadapt_and_needs_them_when_asked(tmp_path, trained_cpnet_path):
    from selfadapt_deploy.errors import SaDeployError

    net, train, val = setup(trained_cpnet_path)
    adapt(net, train, val, tmp_path / "plain", CONFIG)
    net, train, val = setup(trained_cpnet_path)
    summary = adapt(net, train, val, tmp_path / "fraction", AdaptConfig(**{**CONFIG.__dict__,
                                                                         "labelled_fraction": 0.5}))
    assert summary["method"] == "selfadapt" and summary["labelled_per_batch"] == 0
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "fraction" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SaDeployError, match="give --labelled"):
        adapt(net, train, val, tmp_path / "x", AdaptConfig(**{**CONFIG.__dict__, "method": "actis"}))


def test_actis_resume_after_a_kill_is_bit_identical(tmp_path, trained_cpnet_path):
    cfg = AdaptConfig(**{**CONFIG.__dict__, "batch_size": 3})
    net, train, val = setup(trained_cpnet_path)
    adapt(net, train, val, tmp_path / "full", cfg, labelled=labelled_tiles())

    net, train, val = setup(trained_cpnet_path)
    with pytest.raises(KeyboardInterrupt):
        adapt(net, train, val, tmp_path / "killed", cfg, progress=kill_at(4), labelled=labelled_tiles())
    net, train, val = setup(trained_cpnet_path)
    summary = adapt(net, train, val, tmp_path / "killed", cfg, resume=True, labelled=labelled_tiles())
    assert summary["method"] == "actis" and summary["labelled_per_batch"] == 1
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    assert ((tmp_path / "killed" / "metrics.csv").read_text()
            == (tmp_path / "full" / "metrics.csv").read_text())
    rows = list(csv.DictReader(open(tmp_path / "full" / "metrics.csv")))
    assert all(float(r["loss_sup"]) > 0 for r in rows if r["loss"])


def test_labelled_selection_takes_the_best_snapshot_and_ignores_label_free_stops(tmp_path,
                                                                              trained_cpnet_path):
    net, train, val = setup(trained_cpnet_path)
    gt = random_labels((96, 96), 14, seed=2)
    val.labelled = [(val.images[0], gt)]
    cfg = AdaptConfig(**{**CONFIG.__dict__, "stop": "emb", "tau_emb": 1e-9, "lr": 1e-2, "select": "auto"})
    summary = adapt(net, train, val, tmp_path / "run", cfg)
    assert summary["selection"]["rule"] == "labelled"
    assert summary["iterations_run"] == 6  # the label-free stop fired but did not end the run
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["ap50_labelled"]]
    best = max(rows, key=lambda r: float(r["ap50_labelled"]))
    assert summary["selected_iteration"] == int(best["iteration"])
    assert "AP@0.5" in json.loads((tmp_path / "run" / "run.json").read_text())["selection"]["why"]


def test_labelled_pairs_by_cellpose_naming_or_explicit(tmp_path):
    import tifffile

    from selfadapt_deploy.errors import SaDeployError
    from selfadapt_deploy.trainer.labelled import find_pairs, read_pairs

    for name in ("a.tif", "a_masks.tif", "b.tif"):
        tifffile.imwrite(tmp_path / name, np.zeros((32, 40), np.uint16))
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((32, 40), np.uint16))
    tifffile.imwrite(tmp_path / "c_small.tif", np.zeros((30, 40), np.uint16))
    assert find_pairs([str(tmp_path)]) == [(tmp_path / "a.tif", tmp_path / "a_masks.tif")]
    explicit = find_pairs([f"{tmp_path / 'c.tif'}={tmp_path / 'c_small.tif'}"])
    with pytest.raises(SaDeployError, match="labels are 30×40 but"):
        read_pairs(explicit, 2, True, [0], None, None)
    with pytest.raises(SaDeployError, match=r"folder of <stem>\.tif"):
        find_pairs([str(tmp_path / "nothing")])


# ---- CULPICO: two networks, each the other's pseudo-labeller --------------------------------
def test_culpico_weight_and_losses_on_known_tensors():
    from selfadapt_deploy.trainer.methods import cooperative_losses, cooperative_weight

    p_a, p_b = torch.tensor([0.9, 0.2, 0.6]), torch.tensor([0.8, 0.7, 0.6])
    torch.testing.assert_close(cooperative_weight(p_a, p_b), torch.tensor([0.9, 0.5, 1.0]))
    y_a, y_b = torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    y_a[0, :, 0] = torch.tensor([[1.0, 2.0], [0.5, 0.0], [2.0, -1.0]])  # dY, dX, cellprob logit
    y_b[0, :, 0] = torch.tensor([[0.0, 2.0], [0.5, 1.0], [1.0, 0.5]])
    loss_a, loss_b = cooperative_losses(y_a, y_b)
    # direct: w = 1 − |p_a − p_b|; A learns B's binarised probability and flows, and vice versa
    pa, pb = torch.sigmoid(y_a[:, 2]), torch.sigmoid(y_b[:, 2])
    w = 1 - (pa - pb).abs()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want_a = (w * bce(y_a[:, 2], (pb > 0.5).float(), reduction="none")).mean() + (
        w * ((y_a[:, :2] - y_b[:, :2]) ** 2).mean(1)).mean()
    want_b = (w * bce(y_b[:, 2], (pa > 0.5).float(), reduction="none")).mean() + (
        w * ((y_b[:, :2] - y_a[:, :2]) ** 2).mean(1)).mean()
    torch.testing.assert_close(loss_a, want_a)
    torch.testing.assert_close(loss_b, want_b)
    swapped = cooperative_losses(y_b, y_a)  # symmetric in the two networks
    torch.testing.assert_close(swapped[0], loss_b)
    torch.testing.assert_close(swapped[1], loss_a)


def test_culpico_steps_both_networks_and_resumes_bit_identically(tmp_path, trained_cpnet_path):
    cfg = AdaptConfig(**{**CONFIG.__dict__, "method": "culpico", "batch_size": 3})
    net, train, val = setup(trained_cpnet_path)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    summary = adapt(net, train, val, tmp_path / "full", cfg, labelled=labelled_tiles())
    assert summary["method"] == "culpico" and "network A" in summary["deployed"]
    after = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    for key in ("output.2.weight",):
        assert not torch.equal(after["net_a"][key], before[key])  # A stepped
    from selfadapt_deploy.trainer.methods import perturbed_readout

    b0 = perturbed_readout(load_model(trained_cpnet_path), seed=cfg.seed).state_dict()
    changed = [k for k in b0 if not torch.equal(b0[k], before[k])]
    assert changed == ["output.2.weight"]  # B started as θ0 with its read-out perturbed
    assert not torch.equal(after["net_b"]["output.2.weight"], b0["output.2.weight"])  # B stepped
    rows = [r for r in csv.DictReader(open(tmp_path / "full" / "metrics.csv")) if r["loss"]]
    assert all(float(r["loss_sup_a"]) > 0 and float(r["loss_sup_b"]) > 0 for r in rows)  # source tiles

    net, train, val = setup(trained_cpnet_path)
    with pytest.raises(KeyboardInterrupt):
        adapt(net, train, val, tmp_path / "killed", cfg, progress=kill_at(4), labelled=labelled_tiles())
    net, train, val = setup(trained_cpnet_path)
    adapt(net, train, val, tmp_path / "killed", cfg, resume=True, labelled=labelled_tiles())
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    assert ((tmp_path / "killed" / "metrics.csv").read_text()
            == (tmp_path / "full" / "metrics.csv").read_text())


def test_the_run_says_plainly_when_the_pretrained_model_is_deployed(tmp_path, trained_cpnet_path):
    """With a learning rate too small to move anything every snapshot ties with θ0, and the
    default label-free rule keeps θ0 — and says so in run.json."""
    net, train, val = setup(trained_cpnet_path)
    cfg = AdaptConfig(**{**CONFIG.__dict__, "select": "auto", "lr": 1e-12})
    summary = adapt(net, train, val, tmp_path / "run", cfg)
    selection = json.loads((tmp_path / "run" / "run.json").read_text())["selection"]
    assert summary["selected"] == "iter_000000" and selection["pretrained_deployed"]
    assert "adaptation did not improve" in selection["why"]
    assert "pretrained model is deployed" in selection["why"]
    table = list(csv.DictReader(open(tmp_path / "run" / "selection.csv")))
    assert [r["candidate"] for r in table] == ["iter_000000", "iter_000003", "iter_000006",
                                               "swa", "wise-0.25", "wise-0.50", "wise-0.75"]


def test_vit_resume_is_bit_identical_and_the_callers_rng_is_left_alone(tmp_path):
    """Cellpose-DINO's training forward draws its layer drop from torch's global RNG (as cellpose
    does): adapt runs on a fork of it, seeded, saved in the checkpoint — a killed run resumes
    bit-identically and the caller's random stream is untouched."""
    from selfadapt_deploy.models.cpdino import build_cpdino

    raw = [np.stack([render(random_labels((96, 96), 14, seed=s), seed=s, gamma=1.5)] * 3)
           for s in range(3)]

    def fresh():
        train = TileSampler([prepare_image(im, 1.0) for im in raw[:2]], tile=64)
        tiles = TileSampler([prepare_image(raw[2], 1.0)], tile=64).sample(2, torch.Generator())
        val = Validation(images=[raw[2]], tiles=tiles, params=SegmentParams())
        return build_cpdino(seed=0), train, val

    torch.manual_seed(123)
    adapt(*fresh(), tmp_path / "full", CONFIG)
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(123)))
    with pytest.raises(KeyboardInterrupt):
        adapt(*fresh(), tmp_path / "killed", CONFIG, progress=kill_at(4))
    adapt(*fresh(), tmp_path / "killed", CONFIG, resume=True)
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
