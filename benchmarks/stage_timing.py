"""Per-stage wall time inside one end-to-end call, shared by the benchmarks.

Each pipeline looks its stage functions up at call time, so replacing ``owner.attr`` by a timed
wrapper for the duration of a call measures the stages of that very call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageClock:
    """Accumulates wall time and call counts of wrapped functions."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed

    def summary(self, total: float) -> dict[str, float]:
        """Stage seconds plus ``other`` (end to end minus the stages) and ``total``."""
        return {**self.seconds, "other": total - sum(self.seconds.values()), "total": total}


@contextlib.contextmanager
def patched(clock: StageClock, targets: dict[str, tuple[Any, str]]) -> Iterator[StageClock]:
    """Replace ``owner.attr`` by a timed wrapper for each stage while the block runs."""
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr in targets.values()]
    try:
        for name, (owner, attr) in targets.items():
            setattr(owner, attr, clock.wrap(name, getattr(owner, attr)))
        yield clock
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
