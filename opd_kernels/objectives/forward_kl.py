"""``forward_kl``: KL(q || p), the teacher-weighted (mode-covering) direction.

    L = sum_v q_v (log q_v - log p_v)
    dL/dx_v = p_v - q_v                           shift = 1, forward = -1
One online read: lse_s, lse_t and sum_v q_v (x^t_v - x^s_v), centered on the running maxima as
for the reverse KL (kernels/online_softmax.py).
"""
from .base import Objective, PassResults, RowGradForm, kl, log_softmax


FORWARD_KL_FORM = RowGradForm(constant=1.0, forward=-1.0)


class ForwardKL(Objective):
    name = "forward_kl"
    summary = "KL(q || p) over the whole vocabulary"

    def reference(self, student, teacher, *, temperature=1.0, **_):
        return kl(log_softmax(teacher.detach(), temperature), log_softmax(student, temperature))

    def from_passes(self, r: PassResults):
        return r.forward_kl, self.row_grad_form({}).at(r)

    def row_grad_form(self, params):
        return FORWARD_KL_FORM


OBJECTIVE = ForwardKL()
