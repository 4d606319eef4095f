"""Validation of settings dataclasses: one rule per field, one message format. A dataclass's
``__post_init__`` calls :func:`check_fields` with its rule table, so a bad value is one error that
names the option, what it must be and what it got — before any file is read or written."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

from selfadapt_deploy.errors import SaDeployError

#: field name → (test(value) → bool, what the value must be)
Rules = Mapping[str, tuple[Callable[[object], bool], str]]


def count(v: object, lo: int = 1) -> bool:
    """An integer (not a bool) ≥ ``lo``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def real(v: object, lo: float = -math.inf, hi: float = math.inf, open_lo: bool = False,
         open_hi: bool = True) -> bool:
    """A finite real number (not a bool) in the interval [lo, hi) (ends as flagged)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return False
    return (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)


def one_of(options: Iterable[str]) -> tuple[Callable[[object], bool], str]:
    options = tuple(options)
    return (lambda v: v in options, f"one of {', '.join(options)}")


def option_name(field: str) -> str:
    """The CLI option of a settings field: ``batch_size`` → ``--batch-size``."""
    return "--" + field.replace("_", "-")


def check_fields(obj: object, rules: Rules) -> None:
    """Raise one :class:`SaDeployError` for the first field of ``obj`` that breaks its rule."""
    for name, (ok, wanted) in rules.items():
        value = getattr(obj, name)
        try:
            valid = bool(ok(value))
        except TypeError:  # a value of the wrong type (API callers)
            valid = False
        if not valid:
            raise SaDeployError(f"{option_name(name)} must be {wanted}, got {value!r}")
