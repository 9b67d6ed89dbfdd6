"""The PyTorch code a user writes without this library: materialized logits, log_softmax.

Each function takes [N, V] logits, upcasts them to fp32 as training code does (``.float()``),
and returns per-row values (topk_overlap: a tuple of the statistics' tensors, which
torch.compile can trace). Top-k selection uses ``torch.topk`` rather than the reference's stable
sort: a user would, and a full sort would make the baseline look slower than it needs to be.
An objective's baseline is its own declared ``reference`` (opd_kernels.objectives) on the fp32
logits, so every registered objective has one with no code here. With a served teacher there are
no teacher logits for the reference to read: the baseline is plain PyTorch on the materialized
fp32 student logits and the answer (served_baseline: the per-row quantities by log_softmax and
gathers, the objective's declared from_passes, its gradient made dense).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from opd_kernels.objectives import Need, PassResults, topk_ids
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


def served_pass_results(x, served: dict, tokens, k: int, needs) -> PassResults:
    """What the objective's from_passes reads, from the student's x = z / tau [N, V] and the
    served answer (the keyword arguments of sparse_teacher_opd_loss)."""
    r = PassResults(lse_s=torch.logsumexp(x, -1), tokens=tokens)
    if Need.TOKENS in needs:
        r.student_logprob = x.gather(-1, tokens[:, None]).squeeze(-1) - r.lse_s
    if Need.SUPPORT in needs:
        r.support = topk_ids(x, k)
        r.student_at_support = x.gather(-1, r.support)
    r.teacher_ids, r.teacher_topk_logprobs = served["teacher_ids"], served["teacher_logprobs"]
    r.student_at_teacher_ids = x.gather(-1, r.teacher_ids)
    r.teacher_logprob = served.get("teacher_token_logprob")
    r.teacher_at_support = served.get("teacher_logprobs_at")
    return r


class _ServedLoss(torch.autograd.Function):
    """Per-row loss on materialized logits z against a served answer; the backward is the
    objective's GradForm made dense ([N, V], as eager autograd would make it)."""

    @staticmethod
    def forward(ctx, z, objective: ObjectiveOp, served, tokens, k, tau):
        x = z.float() / tau
        results = served_pass_results(x, served, tokens, k, objective.needs)
        value, grad = objective.spec.from_passes(results, **objective.kwargs)
        ctx.save_for_backward(x)
        ctx.grad, ctx.tau, ctx.dtype = grad, tau, z.dtype
        return value

    @staticmethod
    def backward(ctx, upstream):
        (x,) = ctx.saved_tensors
        dz = ctx.grad.materialize(x, None) * (upstream[:, None] / ctx.tau)
        return dz.to(ctx.dtype), None, None, None, None, None


def served_baseline(objective: ObjectiveOp):
    """f(student_logits, served_answer, tokens, k, temperature) for a served objective."""
    tokens_needed = Need.TOKENS in objective.needs
    return lambda s, served, y, k, tau: _ServedLoss.apply(s, objective, served,
                                                          y if tokens_needed else None, k, tau)


def logits_op(op: str):
    """The baseline of any op of the registry: f(student_logits, teacher, tokens, k,
    temperature), the teacher being its logits, or for a served op the answer."""
    objective = OPS[op]
    if objective is None:
        return LOGITS_OPS[op]
    return objective_baseline(objective) if objective.teacher_k is None else served_baseline(objective)


def materialized(case: Case, x):
    """(student logits, teacher) as the baseline takes them: in the fused form the logits a user
    computes before the loss (the teacher's only if used: every dense objective reads the
    teacher, the single-model ops do not); a served teacher is its answer."""
    if case.teacher_k is not None:
        teacher = x.served
    elif case.op in ("logsumexp", "token_logprobs"):
        teacher = None
    else:
        teacher = x.teacher if case.form == "logits" else linear_logits(x.teacher, x.teacher_weight)
    student = x.student if case.form == "logits" else linear_logits(x.student, x.student_weight)
    return student, teacher
