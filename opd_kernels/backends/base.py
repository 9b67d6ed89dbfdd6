"""The interface between the public functions and a backend: one call is one dataclass.

The public layer checks the arguments, flattens the positions to rows and hands a backend a
:class:`LossCall` (or a :class:`Model` for the single-model ops); the backend returns a
:class:`LossResult`. A backend declares what it can run in :class:`Capabilities`; the registry
(backends/__init__.py) matches a call against them before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..objectives import Need, Objective
from ..stats import TopKStats


@dataclass(frozen=True)
class Model:
    """One model's side of a call, its positions flattened to rows: ``logits`` [N, V] (logits
    form) or ``hidden`` [N, H] with ``weight`` [V', H] and an optional ``bias`` [V'] (fused-linear
    form). ``softcap`` c applies c tanh(z / c) to the logits before the temperature."""

    logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None

    @property
    def tensors(self) -> tuple:
        return tuple(t for t in (self.logits, self.hidden, self.weight, self.bias) if t is not None)


@dataclass(frozen=True)
class LossCall:
    """Everything one loss (or statistics) call needs. ``objective`` None: statistics only.
    ``needs``: the quantities the objective needs plus those ``return_stats`` adds. ``mask``
    already holds the ignore_index positions; ``tokens`` are valid ids at every row (0 where
    uncounted), so backends gather them without a mask."""

    student: Model
    teacher: Model
    objective: Optional[Objective]
    params: dict = field(default_factory=dict)
    needs: frozenset = frozenset()
    tokens: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    k: int = 16
    temperature: float = 1.0
    vocab_size: int = 0
    reduction: str = "none"
    return_stats: bool = False
    weight_grad_dtype: torch.dtype = torch.float32
    grad_in_forward: bool = True


@dataclass
class LossResult:
    """Per-row values (0 at uncounted rows), or the loss already reduced (``reduced`` True,
    when the backend computed the gradient inside the forward), and the statistics if asked."""

    values: torch.Tensor
    reduced: bool = False
    stats: Optional[TopKStats] = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend runs: input forms ("logits", "fused_linear"), device types, input dtypes,
    the per-row quantities its passes produce (objectives.Need), and the largest k (None: any)."""

    forms: frozenset
    devices: frozenset
    dtypes: frozenset
    quantities: frozenset = frozenset(Need) - {Need.TEACHER_TOPK}
    max_k: Optional[int] = None
    needs_interpreter_off_gpu: bool = False
    served_teacher: bool = False  # takes a served teacher's answer (opd_kernels.served)


class Backend:
    """A backend: a name the user picks it by, its capabilities, and the three entry points."""

    name: str
    capabilities: Capabilities

    def logsumexp(self, model: Model, temperature: float, vocab_size: int) -> torch.Tensor:
        raise NotImplementedError

    def token_logprobs(self, model: Model, tokens: torch.Tensor, temperature: float,
                       vocab_size: int) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, call: LossCall) -> LossResult:
        raise NotImplementedError

    def statistics(self, call: LossCall) -> TopKStats:
        raise NotImplementedError

    # A served teacher (``call.teacher`` a served.ServedTeacher), where capabilities say so.
    def served_loss(self, call: LossCall) -> LossResult:
        raise NotImplementedError

    def served_statistics(self, call: LossCall) -> TopKStats:
        raise NotImplementedError

    def student_topk(self, model: Model, k: int, vocab_size: int) -> torch.Tensor:
        """The student's top-k ids [N, k], largest first, ties to the lower id (no gradient)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.name!r} ({', '.join(sorted(self.capabilities.forms))})>"
