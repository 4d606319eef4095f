"""SelfAdapt building blocks: EMA in place, L2-SP gradient, schedule, teacher TTA, masks, stopping."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch

from selfadapt_deploy.tiling import D4, d4_transform
from selfadapt_deploy.trainer.confidence import ConfidenceMasks
from selfadapt_deploy.trainer.ema import EMA
from selfadapt_deploy.trainer.losses import cellprob_loss, flow_loss, l2sp_penalty
from selfadapt_deploy.trainer.schedule import lr_at
from selfadapt_deploy.trainer.stop_rules import STOP_RULES
from selfadapt_deploy.trainer.stopping import (
    BestMonitor,
    ThresholdMonitor,
    fn_rate,
    mask_agreement,
    monitors_for,
    selected_iteration,
)
from selfadapt_deploy.trainer.teacher import teacher_predict


def test_ema_updates_the_teacher_in_place(tiny_cpnet):
    student = tiny_cpnet.train()
    ema = EMA(student, decay=0.9)
    teacher_param = next(ema.module.parameters())
    before = teacher_param.detach().clone()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update_(student, step=0)
    assert next(ema.module.parameters()) is teacher_param  # same tensor object: in place
    torch.testing.assert_close(teacher_param, before + 0.1)  # 0.9·w + 0.1·(w + 1)
    assert not ema.module.training and not teacher_param.requires_grad


def test_ema_warmup_and_validation():
    assert EMA(torch.nn.Linear(2, 2), 0.99, warmup=True).decay_at(0) == pytest.approx(0.1)
    assert EMA(torch.nn.Linear(2, 2), 0.99).decay_at(0) == 0.99
    with pytest.raises(ValueError):
        EMA(torch.nn.Linear(2, 2), 1.5)


def test_l2sp_gradient_is_2_lambda_w_minus_w0():
    net = torch.nn.Linear(3, 2)
    anchors = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    lam = 1e-2
    (lam * l2sp_penalty(net.parameters(), anchors)).backward()
    for p, a in zip(net.parameters(), anchors, strict=True):
        torch.testing.assert_close(p.grad, 2 * lam * (p.detach() - a))


def test_masked_losses_ignore_masked_pixels():
    logits = torch.tensor([[[10.0, -10.0]]])
    target = torch.tensor([[[1.0, 1.0]]])
    assert cellprob_loss(logits, target, torch.tensor([[[1.0, 0.0]]])) < 1e-3
    assert cellprob_loss(logits, target, torch.tensor([[[0.0, 1.0]]])) > 9
    flows = torch.zeros(1, 2, 1, 2)
    assert flow_loss(flows, torch.ones_like(flows), torch.zeros_like(flows)) == 0


def test_schedule_warmup_cosine_floor():
    lrs = [lr_at(s, 1e-3, 10, 100, 1e-5) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:101]))
    assert lrs[100] == lrs[109] == 1e-5


def test_teacher_tta_batched_equals_per_view_and_is_d4_invariant(tiny_cpnet):
    x = torch.randn(2, 2, 32, 32)
    batched, looped = teacher_predict(tiny_cpnet, x), teacher_predict(tiny_cpnet, x, batched=False)
    torch.testing.assert_close(batched.flows, looped.flows, atol=1e-5, rtol=0)
    # the ensemble of a rotated/flipped input is the rotated/flipped ensemble (flows as vectors)
    for k, flip in D4:
        moved = teacher_predict(tiny_cpnet, d4_transform(x, k, flip))
        expected = d4_transform(torch.cat([batched.flows, batched.prob[:, None]], 1), k, flip, True)
        torch.testing.assert_close(moved.flows, expected[:, :2], atol=1e-5, rtol=0)
        torch.testing.assert_close(moved.prob, expected[:, 2], atol=1e-5, rtol=0)
    assert (batched.flows_std >= 0).all() and batched.prob_std.shape == (2, 32, 32)


def test_confidence_masks_on_known_inputs():
    prob = torch.linspace(0, 1, 101).reshape(1, 1, 101)
    std = torch.linspace(0, 1, 101).reshape(1, 1, 101).expand(1, 2, 101).clone()
    masks = ConfidenceMasks(k=0.2, flow_percentile=80, momentum=0.99)
    out = masks(prob, std)
    assert torch.equal(out.cell, (prob > 0.5).float())
    conf = torch.where(prob > 0.5, prob, 1 - prob)
    # the least confident 20 % of each class are dropped (first call: threshold = the quantile)
    for c in (0, 1):
        kept = out.mask_prob[out.cell == c].mean()
        assert 0.75 <= float(kept) <= 0.85, (c, kept)
        assert out.mask_prob[(out.cell == c) & (conf <= conf[out.cell == c].quantile(0.2))].sum() == 0
    assert float(out.mask_flows.mean()) == pytest.approx(0.8, abs=0.02)
    # EMA: a second, very different batch moves the threshold only 1 %
    t0 = masks.flow_thresholds[0]
    masks(prob, std * 0)
    assert masks.flow_thresholds[0] == pytest.approx(0.99 * t0)
    off = ConfidenceMasks(use_prob_mask=False, use_flow_mask=False)(prob, std)
    assert off.mask_prob.min() == 1 and off.mask_flows.min() == 1


def test_fn_rate():
    ref = np.zeros((20, 20), int)
    ref[1:5, 1:5], ref[10:15, 10:15], ref[1:5, 10:15], ref[15:19, 1:6] = 1, 2, 3, 4
    cur = ref.copy()
    cur[cur == 4] = 0  # one instance lost
    assert fn_rate([ref], [cur]) == pytest.approx(0.25)
    assert fn_rate([ref], [ref * 7]) == 0.0


def test_stopping_picks_last_snapshot_before_crossing():
    monitor = ThresholdMonitor("d_emb", 0.5)
    curve = [(0, 0.0), (50, 0.2), (100, 0.45), (150, 0.55), (200, 0.7)]
    decisions = [monitor.update({"d_emb": v, "fn_rate": 0.0}, s) for s, v in curve]
    assert [d[0] for d in decisions] == [False, False, False, True, True]
    assert monitor.best_step == 100 and "selected iteration 100" in decisions[3][1]
    restored = ThresholdMonitor("d_emb", 0.5)
    restored.load_state_dict(monitor.state_dict())
    assert restored.best_step == 100 and restored.history == monitor.history
    with pytest.raises(KeyError, match="available: d_emb"):
        ThresholdMonitor("fn_rate", 0.05).update({"d_emb": 0.1}, 0)
    assert ThresholdMonitor("d_emb", 0.5).update({"d_emb": float("nan")}, 3)[0]
    assert [m.name for m in monitors_for("both")] == ["fn_rate", "d_emb"]
    assert monitors_for("none") == []


def test_best_monitor_selects_the_lowest_and_stops_after_patience():
    monitor = BestMonitor("flow_err", patience=2, min_delta=0.1)
    curve = [(0, 0.30), (10, float("nan")), (20, 0.20), (30, 0.19), (40, 0.15), (50, 0.16), (60, 0.2)]
    decisions = [monitor.update({"flow_err": v}, s) for s, v in curve]
    # NaN is never an improvement; 0.19 is not 10 % below 0.20; 0.15 is; then two evaluations without
    assert [d[0] for d in decisions] == [False, False, False, False, False, False, True]
    assert monitor.best_step == 40 and "selected iteration 40" in decisions[-1][1]
    assert monitor.selected(60) == 40
    restored = BestMonitor("flow_err", patience=2, min_delta=0.1)
    restored.load_state_dict(monitor.state_dict())
    assert restored.state_dict() == monitor.state_dict()
    first = BestMonitor("flow_err")
    first.update({"flow_err": float("nan")}, 0)  # θ0 without masks: kept until something is finite
    first.update({"flow_err": 0.3}, 10)
    assert first.best_step == 10


def test_label_free_selection_is_the_earliest_of_the_monitors_selections():
    fn, emb = monitors_for("both")
    for step, (f, e) in enumerate([(0.0, 0.0), (0.01, 0.3), (0.02, 0.6)]):
        stop = [m.update({"fn_rate": f, "d_emb": e}, step * 10)[0] for m in (fn, emb)]
    assert stop == [False, True] and selected_iteration([fn, emb], 20) == 10
    assert selected_iteration([], 20) == 20  # --stop none: the last snapshot
    flow = BestMonitor("flow_err")
    for step, v in enumerate([0.3, 0.2, 0.25]):
        flow.update({"flow_err": v}, step * 10)
    assert selected_iteration([flow], 20) == 10


def test_mask_agreement_is_f1_at_iou_half():
    a = np.zeros((20, 20), int)
    a[1:5, 1:5], a[10:15, 10:15], a[1:5, 10:15], a[15:19, 1:6] = 1, 2, 3, 4
    b = a.copy()
    b[b == 4] = 0  # one instance gone
    b[10:15, 10:12] = 0  # IoU 3/5 ≥ 0.5: still a match
    assert mask_agreement([a], [a * 3]) == 1.0
    assert mask_agreement([a], [b]) == pytest.approx(2 * 3 / (4 + 3))
    assert mask_agreement([np.zeros_like(a)], [np.zeros_like(a)]) == 1.0


def test_flow_error_is_the_pixel_weighted_mask_error_without_flow_qc(tiny_cpnet):
    from selfadapt_deploy.postprocess import flows_to_masks
    from selfadapt_deploy.postprocess.flow_qc import flow_errors, masks_to_flows
    from selfadapt_deploy.segment import Segmentation, SegmentParams, mask_params, rescale_factor
    from selfadapt_deploy.synthetic import random_labels
    from selfadapt_deploy.trainer.stopping import flow_error

    labels = random_labels((96, 96), 14, seed=1)
    logit = np.where(labels > 0, 6.0, -6.0)

    def seg(flows):
        return Segmentation(masks=labels, output=np.concatenate([flows, logit[None]]).astype(np.float32))

    spec, params = tiny_cpnet.spec, SegmentParams()
    exact = 5 * masks_to_flows(labels)  # the flows the true masks imply, in network units
    noisy = exact + np.random.default_rng(0).normal(0, 2.0, exact.shape)
    assert flow_error([seg(exact)], spec, params) < 1e-3  # consistent flows: (almost) no error
    got = flow_error([seg(noisy)], spec, params)
    raw = flows_to_masks(noisy.astype(np.float32), logit.astype(np.float32),
                         mask_params(SegmentParams(flow_threshold=0), rescale_factor(spec, None)))
    sizes = np.bincount(raw.ravel())[1:]
    assert got == pytest.approx(float(flow_errors(raw, noisy.astype(np.float32)) @ sizes / sizes.sum()))
    assert got > 0.05
    empty = Segmentation(masks=np.zeros_like(labels), output=np.full((3, 96, 96), -6, np.float32))
    assert np.isnan(flow_error([empty], spec, params))


def test_tta_spread_is_zero_for_an_equivariant_network():
    from selfadapt_deploy.trainer.stopping import tta_spread

    class Pointwise(torch.nn.Module):  # zero flows, probability from intensity: D4-equivariant
        def __init__(self, kernel: int):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 3, kernel, padding=kernel // 2, bias=False)
            torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))
            self.conv.weight.data[2] = self.conv.weight.data[2].abs() + 1  # a positive logit

        def forward(self, x):
            y = self.conv(x)
            return torch.cat([y[:, :2] * (self.conv.kernel_size[0] > 1), y[:, 2:]], dim=1)

    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert tta_spread(Pointwise(1), x) == pytest.approx(0.0, abs=1e-6)
    assert tta_spread(Pointwise(3), x) > 0.01  # an arbitrary 3×3 kernel is not D4-equivariant


def test_student_augmentation_changes_intensities_and_keeps_shapes():
    from selfadapt_deploy.trainer.augment import StrongAugment

    x = torch.rand(4, 2, 32, 32)
    g = torch.Generator().manual_seed(0)
    y = StrongAugment()(x, g)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert all(not torch.allclose(y[i], x[i]) for i in range(4))
    torch.testing.assert_close(StrongAugment()(x, torch.Generator().manual_seed(0)), y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_student_augmentation_runs_on_the_gpu_without_leaving_it():
    from selfadapt_deploy.trainer.augment import StrongAugment

    x = torch.rand(8, 2, 64, 64)
    on_gpu = StrongAugment()(x.cuda(), torch.Generator().manual_seed(0))
    on_cpu = StrongAugment()(x, torch.Generator().manual_seed(0))
    assert on_gpu.device.type == "cuda" and torch.isfinite(on_gpu).all()
    # the same settings per sample (same CPU draws); only the noise differs, by its std (≤ 0.15)
    assert (on_gpu.cpu() - on_cpu).std().item() < 0.5
    torch.testing.assert_close(StrongAugment()(x.cuda(), torch.Generator().manual_seed(0)), on_gpu)


@pytest.mark.slow
def test_compiled_teacher_follows_the_ema_updates(tiny_cpnet):
    """torch.compile of the EMA module (--compile-teacher): the in-place EMA updates reach the
    compiled forward, so its pseudo-labels stay the eager teacher's."""
    student = tiny_cpnet.train()
    ema = EMA(student, decay=0.5)
    compiled = torch.compile(ema.module)
    x = torch.rand(2, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    for step in range(2):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01)
        ema.update_(student, step)
        torch.testing.assert_close(teacher_predict(compiled, x).flows, teacher_predict(ema, x).flows,
                                   atol=1e-4, rtol=1e-3)


def test_flow_masks_follow_their_components_under_d4():
    """A mask on the dY component must end up on whichever component carries old dY."""
    from selfadapt_deploy.trainer.augment import move_flow_mask

    flows = torch.zeros(1, 2, 8, 8)
    flows[:, 0] = 1.0  # only dY is non-zero
    mask = torch.zeros(1, 2, 8, 8)
    mask[:, 0] = 1.0  # and only dY is kept
    for k, flip in D4:
        moved = d4_transform(flows, k, flip, vector=True)
        assert torch.equal(move_flow_mask(mask, k, flip) > 0, moved != 0), (k, flip)


def test_source_targets_and_loss_match_cellpose_training():
    from cellpose.dynamics import labels_to_flows
    from cellpose.train import _loss_fn_seg

    from selfadapt_deploy.synthetic import random_labels
    from selfadapt_deploy.trainer.source import cellpose_loss, cellpose_targets

    labels = random_labels((96, 80), 25, seed=3)
    ours = cellpose_targets(labels)  # 5·dY, 5·dX, foreground
    theirs = labels_to_flows([labels.copy()], device=torch.device("cpu"))[0]  # labels, fg, dY, dX
    np.testing.assert_allclose(ours[:2], 5 * theirs[2:4], atol=1e-5)
    np.testing.assert_array_equal(ours[2], theirs[1])
    y = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    expected = _loss_fn_seg(torch.from_numpy(theirs[None, 1:]), y, "cpu")
    torch.testing.assert_close(cellpose_loss(y, torch.from_numpy(ours[None])), expected)


def test_the_cli_adapt_defaults_are_the_configs():
    """Every `sa-deploy adapt` option that is an AdaptConfig field defaults to the dataclass's
    default (lr/l2sp: the CLI's "family default" sentinels), read from it — not a second copy."""
    from selfadapt_deploy.cli_train import adapt
    from selfadapt_deploy.trainer.config import ADAPT_DEFAULTS, DEFAULT_STOP

    cli = {name: p.default for name, p in inspect.signature(adapt).parameters.items()}
    shared = set(cli) & set(ADAPT_DEFAULTS) - {"lr", "l2sp", "train_tile"}
    assert len(shared) >= 15
    assert {n: cli[n] for n in shared} == {n: ADAPT_DEFAULTS[n] for n in shared}
    assert (cli["lr"], cli["l2sp"]) == (0.0, -1.0) and ADAPT_DEFAULTS["lr"] is ADAPT_DEFAULTS["l2sp"] is None
    assert cli["train_tile"] == 0 and ADAPT_DEFAULTS["train_tile"] is None
    assert DEFAULT_STOP in (*STOP_RULES, "none")


@pytest.mark.parametrize("method", ["selfadapt", "culpico"])
def test_every_method_backpropagates_through_one_backprop_and_checkpoints_its_scaler(tiny_cpnet,
                                                                                      method):
    """fp16 loss scaling is one object for every method (CULPICO's step had none), and its state
    is in the method's checkpoint, so an fp16 resume continues with the same loss scale. On the
    CPU autocast is off, so a CPU GradScaler stands in for CUDA's."""
    from selfadapt_deploy.trainer.loop import AdaptConfig, build_method
    from selfadapt_deploy.trainer.step import Backprop

    assert Backprop(torch.device("cpu"), torch.float16).scaler is None  # no fp16 autocast on CPU
    cfg = AdaptConfig(method=method).resolved(tiny_cpnet)
    m = build_method(cfg, tiny_cpnet.train(), has_labelled=False)
    backprop = m.state.backprop
    backprop.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    before = [p.detach().clone() for o in m.optimizers for g in o.param_groups for p in g["params"]]
    m.step(torch.rand(2, 2, 64, 64), 0, torch.Generator().manual_seed(0), None)
    after = [p for o in m.optimizers for g in o.param_groups for p in g["params"]]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))  # every optimiser
    assert backprop.scaler.get_scale() == 2.0**11  # the scaler ran the step (and grew once)
    state = m.state_dict()
    again = build_method(cfg, tiny_cpnet, has_labelled=False)
    again.state.backprop.scaler = torch.amp.GradScaler("cpu")
    again.load_state_dict(state)
    assert again.state.backprop.scaler.get_scale() == 2.0**11


@pytest.mark.parametrize("method", ["selfadapt", "culpico"])
@pytest.mark.parametrize("mode", ["keep", "update"])
def test_batchnorm_stats_keep_holds_theta0s_running_statistics_through_steps(tiny_cpnet, method,
                                                                              mode):
    """keep: training steps leave every network's BatchNorm running statistics (student, EMA
    teacher, CULPICO's partner) exactly θ0's while the weights move; update: they follow the
    batches. auto resolves by the data (stacks → keep) and a resolved config resolves to itself."""
    from selfadapt_deploy.trainer.averaging import batchnorms
    from selfadapt_deploy.trainer.loop import AdaptConfig, build_method

    def stats(net):
        return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in batchnorms(net)])

    auto = AdaptConfig(method=method)
    assert auto.resolved(tiny_cpnet, stacks=True).batchnorm_stats == "keep"
    assert auto.resolved(tiny_cpnet).batchnorm_stats == "update"
    cfg = AdaptConfig(method=method, batchnorm_stats=mode).resolved(tiny_cpnet)
    assert cfg.resolved(tiny_cpnet, stacks=mode == "update") == cfg
    theta0 = stats(tiny_cpnet)
    m = build_method(cfg, tiny_cpnet, has_labelled=False)
    nets = [m.deployed, m.state.student] if method == "selfadapt" else [m.state.net_a, m.state.net_b]
    weights = [p.detach().clone() for p in nets[1].parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        m.step(torch.rand(2, 2, 64, 64, generator=g) * 3, step, g, None)
    moved = [p for p in nets[1].parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(moved, weights, strict=True))  # training ran
    for net in nets:
        assert torch.equal(stats(net), theta0) == (mode == "keep")


def test_batchnorm_stats_refuses_an_unknown_mode():
    from selfadapt_deploy.errors import SaDeployError
    from selfadapt_deploy.trainer.loop import AdaptConfig

    with pytest.raises(SaDeployError, match="--batchnorm-stats must be one of auto, update, keep"):
        AdaptConfig(batchnorm_stats="freeze")


def test_train_tile_is_a_multiple_of_16_and_refused_by_a_fixed_tile_family(tiny_cpnet, tiny_cpsam):
    from selfadapt_deploy.errors import SaDeployError
    from selfadapt_deploy.trainer.loop import AdaptConfig

    with pytest.raises(SaDeployError, match="--train-tile must be a multiple of 16 ≥ 32"):
        AdaptConfig(train_tile=40)
    assert AdaptConfig(train_tile=96).resolved(tiny_cpnet).train_tile == 96
    assert AdaptConfig().resolved(tiny_cpsam).train_tile is None  # the family's own tile
    assert tiny_cpsam.fixed_tile and tiny_cpsam.tile_size != 96
    with pytest.raises(SaDeployError, match=f"runs on {tiny_cpsam.tile_size}-px tiles only"):
        AdaptConfig(train_tile=96).resolved(tiny_cpsam)


def test_the_default_training_tile_on_z_stacks_lets_their_zx_zy_planes_fill_a_third_of_it():
    from selfadapt_deploy.trainer.config import stack_train_tile

    # 16 planes × anisotropy 2 = 32-row ZX/ZY planes → 96 (not CPnet's 224, mostly padding)
    assert stack_train_tile([(16, 128, 128)], 2.0, 1.0, 224, 16.0) == 96
    assert stack_train_tile([(16, 128, 128), (8, 128, 128)], 2.0, 1.0, 224, 16.0) == 48  # the shallowest
    assert stack_train_tile([(40, 1024, 1024)], 3.0, 1.0, 224, 30.0) == 224  # deep: the family's tile
    assert stack_train_tile([(4, 512, 512)], 1.0, 1.0, 224, 30.0) == 64  # at least two diameters
    assert stack_train_tile([(40, 80, 80)], 3.0, 1.0, 224, 30.0) == 80  # never above the YX planes
    assert stack_train_tile([(16, 128, 128)], 2.0, 1.875, 224, 30.0) == 176  # at the network's scale
