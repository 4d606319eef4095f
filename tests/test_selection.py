"""Label-free selection: the consensus pool, dropout consistency, weight averages, the rule registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.models import load_model
from selfadapt_deploy.postprocess import MaskParams, flows_to_masks
from selfadapt_deploy.postprocess.flow_qc import masks_to_flows
from selfadapt_deploy.segment import Segmentation, SegmentParams
from selfadapt_deploy.synthetic import random_labels, render
from selfadapt_deploy.trainer.averaging import (
    AVERAGES,
    average_state,
    average_states,
    interpolate_states,
    recompute_batchnorm,
)
from selfadapt_deploy.trainer.candidates import build_average
from selfadapt_deploy.trainer.perturb import dropout_disagreement, feature_dropout, perturbed_masks
from selfadapt_deploy.trainer.pool import PredictionPool, agreement
from selfadapt_deploy.trainer.selection import (
    RULES,
    SELECTIONS,
    THETA0,
    choose,
    consensus_members,
    explain,
    resolve_rule,
)

PARAMS = MaskParams(niter=100)


def output_of(labels: np.ndarray, dropped: set[int] = frozenset()) -> np.ndarray:
    """A network output (dY, dX, cellprob logit) that segments into ``labels`` without the cells
    in ``dropped`` (their probability is pushed below threshold)."""
    keep = labels * ~np.isin(labels, list(dropped))
    prob = np.where(keep > 0, 4.0, -4.0).astype(np.float32)
    return np.concatenate([5 * masks_to_flows(labels), prob[None]]).astype(np.float32)


def seg(output: np.ndarray) -> Segmentation:
    return Segmentation(masks=flows_to_masks(output[:2], output[2], PARAMS), output=output)


@pytest.fixture
def truth() -> list[np.ndarray]:
    return [random_labels((96, 96), 12, seed=s) for s in (1, 2)]


def fill(pool: PredictionPool, truth, candidates: dict[str, list[set[int]]]) -> None:
    for name, dropped in candidates.items():
        pool.add(name, [seg(output_of(t, d)) for t, d in zip(truth, dropped, strict=True)])


def test_consensus_scores_on_known_inputs(tmp_path, truth):
    """Identical candidates score equally; a candidate equal to the consensus scores 1; when every
    snapshot loses different cells, their mean recovers them and θ0 (complete) is chosen."""
    pool = PredictionPool(tmp_path, n_images=2)
    fill(pool, truth, {THETA0: [set(), set()], "iter_000010": [{1, 2}, {3}],
                       "iter_000020": [{4, 5}, {6}], "iter_000030": [{7}, {8, 9}],
                       "iter_000040": [{7}, {8, 9}]})
    names = [THETA0, "iter_000010", "iter_000020", "iter_000030", "iter_000040"]
    scores = pool.consensus_scores({n: 1.0 for n in names}, names, PARAMS)
    assert scores[THETA0] == (1.0, 1.0)  # the consensus has every cell back
    assert scores["iter_000030"] == scores["iter_000040"] < (1.0, 1.0)
    assert all(scores[n] < scores[THETA0] for n in names[1:])
    consensus = [pool.consensus_masks({n: 1.0 for n in names}, k, PARAMS) for k in range(2)]
    assert agreement(consensus, [pool.masks(THETA0, k) for k in range(2)]) == (1.0, 1.0)

    rows = [{"candidate": n, "iteration": int(n[5:]), "consensus50_snapshots": scores[n][0],
             "consensus75_snapshots": scores[n][1]} for n in names]
    chosen = choose("consensus", rows)
    assert chosen["candidate"] == THETA0
    assert "the pretrained model is deployed" in explain("consensus", chosen, rows)


def test_consensus_is_never_the_worst_candidate_and_θ0_wins_ties(tmp_path, truth):
    pool = PredictionPool(tmp_path, n_images=2)
    fill(pool, truth, {THETA0: [{1}, {1}], "iter_000005": [{1, 2, 3, 4}, {1, 2, 3}],
                       "iter_000010": [{1}, {1}]})
    names = [THETA0, "iter_000005", "iter_000010"]
    scores = pool.consensus_scores({n: 1.0 for n in names}, names, PARAMS)
    rows = [{"candidate": n, "iteration": int(n[5:]), "consensus50_snapshots": scores[n][0],
             "consensus75_snapshots": scores[n][1]} for n in names]
    assert choose("consensus", rows)["candidate"] == THETA0  # tied with iter_000010: the first
    assert scores["iter_000005"] < scores[THETA0]


def guard_table(flow_errors: dict[str, float], favourite: str) -> list[dict]:
    """Candidates with these flow errors; the consensus favours ``favourite``."""
    return [{"candidate": n, "iteration": int(n[5:]), "flow_err": fe,
             "consensus50_snapshots": 0.9 if n == favourite else 0.5,
             "consensus75_snapshots": 0.8 if n == favourite else 0.4} for n, fe in flow_errors.items()]


def test_the_flow_guard_deploys_the_consensus_choice_only_when_its_flow_error_beats_θ0s():
    better = guard_table({THETA0: 0.30, "iter_000010": 0.25, "iter_000020": 0.40}, "iter_000010")
    assert choose("guarded-flow", better)["candidate"] == "iter_000010"
    worse = guard_table({THETA0: 0.30, "iter_000010": 0.25, "iter_000020": 0.40}, "iter_000020")
    assert choose("consensus", worse)["candidate"] == "iter_000020"
    assert choose("guarded-flow", worse)["candidate"] == THETA0  # not the better-flowing iter_000010 either
    why = explain("guarded-flow", choose("guarded-flow", worse), worse)
    assert "the pretrained model is deployed" in why and "consensus chose iter_000020" in why
    within_margin = guard_table({THETA0: 0.30, "iter_000010": 0.297}, "iter_000010")  # 1 % lower
    assert choose("guarded-flow", within_margin)["candidate"] == THETA0
    unmeasured = guard_table({THETA0: 0.30, "iter_000010": float("nan")}, "iter_000010")
    assert choose("guarded-flow", unmeasured)["candidate"] == THETA0


def test_the_dropout_guard_vetoes_by_dropout_disagreement():
    rows = guard_table({THETA0: 0.30, "iter_000010": 0.40}, "iter_000010")  # flow error worse
    for row, dropout in zip(rows, (0.40, 0.30), strict=True):
        row["dropout_err"] = dropout
    assert choose("guarded-flow", rows)["candidate"] == THETA0
    assert choose("guarded-dropout", rows)["candidate"] == "iter_000010"
    assert "dropout_err 0.3000, θ0 0.4000" in explain("guarded-dropout", rows[1], rows)
    assert RULES["guarded-dropout"].dropout and not RULES["guarded-flow"].dropout


def test_a_saturated_dropout_signal_hands_the_guard_to_the_flow_error():
    rows = guard_table({THETA0: 0.30, "iter_000010": 0.25}, "iter_000010")  # flow error better
    for row in rows:
        row["dropout_err"] = 1.0  # every match lost under dropout, θ0 and the snapshot alike
    assert choose("guarded-dropout", rows)["candidate"] == "iter_000010"
    why = explain("guarded-dropout", rows[1], rows)
    assert "dropout_err 1.000 is saturated" in why and "flow_err 0.2500, θ0 0.3000" in why
    rows[1]["flow_err"] = 0.35  # the flow error vetoes as guarded-flow does
    assert choose("guarded-dropout", rows)["candidate"] == THETA0
    rows[0]["dropout_err"] = rows[1]["dropout_err"] = 0.98  # below saturation: dropout guards again
    assert choose("guarded-dropout", rows)["candidate"] == THETA0
    rows[1]["dropout_err"] = 0.90
    assert choose("guarded-dropout", rows)["candidate"] == "iter_000010"


def test_where_consensus_cannot_rank_θ0_below_others_the_guard_signal_chooses_among_the_tied():
    rows = [{"candidate": n, "iteration": int(n[5:]), "dropout_err": d, "consensus50_snapshots": 1.0,
             "consensus75_snapshots": 1.0} for n, d in ((THETA0, 0.16), ("iter_000010", 0.15),
                                                         ("iter_000020", 0.11), ("iter_000030", 0.12))]
    assert choose("consensus", rows)["candidate"] == THETA0  # plain consensus: the first of equals
    assert choose("guarded-dropout", rows)["candidate"] == "iter_000020"  # lowest, and ≥ 2 % below θ0
    why = explain("guarded-dropout", rows[2], rows)
    assert "consensus agreed with θ0 as well as with iter_000020, lowest in dropout_err" in why
    rows[3]["consensus75_snapshots"] = 0.9  # not tied: not a choice, however low its signal
    rows[3]["dropout_err"] = 0.01
    assert choose("guarded-dropout", rows)["candidate"] == "iter_000020"
    for row in rows[1:]:
        row["dropout_err"] = 0.159  # the tied candidates' signal within the guard's margin
    assert choose("guarded-dropout", rows)["candidate"] == THETA0


def test_ties_that_leave_θ0_behind_are_not_broken_by_the_guard_signal():
    """Only ties with θ0 are broken: on real runs ties among snapshots, broken by the dropout
    signal, deployed worse models (two of six, benchmarks/selection_real.py)."""
    rows = [{"candidate": n, "iteration": int(n[5:]), "dropout_err": d,
             "consensus50_snapshots": c, "consensus75_snapshots": c}
            for n, d, c in ((THETA0, 0.05, 0.9), ("iter_000010", 0.08, 1.0), ("iter_000020", 0.04, 1.0))]
    assert choose("guarded-dropout", rows)["candidate"] == THETA0  # iter_000010 proposed, vetoed
    assert "consensus chose iter_000010" in explain("guarded-dropout", rows[0], rows)


def test_pool_members_and_weights():
    rows = [{"candidate": THETA0, "iteration": 0}, {"candidate": "iter_000010", "iteration": 10},
            {"candidate": "iter_000020", "iteration": 20}, {"candidate": "swa", "iteration": None}]
    assert consensus_members(rows, "snapshots") == {THETA0: 1.0, "iter_000010": 1.0, "iter_000020": 1.0}
    assert consensus_members(rows, "anchored") == {THETA0: 2.0, "iter_000010": 1.0, "iter_000020": 1.0}
    assert set(consensus_members(rows, "averages")) == {THETA0, "iter_000010", "iter_000020", "swa"}


def test_pool_keeps_predictions_on_disk_and_says_what_is_missing(tmp_path, truth):
    pool = PredictionPool(tmp_path, n_images=2)
    fill(pool, truth, {THETA0: [set(), set()]})
    assert pool.has(THETA0) and not pool.has("iter_000010")
    np.testing.assert_array_equal(pool.masks(THETA0, 1), seg(output_of(truth[1])).masks)
    assert pool.output(THETA0, 0).dtype == np.float32
    with pytest.raises(SaDeployError, match="predictions of candidate 'iter_000010' are missing"):
        pool.output("iter_000010", 0)


# ---- weight averages --------------------------------------------------------------------------
def test_averaged_state_dicts_are_exact_means():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(5, 3, generator=g), "n": torch.tensor(k)} for k in range(3)]
    mean = average_states(iter(states))
    torch.testing.assert_close(mean["w"], torch.stack([s["w"].double() for s in states]).mean(0).float(),
                               rtol=0, atol=0)
    assert mean["n"].item() == 2  # integer buffers from the last state
    mid = interpolate_states(states[0], states[2], 0.25)
    a, b = states[0]["w"].double(), states[2]["w"].double()
    torch.testing.assert_close(mid["w"], (a + 0.25 * (b - a)).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different keys"):
        average_states([states[0], {"x": torch.zeros(1)}])


def test_averages_of_snapshots_load_strictly_and_are_the_means(tmp_path, tiny_cpnet):
    torch.manual_seed(1)
    files = {}
    for i in (0, 5, 10, 15):
        with torch.no_grad():
            for p in tiny_cpnet.parameters():
                p.add_(0.01 * torch.randn_like(p))
        files[i] = tmp_path / f"iter_{i:06d}.pt"
        tiny_cpnet.save(files[i])
    states = [torch.load(files[i], weights_only=True) for i in (0, 5, 10, 15)]
    key = "output.2.weight"
    swa = build_average("swa", files, 5, tmp_path / "swa.pt", torch.device("cpu"))  # after warm-up
    torch.testing.assert_close(swa.state_dict()[key], (states[1][key] + states[2][key] + states[3][key]) / 3)
    for name, alpha in AVERAGES.items():
        if alpha is None:
            continue
        net = build_average(name, files, 5, tmp_path / f"{name}.pt", torch.device("cpu"))
        want = states[0][key] + alpha * (states[3][key] - states[0][key])
        torch.testing.assert_close(net.state_dict()[key], want)
        assert load_model(tmp_path / f"{name}.pt").family == "cpnet"  # strict load wherever a model goes
    with pytest.raises(ValueError, match="unknown weight average"):
        average_state("ema", files, 5)


def test_batchnorm_recomputed_on_tiles(tiny_cpnet):
    tiles = torch.rand(6, 2, 32, 32)
    before = tiny_cpnet.downsample.down[0].proj[0].running_mean.clone()
    assert recompute_batchnorm(tiny_cpnet, tiles, batch_size=3)
    bn = tiny_cpnet.downsample.down[0].proj[0]
    assert not torch.equal(bn.running_mean, before) and bn.momentum == 0.05 and not tiny_cpnet.training
    torch.testing.assert_close(bn.running_mean, tiles.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)


# ---- dropout consistency -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny_cpnet", "tiny_cpsam", "tiny_cpdino"])
def test_feature_dropout_is_deterministic_and_removed_afterwards(family, request):
    net = request.getfixturevalue(family)
    x = torch.rand(2, net.nchan, net.tile_size, net.tile_size)
    with torch.no_grad():
        plain = net(x)
        with feature_dropout(net, 0.3, seed=4):
            a = net(x)
        with feature_dropout(net, 0.3, seed=4):
            b = net(x)
        with feature_dropout(net, 0.3, seed=5):
            c = net(x)
        with feature_dropout(net, 0.0, seed=4):
            zero = net(x)
        after = net(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, plain) and not torch.allclose(a, c)
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)


def test_dropout_disagreement_is_deterministic_for_a_seed(trained_cpnet_path):
    net = load_model(trained_cpnet_path)
    images = [np.stack([render(random_labels((96, 96), 14, seed=s), seed=s, gamma=1.5),
                        np.zeros((96, 96), np.float32)]) for s in (0, 1)]
    params = SegmentParams()
    from selfadapt_deploy.segment import segment_arrays

    masks = segment_arrays(net, images, params)
    first = dropout_disagreement(net, images, masks, params, rate=0.3, seed=1)
    assert first == dropout_disagreement(net, images, masks, params, rate=0.3, seed=1)
    assert 0 < first <= 1
    assert dropout_disagreement(net, images, masks, params, rate=0.0) == 0.0
    np.testing.assert_array_equal(perturbed_masks(net, images, params, 0.0)[0], masks[0])


# ---- the rule registry ---------------------------------------------------------------------------
def test_rules_resolve_and_refuse():
    assert resolve_rule("auto", has_labelled=True) == "labelled"
    assert resolve_rule("auto", has_labelled=False) == resolve_rule("label-free", False)
    default = resolve_rule("label-free", False)
    assert default == "guarded-dropout-averages"  # chosen on the real runs (benchmarks/selection_real.py)
    assert default in RULES and not RULES[default].labelled
    with pytest.raises(SaDeployError, match="needs held-out labelled images"):
        resolve_rule("labelled", has_labelled=False)
    with pytest.raises(SaDeployError, match="--select must be one of"):
        resolve_rule("bogus", False)
    assert set(SELECTIONS) == {"auto", "label-free", *RULES}


def test_adapt_config_refuses_an_unknown_rule_before_any_work():
    from selfadapt_deploy.trainer.loop import AdaptConfig

    with pytest.raises(SaDeployError, match="--select must be one of"):
        AdaptConfig(select="bogus")


def test_the_cli_help_names_every_selection_rule():
    import typer

    from selfadapt_deploy.cli import app

    adapt = typer.main.get_command(app).commands["adapt"]
    (select,) = [p for p in adapt.params if p.name == "select"]
    for name in SELECTIONS:
        assert f" {name}" in select.help.replace("(", " "), name
