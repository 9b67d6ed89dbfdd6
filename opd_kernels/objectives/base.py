"""What an objective is: its needs, its float64 oracle, and its gradient in the kernels' form.

An objective is a per-position loss L(p, q) of the student's distribution p = softmax(x_s) and
the teacher's q = softmax(x_t), x = z / tau (z the logits after the model's soft-capping). The
backends never branch on an objective's name. Each objective declares

- ``needs``: which per-row quantities the backend's passes must produce (:class:`Need`);
- ``reference``: its per-position value in plain PyTorch on full logits (the test oracle,
  differentiable, any dtype: pass float64);
- ``from_passes``: its per-row value and its gradient w.r.t. x_s, computed from those per-row
  quantities only (nothing of size [N, V]), in the one form every backend's kernels consume:

      dL/dx_v = p_v (shift + reverse (log p_v - log q_v) + mixture (log p_v - log m_v))
                + forward q_v + sum_j sparse_values[j] [v == sparse_ids[j]]

  with m = beta q + (1 - beta) p, ``shift`` a per-row tensor and ``reverse``, ``forward``,
  ``mixture`` and ``beta`` numbers of the call (:class:`GradForm`). The backend multiplies by
  the upstream gradient and by dx/dz_raw = (1 - (z / c)^2) / tau (soft-capping at c, if any).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch


class Need(enum.Enum):
    """Per-row quantities a pass can produce (a backend declares the ones it can). A dense
    teacher gives the first four by a pass over its whole vocabulary (``reads_full_teacher``);
    a sparse (served) teacher gives TEACHER_AT_TOKENS, SUPPORT and TEACHER_TOPK from what the
    server returned, never TEACHER_FULL or MIXTURE."""

    TEACHER_FULL = "the teacher's full distribution (lse_t, both KLs)"
    TEACHER_AT_TOKENS = "the teacher's log-prob of each sampled token"
    MIXTURE = "a second pass over both models for the mixture sums of the generalized JSD"
    SUPPORT = "the student's top-k ids and both models' logits at them"
    TOKENS = "the sampled token ids"
    TEACHER_TOPK = "the teacher's own top-K ids and log-probs (a served teacher's answer)"


def reads_full_teacher(needs) -> bool:
    """Whether a dense teacher must be read over its whole vocabulary to meet ``needs``."""
    return bool(set(needs) & {Need.TEACHER_FULL, Need.TEACHER_AT_TOKENS, Need.MIXTURE})


@dataclass
class PassResults:
    """What a backend's passes computed, per row ([N] fp32 unless noted), in units of x = z / tau.
    Fields an objective does not need may be None. A model's lse and its x at the support may
    share a per-row offset (a backend may center both on the row's max, so that fp32 keeps
    their difference exact at logits near 1e4): objectives read only x - lse and differences of
    x, never x or lse alone."""

    lse_s: torch.Tensor
    lse_t: Optional[torch.Tensor] = None
    reverse_kl: Optional[torch.Tensor] = None        # KL(p || q)
    forward_kl: Optional[torch.Tensor] = None        # KL(q || p)
    student_logprob: Optional[torch.Tensor] = None   # log p(y) at tokens
    teacher_logprob: Optional[torch.Tensor] = None   # log q(y)
    support: Optional[torch.Tensor] = None           # [N, k] int64, the student's top-k, descending
    student_at_support: Optional[torch.Tensor] = None  # [N, k] x_s at support
    teacher_at_support: Optional[torch.Tensor] = None  # [N, k] x_t at support
    mixture_student: Optional[torch.Tensor] = None   # KL(p || m) = sum_v p_v (log p_v - log m_v)
    mixture_teacher: Optional[torch.Tensor] = None   # KL(q || m)
    tokens: Optional[torch.Tensor] = None            # [N] int64
    teacher_ids: Optional[torch.Tensor] = None       # [N, K] int64, a served teacher's top-K ids
    teacher_topk_logprobs: Optional[torch.Tensor] = None  # [N, K] its log q there (as served)
    student_at_teacher_ids: Optional[torch.Tensor] = None  # [N, K] x_s there (offset as lse_s)


@dataclass
class GradForm:
    """dL/dx_s of every row for an upstream gradient of 1, in the form of the module docstring.
    ``dense`` False: only the sparse part is non-zero (no pass over the vocabulary needed)."""

    shift: Optional[torch.Tensor] = None
    reverse: float = 0.0
    forward: float = 0.0
    mixture: float = 0.0
    beta: float = 0.0
    sparse_ids: Optional[torch.Tensor] = None
    sparse_values: Optional[torch.Tensor] = None

    @property
    def dense(self) -> bool:
        return self.shift is not None

    def materialize(self, student_x: torch.Tensor, teacher_x: Optional[torch.Tensor]) -> torch.Tensor:
        """The whole [N, V] gradient from full logits (x units): for tests and small inputs only."""
        grad = torch.zeros_like(student_x)
        if self.dense:
            log_p = torch.log_softmax(student_x, -1)
            p = log_p.exp()
            coef = self.shift[:, None].to(student_x.dtype).expand_as(student_x)
            if teacher_x is not None:
                log_q = torch.log_softmax(teacher_x, -1)
                if self.reverse:
                    coef = coef + self.reverse * torch.where(p > 0, log_p - log_q, 0.0)
                if self.mixture:
                    log_m = torch.logaddexp(math.log(self.beta) + log_q, math.log1p(-self.beta) + log_p)
                    coef = coef + self.mixture * torch.where(p > 0, log_p - log_m, 0.0)
                if self.forward:
                    grad = grad + self.forward * log_q.exp()
            grad = grad + torch.where(p > 0, p * coef, 0.0)
        if self.sparse_ids is not None:
            grad = grad.scatter_add(-1, self.sparse_ids, self.sparse_values.to(grad.dtype))
        return grad


@dataclass(frozen=True)
class RowGradForm:
    """A dense GradForm whose shift is affine in the row's KLs, token log-probs and mixture sums,

        shift = constant + sum of coefficient * field   over ``terms`` ((field, coefficient))

    with ``reverse``, ``forward``, ``mixture`` and ``beta`` numbers of the call (no sparse
    part). A backend can evaluate it right after a row's passes, per row, and write the row's
    gradient while the row is still in cache; ``at`` gives the GradForm of whole PassResults."""

    constant: float = 0.0
    terms: tuple = ()
    reverse: float = 0.0
    forward: float = 0.0
    mixture: float = 0.0
    beta: float = 0.0

    FIELDS: ClassVar[tuple] = ("reverse_kl", "forward_kl", "student_logprob", "teacher_logprob",
                               "mixture_student", "mixture_teacher")

    def __post_init__(self):
        unknown = [name for name, _ in self.terms if name not in self.FIELDS]
        if unknown:
            raise ValueError(f"RowGradForm terms must be among {self.FIELDS}, got {unknown}")

    def at(self, r: PassResults) -> GradForm:
        shift = torch.full_like(r.lse_s, self.constant)
        for name, coefficient in self.terms:
            shift = shift + coefficient * getattr(r, name)
        return GradForm(shift=shift, reverse=self.reverse, forward=self.forward,
                        mixture=self.mixture, beta=self.beta)


@dataclass(frozen=True)
class Param:
    """A number an objective takes (e.g. the JSD's beta), with its default and range."""

    default: float
    low: float = -math.inf
    high: float = math.inf

    def check(self, objective: str, name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not self.low <= value <= self.high:
            raise ValueError(f"{name} of objective {objective!r} must be a number in "
                             f"[{self.low:g}, {self.high:g}], got {value!r}")
        return float(value)


class Objective:
    """Subclass per objective module; see the module docstring. ``needs`` may depend on the
    parameters (the JSD at beta = 0 or 1 is a plain KL and needs no mixture pass)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    base_needs: ClassVar[frozenset] = frozenset({Need.TEACHER_FULL})
    params: ClassVar[dict] = {}

    def needs(self, params: dict) -> frozenset:
        return self.base_needs

    def check_params(self, given: dict) -> dict:
        """The call's parameters, defaults filled in; unknown names and bad values raise."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            takes = ", ".join(self.params) or "no parameters"
            raise ValueError(f"objective {self.name!r} takes {takes}; got {', '.join(unknown)}")
        return {name: spec.check(self.name, name, given.get(name, spec.default))
                for name, spec in self.params.items()}

    def reference(self, student: torch.Tensor, teacher: torch.Tensor, *, tokens=None, k: int = 16,
                  temperature: float = 1.0, **params) -> torch.Tensor:
        raise NotImplementedError

    def from_passes(self, r: PassResults, **params) -> tuple[torch.Tensor, GradForm]:
        raise NotImplementedError

    def row_grad_form(self, params: dict) -> Optional[RowGradForm]:
        """The objective's GradForm as a RowGradForm where it is one (from_passes then returns
        ``row_grad_form(params).at(r)``), else None."""
        return None

    def __repr__(self) -> str:
        return f"<objective {self.name!r}>"


# ---- helpers the objectives' references share --------------------------------------------------

def log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits / temperature, dim=-1)


def plogp_terms(log_p: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """p (log p - other) with the term 0 where p = 0 (gradient-safe: no 0 * inf anywhere)."""
    p = log_p.exp()
    return p * torch.where(p > 0, log_p - other, torch.zeros_like(log_p))


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis from log-probs; +inf where q = 0 < p."""
    return plogp_terms(log_p, log_q).sum(-1)


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the k largest logits, largest first, ties going to the lower token id.

    Equal to ``torch.sort(logits, descending=True, stable=True).indices[..., :k]``, in O(V):
    torch.topk finds the k-th value; every id above it is in, and of the ids equal to it the
    lowest ones fill the remaining places (torch.topk alone breaks ties arbitrarily).
    """
    top = torch.topk(logits, k, dim=-1)
    kth = top.values[..., -1:]
    if bool(((logits >= kth).sum(-1) == k).all()):
        ids = top.indices.sort(dim=-1).values  # no tie straddles the k-th place: topk's set is it
    else:
        above, at_kth = logits > kth, logits == kth
        places_left = k - above.sum(-1, keepdim=True)
        chosen = above | (at_kth & (at_kth.cumsum(-1) <= places_left))
        ids = chosen.nonzero()[:, -1].reshape(*logits.shape[:-1], k)  # ascending ids, k a row
    order = torch.sort(logits.gather(-1, ids), dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order)
