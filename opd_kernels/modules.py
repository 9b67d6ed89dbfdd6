"""nn.Module wrapper over both input forms, for trainers that hold their losses as modules."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import api, objectives


class OPDLoss(nn.Module):
    """An OPD objective as a module.

    ``loss(student_logits, teacher_logits, tokens=..., mask=...)`` on logits, or
    ``loss(student_hidden, teacher_hidden, student_weight=W_s, teacher_weight=W_t, ...)`` on hidden
    states and lm_head weights (the fused-linear form; ``student_bias``/``teacher_bias`` too).
    Returns the loss, or ``(loss, TopKStats)`` with ``return_stats=True``. The objective's
    parameters (e.g. ``beta`` of "jsd") are keyword arguments, checked here. ``vocab_parallel``
    (an opd_kernels.VocabParallel): the inputs are this rank's shard of the vocabulary.
    """

    def __init__(self, objective="topk", k: int = 16, temperature: float = 1.0,
                 reduction: str = "mean", return_stats: bool = False,
                 ignore_index: Optional[int] = -100, student_softcap: Optional[float] = None,
                 teacher_softcap: Optional[float] = None, vocab_size: Optional[int] = None,
                 weight_grad_dtype: torch.dtype = torch.float32, grad_in_forward: bool = True,
                 backend: str = "auto", vocab_parallel=None, **objective_params):
        super().__init__()
        self.objective = objectives.get(objective)
        self.objective_params = self.objective.check_params(objective_params)
        self.k, self.temperature, self.reduction = k, temperature, reduction
        self.return_stats, self.ignore_index, self.backend = return_stats, ignore_index, backend
        self.student_softcap, self.teacher_softcap = student_softcap, teacher_softcap
        self.vocab_size, self.weight_grad_dtype = vocab_size, weight_grad_dtype
        self.grad_in_forward, self.vocab_parallel = grad_in_forward, vocab_parallel

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, *,
                tokens: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                student_weight: Optional[torch.Tensor] = None,
                teacher_weight: Optional[torch.Tensor] = None,
                student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None):
        common = dict(objective=self.objective, tokens=tokens, k=self.k, mask=mask,
                      temperature=self.temperature, reduction=self.reduction,
                      return_stats=self.return_stats, ignore_index=self.ignore_index,
                      student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap,
                      backend=self.backend, vocab_parallel=self.vocab_parallel,
                      **self.objective_params)
        if student_weight is None and teacher_weight is None:
            if self.vocab_size is not None or student_bias is not None or teacher_bias is not None:
                raise ValueError("vocab_size and the biases apply to the fused-linear form (pass "
                                 "student_weight and teacher_weight); logits share one vocabulary")
            return api.opd_loss(student, teacher, **common)
        if student_weight is None or teacher_weight is None:
            raise ValueError("pass both student_weight and teacher_weight (fused-linear form) or "
                             "neither (logits form)")
        return api.fused_linear_opd_loss(student, student_weight, teacher, teacher_weight,
                                         student_bias=student_bias, teacher_bias=teacher_bias,
                                         vocab_size=self.vocab_size,
                                         weight_grad_dtype=self.weight_grad_dtype,
                                         grad_in_forward=self.grad_in_forward, **common)

    def extra_repr(self) -> str:
        params = "".join(f", {name}={value}" for name, value in self.objective_params.items())
        return (f"objective={self.objective.name!r}{params}, k={self.k}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}")
