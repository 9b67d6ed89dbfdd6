"""``sampled``: the sampled-token reward as a policy-gradient advantage (paper eq. 3).

    r = log q(y) - log p(y) (detached),   L = -r log p(y)
    dL/dx_v = -r (onehot(y)_v - p_v)             shift = r, sparse -r at y
Needs log q(y) only: a dense teacher's lse (a full pass) and one logit, or a served teacher's
answer at the sampled tokens.
"""
from .base import GradForm, Need, Objective, PassResults, log_softmax


class SampledToken(Objective):
    name = "sampled"
    summary = "-r log p(y) with the detached reward r = log q(y) - log p(y) (paper eq. 3)"
    base_needs = frozenset({Need.TEACHER_AT_TOKENS, Need.TOKENS})

    def reference(self, student, teacher, *, tokens=None, temperature=1.0, **_):
        at = lambda log_probs: log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        log_p_y = at(log_softmax(student, temperature))
        reward = (at(log_softmax(teacher.detach(), temperature)) - log_p_y).detach()
        return -reward * log_p_y

    def from_passes(self, r: PassResults):
        reward = r.teacher_logprob - r.student_logprob
        return -reward * r.student_logprob, GradForm(shift=reward, sparse_ids=r.tokens[:, None],
                                                     sparse_values=-reward[:, None])


OBJECTIVE = SampledToken()
