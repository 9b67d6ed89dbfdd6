"""The OPD objectives, one module each (see base.py for what a module declares).

Every module of this package that defines ``OBJECTIVE`` is registered under its name; adding an
objective is adding a module. ``get`` also takes an :class:`Objective` instance, so a user's own
objective runs on every backend whose declared quantities cover its needs.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import GradForm, Need, Objective, Param, PassResults, topk_ids

_REGISTRY: dict[str, Objective] = {}


def _discover() -> dict[str, Objective]:
    if not _REGISTRY:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            module = importlib.import_module(f"{__name__}.{info.name}")
            objective = getattr(module, "OBJECTIVE", None)
            if objective is not None:
                _REGISTRY[objective.name] = objective
    return _REGISTRY


def names() -> tuple[str, ...]:
    """Every registered objective's name, sorted."""
    return tuple(sorted(_discover()))


def get(objective) -> Objective:
    """The objective named ``objective`` (or the instance itself); unknown names raise."""
    if isinstance(objective, Objective):
        return objective
    found = _discover().get(objective) if isinstance(objective, str) else None
    if found is None:
        raise ValueError(f"objective must be one of {names()} or an opd_kernels.objectives.Objective, "
                         f"got {objective!r}")
    return found


__all__ = ["GradForm", "Need", "Objective", "Param", "PassResults", "get", "names", "topk_ids"]
