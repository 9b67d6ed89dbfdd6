"""The top-k shared-mass statistics of one batch of positions (opd-math.md, "Per-position quantities"),
and the per-position diagnostics that come from the loss's own pass."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

STAT_FIELDS = ("overlap", "student_mass", "teacher_mass", "overlap_advantage",
               "student_entropy", "teacher_entropy", "entropy_gap")
# Filled when the pass that computed the statistics had them: the reverse KL when it read both
# full distributions, the log-probs when ``tokens`` were given.
OPTIONAL_FIELDS = ("reverse_kl", "student_logprob", "teacher_logprob")


@dataclass
class TopKStats:
    """Per-position fp32 tensors, all of the positions' leading shape.

    overlap           |S ∩ T| / k, S = TopK(p, k), T = TopK(q, k)
    student_mass      sum of p over S ∩ T (not renormalized)
    teacher_mass      sum of q over S ∩ T
    overlap_advantage mean over S ∩ T of p̄ (log q̄ - log p̄), p̄, q̄ renormalized over S ∩ T;
                      NaN where S ∩ T is empty
    student_entropy   H(p);  teacher_entropy  H(q);  entropy_gap  |H(q) - H(p)|
    reverse_kl        KL(p || q) over the whole vocabulary (None if the pass did not read both)
    student_logprob, teacher_logprob   log p(y), log q(y) at the call's ``tokens`` (or None)

    ``teacher_entropy_is_bound``: the teacher was served (its top-K only), so ``teacher_entropy``
    is a lower bound (the top-K terms plus the tail as one bin) and ``entropy_gap`` is taken from
    it; ``summary`` then names them ``teacher_entropy_lower_bound`` and ``entropy_gap_of_bound``.

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
    reverse_kl: Optional[torch.Tensor] = None
    student_logprob: Optional[torch.Tensor] = None
    teacher_logprob: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    teacher_entropy_is_bound: bool = False

    def tensors(self) -> dict:
        """Every per-position field that is present, by name (the mask excluded)."""
        names = STAT_FIELDS + OPTIONAL_FIELDS
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def map(self, fn) -> "TopKStats":
        """The same statistics with ``fn`` applied to every tensor (the mask included)."""
        mask = None if self.mask is None else fn(self.mask)
        return dataclasses.replace(self, mask=mask, **{k: fn(v) for k, v in self.tensors().items()})

    @classmethod
    def from_support(cls, k: int, support: torch.Tensor, teacher_topk: torch.Tensor,
                     log_p: torch.Tensor, log_q: torch.Tensor, student_entropy: torch.Tensor,
                     teacher_entropy: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     **optional) -> "TopKStats":
        """The statistics from S = ``support`` and T = ``teacher_topk`` ([N, k] ids), log p and
        log q at the ids of S, and both entropies: every sum over S ∩ T runs over S, so nothing
        else of either vocabulary is needed. ``optional``: fields of OPTIONAL_FIELDS (None
        left out) and ``teacher_entropy_is_bound``; rows with ``mask`` False hold NaN."""
        shared = (support[:, :, None] == teacher_topk[:, None, :]).any(-1)
        n_shared = shared.sum(-1)
        zero = torch.zeros_like(log_p)
        p = torch.where(shared, log_p.exp(), zero)
        student_mass = p.sum(-1)
        teacher_mass = torch.where(shared, log_q.exp(), zero).sum(-1)
        log_p_bar = log_p - student_mass.log()[:, None]
        log_q_bar = log_q - teacher_mass.log()[:, None]
        terms = torch.where(shared & (p > 0), log_p_bar.exp() * (log_q_bar - log_p_bar), zero)
        nan = torch.full_like(student_mass, float("nan"))
        advantage = torch.where(n_shared > 0, terms.sum(-1) / n_shared.clamp(min=1), nan)
        bound = optional.pop("teacher_entropy_is_bound", False)
        fields = dict(overlap=n_shared.float() / k, student_mass=student_mass,
                      teacher_mass=teacher_mass, overlap_advantage=advantage,
                      student_entropy=student_entropy, teacher_entropy=teacher_entropy,
                      entropy_gap=(teacher_entropy - student_entropy).abs(), **optional)
        fields = {name: v.float() for name, v in fields.items() if v is not None}
        if mask is not None:
            fields = {name: torch.where(mask, v, nan) for name, v in fields.items()}
        return cls(**fields, teacher_entropy_is_bound=bound)

    @classmethod
    def cat(cls, parts: list) -> "TopKStats":
        """The statistics of consecutive chunks of positions as one (along the first axis)."""
        fields = {name: torch.cat([p.tensors()[name] for p in parts]) for name in parts[0].tensors()}
        # A part without a mask counts every position: keep the other parts' masks (dropping
        # them all would count their uncounted, NaN-filled positions in summary()).
        masks = [p.mask for p in parts]
        mask = None if all(m is None for m in masks) else torch.cat(
            [torch.ones_like(p.overlap, dtype=torch.bool) if m is None else m
             for p, m in zip(parts, masks)])
        return cls(**fields, mask=mask, teacher_entropy_is_bound=parts[0].teacher_entropy_is_bound)

    def summary(self) -> dict:
        """Means over the counted positions, as plain floats (the logging form).

        Two aggregations of the overlap masses, named apart:
        - ``student_mass``, ``teacher_mass``: the token mean over every counted position (a
          position with S ∩ T empty counts as mass 0);
        - ``student_mass_shared``, ``teacher_mass_shared``: the mean over the counted positions
          where S ∩ T is non-empty only, as the paper's code (thunlp/OPD) logs them.
        ``overlap_advantage`` is undefined where S ∩ T is empty, so it is always averaged over the
        non-empty positions; ``empty_overlap_fraction`` says how many counted positions were empty.
        (verl's top-k ``student_mass`` is another quantity, the student's mass on the teacher's
        top-k T, and is not computed here.) An empty mask gives NaN for every mean.
        """
        counted = torch.ones_like(self.overlap, dtype=torch.bool) if self.mask is None else self.mask
        values = {name: t.detach().double()[counted] for name, t in self.tensors().items()}
        # S ∩ T non-empty: by the overlap itself (the advantage is also NaN where the student has
        # no mass on a non-empty S ∩ T, fewer than k finite logits; it is averaged where defined)
        shared = values["overlap"] > 0
        mean = lambda v: v.mean().item() if v.numel() else math.nan
        advantage = values["overlap_advantage"]
        out = {name: mean(advantage[~torch.isnan(advantage)] if name == "overlap_advantage" else v)
               for name, v in values.items()}
        out["student_mass_shared"] = mean(values["student_mass"][shared])
        out["teacher_mass_shared"] = mean(values["teacher_mass"][shared])
        n = int(counted.sum())
        out["empty_overlap_fraction"] = int((~shared).sum()) / n if n else math.nan
        if self.teacher_entropy_is_bound:
            out["teacher_entropy_lower_bound"] = out.pop("teacher_entropy")
            out["entropy_gap_of_bound"] = out.pop("entropy_gap")
        return out
