"""``topk``: the reverse KL over the student's top-k, both renormalized there (paper eq. 5, its
default with k = 16).

    S = TopK(p, k) (not differentiated),  p̄, q̄ = p, q renormalized over S
    L = sum_{v in S} p̄_v (log p̄_v - log q̄_v)
    dL/dx_v = p̄_v (log p̄_v - log q̄_v - L) for v in S, 0 elsewhere   (sparse only)
Both lse cancel in the renormalization, so the teacher is needed at the k ids of S alone: the
fused-linear form does no teacher lm_head product, and the gradient has k non-zeros a row.
"""
import torch

from .base import GradForm, Need, Objective, PassResults, kl, topk_ids


def renormalized(student_at: torch.Tensor, teacher_at: torch.Tensor):
    """(log p̄, log q̄) over the support from both models' x at it."""
    return torch.log_softmax(student_at, -1), torch.log_softmax(teacher_at, -1)


class StudentTopK(Objective):
    name = "topk"
    summary = "KL(p̄ || q̄) over the student's top-k, renormalized there (paper eq. 5)"
    base_needs = frozenset({Need.SUPPORT})

    def reference(self, student, teacher, *, k=16, temperature=1.0, **_):
        support = topk_ids(student.detach(), k)
        at = lambda z: z.gather(-1, support) / temperature
        return kl(*renormalized(at(student), at(teacher.detach())))

    def from_passes(self, r: PassResults):
        log_p_bar, log_q_bar = renormalized(r.student_at_support, r.teacher_at_support)
        p_bar = log_p_bar.exp()
        value = (p_bar * (log_p_bar - log_q_bar)).sum(-1)
        grad = p_bar * (log_p_bar - log_q_bar - value[:, None])
        return value, GradForm(sparse_ids=r.support, sparse_values=grad)


OBJECTIVE = StudentTopK()
