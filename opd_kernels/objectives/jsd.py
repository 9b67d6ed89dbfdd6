"""``jsd``: the generalized Jensen-Shannon divergence with TRL's conventions (GKD,
``trl.trainer.gkd_trainer.GKDTrainer.generalized_jsd_loss``).

With m = beta q + (1 - beta) p and beta in [0, 1]:
    L = beta KL(q || m) + (1 - beta) KL(p || m)          for 0 < beta < 1
    L = KL(q || p) at beta = 0 (forward KL),  L = KL(p || q) at beta = 1 (reverse KL)
(the endpoints are special-cased exactly as TRL does; the mixture formula vanishes there).
Inside, with J_p = KL(p || m):
    dL/dx_v = (1 - beta) p_v (log p_v - log m_v - J_p)  shift = -(1 - beta) J_p, mixture = 1 - beta
since dm = (1 - beta) dp makes the log m terms of both halves sum to -(1 - beta) sum_u dp_u = 0,
leaving dL = (1 - beta) sum_u dp_u (log p_u - log m_u).
log m needs both final normalizers, so the mixture sums take a second pass after lse_s, lse_t.
"""
import math

import torch

from .base import Need, Objective, Param, PassResults, RowGradForm, kl, log_softmax
from .forward_kl import FORWARD_KL_FORM
from .full import REVERSE_KL_FORM


class GeneralizedJSD(Objective):
    name = "jsd"
    summary = "generalized JSD, beta KL(q || m) + (1 - beta) KL(p || m), TRL's conventions"
    params = {"beta": Param(0.5, 0.0, 1.0)}

    def needs(self, params):
        inner = 0.0 < params["beta"] < 1.0
        return self.base_needs | ({Need.MIXTURE} if inner else set())

    def reference(self, student, teacher, *, temperature=1.0, beta=0.5, **_):
        log_p = log_softmax(student, temperature)
        log_q = log_softmax(teacher.detach(), temperature)
        if beta == 0.0:
            return kl(log_q, log_p)
        if beta == 1.0:
            return kl(log_p, log_q)
        # Where p = q = 0 both terms are 0; keep logaddexp off (-inf, -inf), whose backward is
        # NaN (0 * NaN reaches the logits even though the value there is never used).
        both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
        safe = lambda t: torch.where(both_zero, torch.zeros_like(t), t)
        log_m = torch.logaddexp(safe(log_q) + math.log(beta), safe(log_p) + math.log1p(-beta))
        return beta * kl(log_q, log_m) + (1.0 - beta) * kl(log_p, log_m)

    def from_passes(self, r: PassResults, beta=0.5):
        if beta == 0.0:
            value = r.forward_kl
        elif beta == 1.0:
            value = r.reverse_kl
        else:
            value = beta * r.mixture_teacher + (1.0 - beta) * r.mixture_student
        return value, self.row_grad_form({"beta": beta}).at(r)

    def row_grad_form(self, params):
        beta = params["beta"]
        if beta in (0.0, 1.0):
            return FORWARD_KL_FORM if beta == 0.0 else REVERSE_KL_FORM
        return RowGradForm(terms=(("mixture_student", -(1.0 - beta)),), mixture=1.0 - beta, beta=beta)


OBJECTIVE = GeneralizedJSD()
