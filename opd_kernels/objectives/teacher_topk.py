"""``teacher_topk``: the forward KL over a served teacher's top-K plus one tail bin (TRL's
ServerDistillationTrainer with ``loss_add_tail``, verl's RFC 7856).

Over T = the teacher's K ids and the bin of every other id, with the top-K masses clamped below 1
as TRL does (log mass <= -1e-7, so both tails stay positive):
    q_tail = 1 - sum_{v in T} q_v,   p_tail = 1 - sum_{v in T} p_v = 1 - P
    L = sum_{v in T} q_v (log q_v - log p_v) + q_tail (log q_tail - log p_tail)
With Q = sum_T q_v and d log p_tail / dx_u = (p_u [u in T] - P p_u) / p_tail (0 where clamped):
    dL/dx_u = (Q - q_tail P / p_tail) p_u + (q_tail p_u / p_tail - q_u) [u in T]
so shift = Q - q_tail P / p_tail and a sparse part at T. Needs the student's lse and its logits
at T; the teacher only as served.
"""
import torch

from .base import GradForm, Need, Objective, PassResults, log_softmax, topk_ids

# TRL's clamp of the top-K log mass (trl/experimental/server_distillation: _add_tail_bucket)
MAX_LOG_MASS = -1e-7


def log_tail(log_probs: torch.Tensor) -> tuple:
    """(log of the mass outside the ids, whether the clamp held it) from log-probs at the ids."""
    log_mass = torch.logsumexp(log_probs, -1)
    clamped = log_mass > MAX_LOG_MASS
    return torch.log(-torch.expm1(log_mass.clamp(max=MAX_LOG_MASS))), clamped


def with_tail(log_p_t: torch.Tensor, log_q_t: torch.Tensor):
    """The loss per row from both models' log-probs at T (the differentiable oracle's form)."""
    log_p_tail, _ = log_tail(log_p_t)
    log_q_tail, _ = log_tail(log_q_t)
    q_t = log_q_t.exp()
    top = torch.where(q_t > 0, q_t * (log_q_t - log_p_t), torch.zeros_like(q_t)).sum(-1)
    return top + log_q_tail.exp() * (log_q_tail - log_p_tail)


class TeacherTopKWithTail(Objective):
    name = "teacher_topk"
    summary = "KL(q || p) over a served teacher's top-K ids plus one tail bin (TRL, verl)"
    base_needs = frozenset({Need.TEACHER_TOPK})

    def reference(self, student, teacher, *, k=16, temperature=1.0, **_):
        """On dense logits: T = the teacher's top-k (k plays K), its log-probs as served."""
        teacher = teacher.detach()
        ids = topk_ids(teacher, k)
        return with_tail(log_softmax(student, temperature).gather(-1, ids),
                         log_softmax(teacher, temperature).gather(-1, ids))

    def from_passes(self, r: PassResults):
        log_p_t = r.student_at_teacher_ids - r.lse_s[:, None]
        log_q_t = r.teacher_topk_logprobs
        log_p_tail, p_clamped = log_tail(log_p_t)
        log_q_tail, _ = log_tail(log_q_t)
        p_t, q_t = log_p_t.exp(), log_q_t.exp()
        value = with_tail(log_p_t, log_q_t)
        # q_tail / p_tail, 0 where the student's top-K mass was clamped (the tail then constant)
        ratio = torch.where(p_clamped, torch.zeros_like(log_q_tail), (log_q_tail - log_p_tail).exp())
        shift = q_t.sum(-1) - ratio * p_t.sum(-1)
        return value, GradForm(shift=shift, sparse_ids=r.teacher_ids,
                               sparse_values=ratio[:, None] * p_t - q_t)


OBJECTIVE = TeacherTopKWithTail()
