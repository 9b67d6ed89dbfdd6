"""``forward_kl``: KL(q || p), the teacher-weighted (mode-covering) direction.

    L = sum_v q_v (log q_v - log p_v)
    dL/dx_v = p_v - q_v                           shift = 1, forward = -1
One online read: lse_s, lse_t and sum_v q_v (x^t_v - x^s_v), centered on the running maxima as
for the reverse KL (kernels/online_softmax.py).
"""
from .base import GradForm, Objective, PassResults, kl, log_softmax


class ForwardKL(Objective):
    name = "forward_kl"
    summary = "KL(q || p) over the whole vocabulary"

    def reference(self, student, teacher, *, temperature=1.0, **_):
        return kl(log_softmax(teacher.detach(), temperature), log_softmax(student, temperature))

    def from_passes(self, r: PassResults):
        return r.forward_kl, GradForm(shift=r.forward_kl.new_ones(r.forward_kl.shape), forward=-1.0)


OBJECTIVE = ForwardKL()
