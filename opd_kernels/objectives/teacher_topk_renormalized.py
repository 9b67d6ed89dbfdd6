"""``teacher_topk_renormalized``: the forward KL over a served teacher's top-K, both models
renormalized there (TRL's ServerDistillationTrainer without the tail bin).

    p̄, q̄ = p, q renormalized over T,   L = sum_{v in T} q̄_v (log q̄_v - log p̄_v)
    dL/dx_v = p̄_v - q̄_v for v in T, 0 elsewhere             (sparse only)
Both normalizers cancel: the student is needed at the K ids alone, the teacher as served.
"""
import torch

from .base import GradForm, Need, Objective, PassResults, kl, log_softmax, topk_ids


class TeacherTopKRenormalized(Objective):
    name = "teacher_topk_renormalized"
    summary = "KL(q̄ || p̄) over a served teacher's top-K ids, both renormalized there"
    base_needs = frozenset({Need.TEACHER_TOPK})

    def reference(self, student, teacher, *, k=16, temperature=1.0, **_):
        """On dense logits: T = the teacher's top-k (k plays K)."""
        teacher = teacher.detach()
        ids = topk_ids(teacher, k)
        at = lambda z: torch.log_softmax(log_softmax(z, temperature).gather(-1, ids), -1)
        return kl(at(teacher), at(student))

    def from_passes(self, r: PassResults):
        log_p_bar = torch.log_softmax(r.student_at_teacher_ids, -1)
        log_q_bar = torch.log_softmax(r.teacher_topk_logprobs, -1)
        value = kl(log_q_bar, log_p_bar)
        return value, GradForm(sparse_ids=r.teacher_ids,
                               sparse_values=log_p_bar.exp() - log_q_bar.exp())


OBJECTIVE = TeacherTopKRenormalized()
