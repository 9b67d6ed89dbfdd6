"""The top-k shared-mass statistics of one batch of positions (opd-math.md, "Per-position quantities")."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

STAT_FIELDS = ("overlap", "student_mass", "teacher_mass", "overlap_advantage",
               "student_entropy", "teacher_entropy", "entropy_gap")


@dataclass
class TopKStats:
    """Per-position fp32 tensors, all of the positions' leading shape.

    overlap           |S ∩ T| / k, S = TopK(p, k), T = TopK(q, k)
    student_mass      sum of p over S ∩ T (not renormalized)
    teacher_mass      sum of q over S ∩ T
    overlap_advantage mean over S ∩ T of p̄ (log q̄ - log p̄), p̄, q̄ renormalized over S ∩ T;
                      NaN where S ∩ T is empty
    student_entropy   H(p);  teacher_entropy  H(q);  entropy_gap  |H(q) - H(p)|

    Positions that are masked out hold NaN in every field; ``mask`` (bool, True = counted) is kept
    so that :meth:`summary` averages over the counted positions only.
    """

    overlap: torch.Tensor
    student_mass: torch.Tensor
    teacher_mass: torch.Tensor
    overlap_advantage: torch.Tensor
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    entropy_gap: torch.Tensor
    mask: Optional[torch.Tensor] = None

    def tensors(self) -> dict:
        return {name: getattr(self, name) for name in STAT_FIELDS}

    def map(self, fn) -> "TopKStats":
        """The same statistics with ``fn`` applied to every tensor (the mask included)."""
        mask = None if self.mask is None else fn(self.mask)
        return dataclasses.replace(self, mask=mask, **{k: fn(v) for k, v in self.tensors().items()})

    def summary(self) -> dict:
        """Token means over the counted positions, as plain floats (the logging form).

        ``overlap_advantage`` is averaged over the counted positions where S ∩ T is non-empty;
        ``empty_overlap_fraction`` says how many counted positions had an empty S ∩ T.
        An empty mask gives NaN for every mean.
        """
        counted = torch.ones_like(self.overlap, dtype=torch.bool) if self.mask is None else self.mask
        values = {name: t.detach().double()[counted] for name, t in self.tensors().items()}
        out = {}
        for name, v in values.items():
            if name == "overlap_advantage":
                v = v[~torch.isnan(v)]
            out[name] = v.mean().item() if v.numel() else math.nan
        n = int(counted.sum())
        empty = int(torch.isnan(values["overlap_advantage"]).sum())
        out["empty_overlap_fraction"] = empty / n if n else math.nan
        return out
