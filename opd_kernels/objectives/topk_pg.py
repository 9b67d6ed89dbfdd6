"""``topk_pg``: the paper code's policy-gradient form of the top-k objective (thunlp/OPD,
``compute_distillation_reward``).

    S = TopK(p, k),  w = p̄ on S (detached),  r_v = log q_v - log p_v (not renormalized, detached)
    L = -sum_{v in S} w_v r_v log p_v
    dL/dx_u = -w_u r_u [u in S] + (sum_{v in S} w_v r_v) p_u     shift = sum w r, sparse -w r
Unlike eq. 5 the rewards use the full normalizers, so it needs the teacher's lse (a full pass),
and its gradient is dense through log p's lse.
"""
import torch

from .base import GradForm, Need, Objective, PassResults, log_softmax, topk_ids


class TopKPolicyGradient(Objective):
    name = "topk_pg"
    summary = "-sum_S p̄ (log q - log p) log p over the student's top-k, detached weights (paper code)"
    base_needs = frozenset({Need.SUPPORT, Need.TEACHER_FULL})

    def reference(self, student, teacher, *, k=16, temperature=1.0, **_):
        support = topk_ids(student.detach(), k)
        log_p = log_softmax(student, temperature).gather(-1, support)
        log_q = log_softmax(teacher.detach(), temperature).gather(-1, support)
        weight = torch.softmax(student.detach().gather(-1, support) / temperature, -1)
        return -(weight * (log_q - log_p).detach() * log_p).sum(-1)

    def from_passes(self, r: PassResults):
        log_p = r.student_at_support - r.lse_s[:, None]
        log_q = r.teacher_at_support - r.lse_t[:, None]
        weighted_reward = torch.softmax(r.student_at_support, -1) * (log_q - log_p)
        value = -(weighted_reward * log_p).sum(-1)
        return value, GradForm(shift=weighted_reward.sum(-1), sparse_ids=r.support,
                               sparse_values=-weighted_reward)


OBJECTIVE = TopKPolicyGradient()
