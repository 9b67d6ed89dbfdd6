"""``full``: the reverse KL(p || q) over the whole vocabulary (paper eq. 4).

    L = sum_v p_v (log p_v - log q_v)
    dL/dx_v = p_v (log p_v - log q_v - L)        shift = -L, reverse = 1
Needs both models' full passes (one online read gives lse_s, lse_t and L).
"""
from .base import Objective, PassResults, RowGradForm, kl, log_softmax


REVERSE_KL_FORM = RowGradForm(terms=(("reverse_kl", -1.0),), reverse=1.0)


class ReverseKL(Objective):
    name = "full"
    summary = "KL(p || q) over the whole vocabulary (paper eq. 4)"

    def reference(self, student, teacher, *, temperature=1.0, **_):
        return kl(log_softmax(student, temperature), log_softmax(teacher.detach(), temperature))

    def from_passes(self, r: PassResults):
        return r.reverse_kl, self.row_grad_form({}).at(r)

    def row_grad_form(self, params):
        return REVERSE_KL_FORM


OBJECTIVE = ReverseKL()
