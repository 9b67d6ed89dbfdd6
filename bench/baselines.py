"""The PyTorch code a user writes without this library: materialized logits, log_softmax.

Each function takes [N, V] logits, upcasts them to fp32 as training code does (``.float()``),
and returns per-row values (topk_overlap: a tuple of the statistics' tensors, which
torch.compile can trace). Top-k selection uses ``torch.topk`` rather than the reference's stable
sort: a user would, and a full sort would make the baseline look slower than it needs to be.
An objective's baseline is its own declared ``reference`` (opd_kernels.objectives) on the fp32
logits, so every registered objective has one with no code here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from opd_kernels.objectives import Need
from opd_kernels.reference import linear_logits

from .registry import OPS, Case, ObjectiveOp


def _log_probs(logits, temperature):
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def logsumexp(logits, temperature):
    return torch.logsumexp(logits.float() / temperature, dim=-1)


def token_logprobs(logits, tokens, temperature):
    return _log_probs(logits, temperature).gather(-1, tokens[:, None]).squeeze(-1)


def reverse_kl(student, teacher, temperature):
    log_p, log_q = _log_probs(student, temperature), _log_probs(teacher, temperature)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def topk_overlap(student, teacher, k, temperature):
    """(overlap, student_mass, teacher_mass, overlap_advantage, student_entropy,
    teacher_entropy, entropy_gap) per row, as in opd-math.md."""
    log_p, log_q = _log_probs(student, temperature), _log_probs(teacher, temperature)
    s_ids = torch.topk(log_p, k, dim=-1).indices
    t_ids = torch.topk(log_q, k, dim=-1).indices
    shared = (s_ids[:, :, None] == t_ids[:, None, :]).any(-1)  # [N, k] over S
    n_shared = shared.sum(-1)
    log_p_s, log_q_s = log_p.gather(-1, s_ids), log_q.gather(-1, s_ids)
    zero = torch.zeros_like(log_p_s)
    student_mass = torch.where(shared, log_p_s.exp(), zero).sum(-1)
    teacher_mass = torch.where(shared, log_q_s.exp(), zero).sum(-1)
    log_p_bar = log_p_s - student_mass.log()[:, None]
    log_q_bar = log_q_s - teacher_mass.log()[:, None]
    terms = torch.where(shared, log_p_bar.exp() * (log_q_bar - log_p_bar), zero).sum(-1)
    advantage = torch.where(n_shared > 0, terms / n_shared.clamp(min=1), float("nan"))
    h_p = -(log_p.exp() * log_p).sum(-1)
    h_q = -(log_q.exp() * log_q).sum(-1)
    return (n_shared.float() / k, student_mass, teacher_mass, advantage, h_p, h_q, (h_q - h_p).abs())


LOGITS_OPS = {
    "logsumexp": lambda s, t, y, k, tau: logsumexp(s, tau),
    "token_logprobs": lambda s, t, y, k, tau: token_logprobs(s, y, tau),
    "reverse_kl": lambda s, t, y, k, tau: reverse_kl(s, t, tau),
    "topk_overlap": lambda s, t, y, k, tau: topk_overlap(s, t, k, tau),
}
"""standalone op -> f(student_logits, teacher_logits, tokens, k, temperature) -> per-row output."""

_OBJECTIVE_BASELINES: dict = {}


def objective_baseline(objective: ObjectiveOp):
    """f(student_logits, teacher_logits, tokens, k, temperature): the objective's reference on
    the fp32 logits. One function object per objective and parameters (one torch.compile each)."""
    if objective not in _OBJECTIVE_BASELINES:
        spec, params = objective.spec, objective.kwargs
        tokens_needed = Need.TOKENS in objective.needs

        def fn(s, t, y, k, tau):
            return spec.reference(s.float(), t.float(), tokens=y if tokens_needed else None, k=k,
                                  temperature=tau, **params)
        _OBJECTIVE_BASELINES[objective] = fn
    return _OBJECTIVE_BASELINES[objective]


def logits_op(op: str):
    """The baseline of any op of the registry."""
    objective = OPS[op]
    return LOGITS_OPS[op] if objective is None else objective_baseline(objective)


def fused_inputs(case: Case, student_hidden, student_weight, teacher_hidden, teacher_weight):
    """The materialized logits a user computes before the loss (the teacher's only if used:
    every objective reads the teacher, the single-model ops do not)."""
    student = linear_logits(student_hidden, student_weight)
    if case.op in ("logsumexp", "token_logprobs"):
        return student, None
    return student, linear_logits(teacher_hidden, teacher_weight)
