"""Which candidate a run deploys: the ``--select`` rules, over one table of candidates.

Candidates are θ0 (``iter_000000``, always present), every snapshot, and the weight averages a rule
asks for (:mod:`averaging`). Each is a row of the *candidate table* — its name, iteration (None
for an average), and the signals measured on it: the stopping signals of ``metrics.csv``, its
dropout disagreement (:mod:`perturb`), its agreement with the pool's consensus (:mod:`pool`), and
with held-out labelled images its AP. A rule is a pure function of that table, so the loop and
the benchmarks (``benchmarks/selection_real.py``, ``selection_rules.py``) choose with the same code.

When a rule keeps θ0 the run says so (:func:`explain`): adaptation did not improve on the
pretrained model by that rule's measure, and the pretrained model is what is deployed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from selfadapt_deploy.errors import SaDeployError
from selfadapt_deploy.trainer.averaging import AVERAGES, SWA
from selfadapt_deploy.trainer.stop_rules import TAU_EMB, TAU_FN
from selfadapt_deploy.trainer.stopping import FLOW_MIN_DELTA, Monitor, monitors_for, selected_iteration

THETA0 = "iter_000000"
Row = dict  # one candidate: "candidate", "iteration" (None for averages), signals…


def snapshot_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def theta0(rows: Sequence[Row]) -> Row:
    """θ0's row (every candidate table has one)."""
    return next(r for r in rows if r["candidate"] == THETA0)


def snapshots(rows: Sequence[Row]) -> list[Row]:
    """θ0 and the snapshots, in iteration order."""
    return sorted((r for r in rows if r["iteration"] is not None), key=lambda r: r["iteration"])


def consensus_members(rows: Sequence[Row], pool: str) -> dict[str, float]:
    """The members and weights of a consensus pool: ``snapshots`` — θ0 and every snapshot, equal
    weights (EnsV); ``anchored`` — the same with θ0 weighted as much as all snapshots together,
    so that a run's late, drifting snapshots cannot outvote the pretrained model; ``averages`` —
    θ0, the snapshots and the weight averages."""
    snaps = snapshots(rows)
    if pool == "snapshots":
        return {r["candidate"]: 1.0 for r in snaps}
    if pool == "anchored":
        return {r["candidate"]: float(max(1, len(snaps) - 1)) if r["candidate"] == THETA0 else 1.0
                for r in snaps}
    if pool == "averages":
        return {r["candidate"]: 1.0 for r in rows if r["iteration"] is not None or r["candidate"] in AVERAGES}
    raise ValueError(f"unknown consensus pool '{pool}'")


def consensus_score(row: Row, pool: str) -> float:
    """A candidate's consensus score: the mean of its agreement at IoU 0.5 and 0.75."""
    a, b = row.get(f"consensus50_{pool}"), row.get(f"consensus75_{pool}")
    return math.nan if a is None or b is None else (a + b) / 2


def best_row(rows: Sequence[Row], key: Callable[[Row], float], lowest: bool = False) -> Row:
    """The row with the highest (lowest) finite ``key``; the earliest of equals, so θ0 wins ties."""
    finite = [r for r in rows if math.isfinite(key(r))]
    if not finite:
        return rows[0]
    sign = -1 if lowest else 1
    return max(finite, key=lambda r: sign * key(r))  # max keeps the first of equals


@dataclass(frozen=True)
class StopRule:
    """The run's ``--stop`` rule and thresholds (the ``stop`` selection replays its monitors)."""

    name: str = "none"
    tau_fn: float = TAU_FN
    tau_emb: float = TAU_EMB

    def monitors(self) -> list[Monitor]:
        return monitors_for(self.name, self.tau_fn, self.tau_emb)


@dataclass(frozen=True)
class Rule:
    """One ``--select`` rule: what it deploys, which candidates/signals it needs, how it chooses."""

    help: str
    choose: Callable[[Sequence[Row], StopRule], Row]  # (candidate table, --stop rule) → the deployed row
    pool: str | None = None  # the consensus pool it scores with
    dropout: bool = False  # needs the dropout disagreement of every candidate
    guard: str | None = None  # the signal that vetoes the consensus choice (guarded-* rules)
    averages: tuple[str, ...] = ()  # weight averages it needs as candidates
    labelled: bool = False  # needs held-out labelled images


def _stop(rows: Sequence[Row], stop: StopRule) -> Row:
    """What the ``--stop`` rule's monitors select on these rows (the loop's own monitors)."""
    snaps = snapshots(rows)
    monitors = stop.monitors()
    last = snaps[-1]["iteration"]
    for row in snaps:
        if any([m.update(row, row["iteration"])[0] for m in monitors]):  # every monitor sees it
            last = row["iteration"]
            break
    step = selected_iteration(monitors, last)
    return next(r for r in snaps if r["iteration"] == step)


def _by_name(name: str) -> Callable[[Sequence[Row], StopRule], Row]:
    return lambda rows, _stop_rule: next(r for r in rows if r["candidate"] == name)


def consensus_pick(rows: Sequence[Row], pool: str) -> Row:
    """The pool member (the pool's members are its candidates) agreeing best with its consensus."""
    members = consensus_members(rows, pool)
    return best_row([r for r in rows if r["candidate"] in members], lambda r: consensus_score(r, pool))


def _consensus(pool: str) -> Callable[[Sequence[Row], StopRule], Row]:
    return lambda rows, _stop_rule: consensus_pick(rows, pool)


GUARD_MARGIN = FLOW_MIN_DELTA  # a guard signal counts as better when ≥ 2 % lower (as --stop flow)
GUARDS = {"flow": "flow_err", "dropout": "dropout_err"}  # guarded-<name>: the signal that vetoes
# θ0's value of a guard signal at or above which the signal cannot rank candidates, and the signal
# that guards instead: at a dropout disagreement ≥ 0.99 feature dropout destroys (nearly) every
# match at IoU 0.75 — the demo's small CPnet: 1.0 for θ0 and every snapshot — so no candidate
# could ever show it is better; cellpose's flow check still can.
SATURATED = {"dropout_err": (0.99, "flow_err")}


def guard_signal(signal: str, base: Row) -> str:
    """The signal that guards against θ0 (``base``): ``signal``, or its fallback where θ0's value
    saturates it (:data:`SATURATED`)."""
    limit, fallback = SATURATED.get(signal, (math.inf, signal))
    value = base.get(signal, math.nan)
    return fallback if math.isfinite(value) and value >= limit else signal


def passes_guard(row: Row, base: Row, signal: str, margin: float = GUARD_MARGIN) -> bool:
    """Whether ``row``'s guard signal (``signal`` or, saturated on θ0, its fallback; lower is
    better) is at least the fraction ``margin`` below θ0's (``base``); non-finite never passes."""
    signal = guard_signal(signal, base)
    value, reference = row.get(signal, math.nan), base.get(signal, math.nan)
    return math.isfinite(value) and math.isfinite(reference) and value < reference * (1 - margin)


TIE = 1e-9  # consensus scores closer than this are equal (they are ratios of match counts)


def guarded_pick(rows: Sequence[Row], pool: str, signal: str) -> Row:
    """What a guarded rule's consensus proposes: the pool member agreeing best with the consensus
    — and where θ0 is among the best (few, easy held-out images: one held-out 16-plane stack gave
    every candidate agreement 1.0), consensus cannot rank anything above the pretrained model, so
    the guard's signal (lowest) chooses among those that agree as well as θ0. Ties without θ0
    stay the earliest: broken by dropout, two of six real runs deployed a worse model
    (benchmarks/selection_real.py)."""
    base, chosen = theta0(rows), consensus_pick(rows, pool)
    best = consensus_score(base, pool)
    if chosen["candidate"] != THETA0 or not math.isfinite(best):
        return chosen
    tied = [r for r in rows if r["candidate"] in consensus_members(rows, pool)
            and abs(consensus_score(r, pool) - best) <= TIE]
    return best_row(tied, lambda r: r.get(guard_signal(signal, base), math.nan), lowest=True)


def _guarded(pool: str, signal: str) -> Callable[[Sequence[Row], StopRule], Row]:
    """The consensus choice (:func:`guarded_pick`) if it passes the guard, else θ0: consensus
    ranks candidates by agreement with each other, which cannot tell when every snapshot drifted
    the same wrong way; the guard asks a second, independent signal whether the choice beats the
    pretrained model."""
    def choose_(rows: Sequence[Row], _stop_rule: StopRule) -> Row:
        chosen, base = guarded_pick(rows, pool, signal), theta0(rows)
        return chosen if passes_guard(chosen, base, signal) else base
    return choose_


_GUARD_HELP = {"flow": "flow error (cellpose's mask-quality check)",
               "dropout": "dropout disagreement (see dropout; the flow error where θ0's is ≥ "
                          f"{SATURATED['dropout_err'][0]:g}, saturated)"}
RULES: dict[str, Rule] = {
    **{f"guarded-{name}": Rule(f"consensus's choice if its {_GUARD_HELP[name]} on the held-out "
                               f"images is ≥ {GUARD_MARGIN:.0%} below θ0's, else θ0",
                               _guarded("snapshots", signal), pool="snapshots", dropout=name == "dropout",
                               guard=signal)
       for name, signal in GUARDS.items()},
    "guarded-dropout-averages": Rule("as guarded-dropout, the consensus that of consensus-averages "
                                     "(θ0, the snapshots, SWA and WiSE-FT models)",
                                     _guarded("averages", GUARDS["dropout"]), pool="averages", dropout=True,
                                     guard=GUARDS["dropout"], averages=AVERAGES),
    "consensus": Rule("candidate agreeing best with the consensus of θ0 and every snapshot "
                      "(EnsV)", _consensus("snapshots"), pool="snapshots"),
    "consensus-anchored": Rule("as consensus, θ0 weighted as much as all snapshots together",
                               _consensus("anchored"), pool="anchored"),
    "consensus-averages": Rule("as consensus, with SWA and WiSE-FT models as candidates and in "
                               "the pool", _consensus("averages"), pool="averages", averages=AVERAGES),
    "dropout": Rule("lowest disagreement of masks under first-layer feature dropout (CRank)",
                    lambda rows, _s: best_row(snapshots(rows), lambda r: r.get("dropout_err", math.nan),
                                           lowest=True), dropout=True),
    SWA: Rule("uniform average of the snapshots after warm-up (SWA)", _by_name(SWA), averages=(SWA,)),
    **{name: Rule(f"θ0 + {a:g}·(last − θ0) (WiSE-FT)", _by_name(name), averages=(name,))
       for name, a in AVERAGES.items() if a is not None},
    "stop": Rule("what the --stop rule selects (the paper's: the last snapshot before a threshold)",
                 lambda rows, stop: _stop(rows, stop)),
    "last": Rule("the last snapshot", lambda rows, _s: snapshots(rows)[-1]),
    "labelled": Rule("best AP@0.5 on the held-out labelled images (--val-labelled)",
                     lambda rows, _s: best_row(snapshots(rows), lambda r: r.get("ap50_labelled", math.nan)),
                     labelled=True),
}
# chosen by issue 18's pre-registered criterion on six real runs (benchmarks/selection_real.py;
# README: Choosing the snapshot without labels): 0 harmful runs, real and synthetic, then the
# highest gain among those
DEFAULT_LABEL_FREE = "guarded-dropout-averages"
SELECTIONS = ("auto", "label-free", *RULES)


def resolve_rule(select: str, has_labelled: bool) -> str:
    """The rule ``--select`` names: ``auto`` → labelled with held-out labelled images, else the
    label-free default; ``label-free`` → the label-free default."""
    if select not in SELECTIONS:
        raise SaDeployError(f"--select must be one of {', '.join(SELECTIONS)}, got '{select}'")
    if select == "auto":
        return "labelled" if has_labelled else DEFAULT_LABEL_FREE
    rule = DEFAULT_LABEL_FREE if select == "label-free" else select
    if RULES[rule].labelled and not has_labelled:
        raise SaDeployError(f"--select {rule} needs held-out labelled images (--val-labelled)")
    return rule


def choose(rule: str, rows: Sequence[Row], stop: StopRule = StopRule()) -> Row:
    """The candidate ``rule`` deploys from the candidate table ``rows``."""
    return RULES[rule].choose(rows, stop)


def explain(rule: str, chosen: Row, rows: Sequence[Row]) -> str:
    """One line on what was deployed and why; says plainly when it is the pretrained model."""
    name, base = chosen["candidate"], theta0(rows)
    detail = ""
    if RULES[rule].guard is not None:
        pick = guarded_pick(rows, RULES[rule].pool, RULES[rule].guard)
        signal = guard_signal(RULES[rule].guard, base)
        saturated = (f"; θ0's {RULES[rule].guard} {base[RULES[rule].guard]:.3f} is saturated, so the "
                     f"{signal} guards" if signal != RULES[rule].guard else "")
        tied = pick is not consensus_pick(rows, RULES[rule].pool)
        proposed = (f"consensus agreed with θ0 as well as with {pick['candidate']}, lowest in {signal}"
                    if tied else f"consensus chose {pick['candidate']}")
        detail = (f" ({proposed}: {signal} {pick.get(signal, math.nan):.4f}, "
                  f"θ0 {base.get(signal, math.nan):.4f}; deployed only if ≥ {GUARD_MARGIN:.0%} lower"
                  f"{saturated})")
    elif RULES[rule].pool is not None:
        detail = (f" (consensus agreement {consensus_score(chosen, RULES[rule].pool):.3f}; "
                  f"θ0 {consensus_score(base, RULES[rule].pool):.3f})")
    elif rule == "dropout":
        detail = f" (dropout disagreement {chosen['dropout_err']:.3f}; θ0 {base['dropout_err']:.3f})"
    elif rule == "labelled":
        detail = (f" (AP@0.5 on the held-out labelled images {chosen['ap50_labelled']:.3f}; "
                  f"θ0 {base['ap50_labelled']:.3f})")
    if name == THETA0:
        return (f"--select {rule}: adaptation did not improve on the pretrained model by this rule's "
                f"measure on these images; the pretrained model is deployed{detail}")
    return f"--select {rule}: {name}{detail}"
