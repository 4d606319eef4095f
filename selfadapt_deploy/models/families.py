"""The model-family registry: every family class, found by its name, by a cellpose model name or
by the keys of a state dict. Adding a family is one class (``models/base.py`` lists what it
declares) and one entry in :data:`FAMILIES`; nothing else in the code names a family.
"""

from __future__ import annotations

import difflib

from selfadapt_deploy.errors import ModelLoadError
from selfadapt_deploy.models.base import SegmentationNet
from selfadapt_deploy.models.cpdino import CellposeDINO
from selfadapt_deploy.models.cpnet import CPnet
from selfadapt_deploy.models.cpsam import CellposeSAM

#: every family sa-deploy runs, adapts and exports
FAMILIES: dict[str, type[SegmentationNet]] = {cls.family: cls for cls in (CPnet, CellposeSAM, CellposeDINO)}


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_class(name: str) -> type[SegmentationNet]:
    """The family called ``name``; an unknown name is an error that lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelLoadError(f"unknown model family '{name}'; sa-deploy knows "
                             f"{', '.join(FAMILIES)}") from None


def family_of_state(state: dict) -> type[SegmentationNet]:
    """The family whose state dicts have these keys; raises for anything else."""
    keys = {k.removeprefix("module.") for k in state}
    found = [cls for cls in FAMILIES.values() if cls.recognises(keys)]
    if len(found) != 1:
        titles = " / ".join(cls.title for cls in FAMILIES.values())
        raise ModelLoadError(f"not a state dict of any known family ({titles})" if not found else
                             f"ambiguous state dict: keys of {', '.join(c.title for c in found)}")
    return found[0]


def family_of_model_name(name: str) -> type[SegmentationNet] | None:
    """The family of cellpose's released model ``name`` (``cpsam``, ``cyto3``, …), or None."""
    return next((cls for cls in FAMILIES.values() if name in cls.model_names), None)


def model_names() -> tuple[str, ...]:
    return tuple(n for cls in FAMILIES.values() for n in cls.model_names)


def closest_model_names(name: str) -> str:
    """A hint naming released models close to a mistyped ``name`` (or all of them)."""
    known = model_names()
    close = difflib.get_close_matches(name, known, n=3)
    return f"Did you mean {', '.join(close)}?" if close else f"Known names: {', '.join(known)}."
