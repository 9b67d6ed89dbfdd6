"""The OPD objectives, one module each (see base.py for what a module declares).

Every module of this package that defines ``OBJECTIVE`` is registered under its name; adding an
objective is adding a module. ``get`` also takes an :class:`Objective` instance, so a user's own
objective runs on every backend whose declared quantities cover its needs.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (GradForm, Need, Objective, Param, PassResults, RowGradForm, reads_full_teacher,
                   topk_ids)

_REGISTRY: dict[str, Objective] = {}


def _discover() -> dict[str, Objective]:
    if not _REGISTRY:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            module = importlib.import_module(f"{__name__}.{info.name}")
            objective = getattr(module, "OBJECTIVE", None)
            if objective is not None:
                _REGISTRY[objective.name] = objective
    return _REGISTRY


# What each kind of teacher can give (objectives.base.Need): a teacher given as logits or hidden
# states all but a served answer; a served teacher its answer (ids and log-probs), the log-probs
# of the sampled tokens and at the student's top-k when asked, never its full distribution.
TEACHER_PROVIDES = {
    "dense": frozenset(Need) - {Need.TEACHER_TOPK},
    "served": frozenset({Need.TEACHER_TOPK, Need.TEACHER_AT_TOKENS, Need.SUPPORT, Need.TOKENS}),
}


def names(teacher: str | None = "dense") -> tuple[str, ...]:
    """The registered objectives that run with a ``teacher`` of that kind ("dense": logits or
    hidden states; "served": a server's top-K answer; None: every one), sorted."""
    registry = _discover()
    if teacher is None:
        return tuple(sorted(registry))
    provides = TEACHER_PROVIDES[teacher]
    return tuple(sorted(name for name, objective in registry.items()
                        if objective.needs(objective.check_params({})) <= provides))


def get(objective) -> Objective:
    """The objective named ``objective`` (or the instance itself); unknown names raise."""
    if isinstance(objective, Objective):
        return objective
    found = _discover().get(objective) if isinstance(objective, str) else None
    if found is None:
        raise ValueError(f"objective must be one of {names(None)} or an opd_kernels.objectives.Objective, "
                         f"got {objective!r}")
    return found


__all__ = ["GradForm", "Need", "Objective", "Param", "PassResults", "RowGradForm", "TEACHER_PROVIDES",
           "get", "names", "reads_full_teacher", "topk_ids"]
