"""nn.Module wrapper over both input forms, for trainers that hold their losses as modules."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import api


class OPDLoss(nn.Module):
    """An OPD objective as a module.

    ``loss(student_logits, teacher_logits, tokens=..., mask=...)`` on logits, or
    ``loss(student_hidden, teacher_hidden, student_weight=W_s, teacher_weight=W_t, ...)`` on hidden
    states and lm_head weights (the fused-linear form). Returns the loss, or ``(loss, TopKStats)``
    with ``return_stats=True``.
    """

    def __init__(self, objective: str = "topk", k: int = 16, temperature: float = 1.0,
                 reduction: str = "mean", return_stats: bool = False,
                 vocab_size: Optional[int] = None, weight_grad_dtype: torch.dtype = torch.float32,
                 grad_in_forward: bool = True, backend: str = "auto"):
        super().__init__()
        self.objective, self.k, self.temperature = objective, k, temperature
        self.reduction, self.return_stats, self.backend = reduction, return_stats, backend
        self.vocab_size, self.weight_grad_dtype = vocab_size, weight_grad_dtype
        self.grad_in_forward = grad_in_forward

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, *,
                tokens: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                student_weight: Optional[torch.Tensor] = None,
                teacher_weight: Optional[torch.Tensor] = None):
        common = dict(objective=self.objective, tokens=tokens, k=self.k, mask=mask,
                      temperature=self.temperature, reduction=self.reduction,
                      return_stats=self.return_stats, backend=self.backend)
        if student_weight is None and teacher_weight is None:
            if self.vocab_size is not None:
                raise ValueError("vocab_size applies to the fused-linear form (pass student_weight "
                                 "and teacher_weight); logits must share one vocabulary")
            return api.opd_loss(student, teacher, **common)
        if student_weight is None or teacher_weight is None:
            raise ValueError("pass both student_weight and teacher_weight (fused-linear form) or "
                             "neither (logits form)")
        return api.fused_linear_opd_loss(student, student_weight, teacher, teacher_weight,
                                         vocab_size=self.vocab_size,
                                         weight_grad_dtype=self.weight_grad_dtype,
                                         grad_in_forward=self.grad_in_forward, **common)

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, k={self.k}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}")
