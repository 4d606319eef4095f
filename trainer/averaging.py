"""Weight averaging instead of selection: deployable models made from the run's snapshots.

* **SWA** (Izmailov et al. 2018): the uniform mean of the teacher's snapshots after warm-up — the
  EMA teacher is already an average over recent steps; SWA averages across the whole run, which
  flattens the late drift that a single snapshot carries.
* **WiSE-FT** (Wortsman et al. 2022): θ0 + α(θ_T − θ0), a point on the line from the pretrained
  weights to the last snapshot — α < 1 keeps part of θ0's robustness.

Floating-point tensors (weights and BatchNorm running statistics) are averaged; integer buffers
(BatchNorm's batch counter) are taken from the last state. :func:`recompute_batchnorm` re-estimates
BatchNorm statistics on target tiles instead (a no-op for families without BatchNorm);
:func:`keep_batchnorm_statistics` holds them at θ0's during a run (``--batchnorm-stats keep``).
Snapshots are read one at a time, so averaging needs memory for the running sum only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from selfadapt_deploy.models.loading import load_plain

WISE_ALPHAS = (0.25, 0.5, 0.75)
SWA = "swa"
#: every weight average by candidate name → its WiSE-FT α (None: SWA)
AVERAGES: dict[str, float | None] = {SWA: None, **{f"wise-{a:.2f}": a for a in WISE_ALPHAS}}


def average_states(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The exact mean of every floating-point tensor (summed in float64, then cast back to its
    dtype); other tensors from the last state."""
    total: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    n = 0
    for state in states:
        if n and state.keys() != last.keys():
            raise ValueError("cannot average state dicts with different keys")
        for k, v in state.items():
            if v.dtype.is_floating_point:
                total[k] = total[k] + v.double() if k in total else v.double()
        last, n = state, n + 1
    if n == 0:
        raise ValueError("nothing to average")
    return {k: (total[k] / n).to(v.dtype) if k in total else v.clone() for k, v in last.items()}


def interpolate_states(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """start + α(end − start) for floating-point tensors (in float64); other tensors from ``end``."""
    if start.keys() != end.keys():
        raise ValueError("cannot interpolate state dicts with different keys")
    out = {}
    for k, e in end.items():
        s = start[k]
        out[k] = (s.double() + alpha * (e.double() - s.double())).to(e.dtype) \
            if e.dtype.is_floating_point else e.clone()
    return out


def snapshot_states(paths: Sequence[Path]) -> Iterable[dict[str, torch.Tensor]]:
    """The state dicts of snapshot files, loaded one at a time (tensors only, never pickles)."""
    for path in paths:
        yield load_plain(path, "snapshot")


def average_state(name: str, snapshots: dict[int, Path], warmup: int) -> dict[str, torch.Tensor]:
    """The state of the weight average ``name`` (:data:`AVERAGES`) of a run's snapshot files
    (iteration → file; iteration 0 is θ0): SWA over the snapshots at or after the end of warm-up
    (the last one if none is), WiSE-FT between θ0 and the last snapshot."""
    if name not in AVERAGES:
        raise ValueError(f"unknown weight average '{name}'; known: {', '.join(AVERAGES)}")
    iterations = sorted(snapshots)
    alpha = AVERAGES[name]
    if alpha is None:
        after = [i for i in iterations if i >= max(1, warmup)] or iterations[-1:]
        return average_states(snapshot_states([snapshots[i] for i in after]))
    start, end = snapshot_states([snapshots[iterations[0]], snapshots[iterations[-1]]])
    return interpolate_states(start, end, alpha)


def batchnorms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``net`` (none in Cellpose-SAM, which uses LayerNorm)."""
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def keep_batchnorm_statistics(net: nn.Module) -> None:
    """Freeze ``net``'s BatchNorm running statistics where they are (momentum 0: training-mode
    forwards still normalise each batch by its own statistics, but never update the running
    ones, so eval-mode predictions keep them). The momentum is not saved with the weights."""
    for m in batchnorms(net):
        m.momentum = 0.0


@torch.no_grad()
def recompute_batchnorm(net: nn.Module, tiles: torch.Tensor, batch_size: int = 8) -> bool:
    """Re-estimate every BatchNorm's running mean and variance on ``tiles`` (N×C×S×S) as a
    cumulative average over batches (``momentum=None``); the network ends in eval mode. Returns
    whether it had any BatchNorm."""
    norms = batchnorms(net)
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        net.train()
        device = next(net.parameters()).device
        for i in range(0, len(tiles), batch_size):
            net(tiles[i : i + batch_size].to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        net.eval()
    return True
