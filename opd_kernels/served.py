"""A served (sparse) teacher: what an inference server returns instead of logits, its checks, and
what it contributes to the objectives' per-row quantities and to the statistics
(opd-math.md, "A sparse (served) teacher").

At each position the server gives the teacher's own top-K ids with their log-probs (vLLM
``prompt_logprobs=K``, SGLang ``top_logprobs_num``), optionally the log-prob of the sampled token,
and optionally (a second request) its log-probs at ids the student chose. The log-probs are used
as served: serve them at the loss temperature. Nothing of size V is involved on the teacher's
side; every backend computes the student's side (its lse, top-k, logits at given ids) and then
the functions here, in plain PyTorch over [N, K].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .objectives import Need, PassResults
from .objectives.teacher_topk import log_tail
from .stats import TopKStats

# A served top-K mass may exceed 1 by rounding (fp32 log-probs of a bf16 model): tolerated up to this.
MASS_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ServedTeacher:
    """The served answer, positions flattened to rows: ``ids`` [N, K] int64 and ``logprobs``
    [N, K] fp32 (the teacher's top-K), ``token_logprob`` [N] (log q of each sampled token) and
    ``logprobs_at`` [N, k] (log q at the student's top-k ids, in ``student_topk_ids``' order)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    token_logprob: Optional[torch.Tensor] = None
    logprobs_at: Optional[torch.Tensor] = None

    @property
    def quantities(self) -> frozenset:
        """The Needs this answer meets (the student's side is computed by the backend)."""
        given = {Need.TEACHER_TOPK, Need.TOKENS}
        if self.token_logprob is not None:
            given.add(Need.TEACHER_AT_TOKENS)
        if self.logprobs_at is not None:
            given.add(Need.SUPPORT)
        return frozenset(given)

    @property
    def tensors(self) -> tuple:
        return tuple(t for t in (self.ids, self.logprobs, self.token_logprob, self.logprobs_at)
                     if t is not None)


# What to pass for each quantity a served teacher can lack (the error names the argument).
MISSING = {
    Need.TEACHER_AT_TOKENS: "teacher_token_logprob (the teacher's log-prob of each sampled token)",
    Need.SUPPORT: "teacher_logprobs_at (the teacher's log-probs at the student's top-k ids, in "
                  "the order student_topk_ids returns them)",
    Need.TEACHER_FULL: None,
    Need.MIXTURE: None,
}


def complete(r: PassResults, teacher: ServedTeacher, student_at_teacher_ids: Optional[torch.Tensor]):
    """Fill the teacher's side of ``r`` from the served answer (in place)."""
    r.teacher_ids, r.teacher_topk_logprobs = teacher.ids, teacher.logprobs.float()
    r.student_at_teacher_ids = student_at_teacher_ids
    if teacher.token_logprob is not None:
        r.teacher_logprob = teacher.token_logprob.float()
    if teacher.logprobs_at is not None:
        r.teacher_at_support = teacher.logprobs_at.float()  # log q: x_t up to lse_t, which cancels
    return r


def ordered_topk(teacher: ServedTeacher, k: int) -> torch.Tensor:
    """The teacher's top-k ids from its top-K, largest log-prob first, ties to the lower id (the
    library's rule, whatever order the server used)."""
    by_id = torch.sort(teacher.ids, dim=-1, stable=True)
    values = teacher.logprobs.gather(-1, by_id.indices)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return by_id.values.gather(-1, order)[:, :k]


def statistics(teacher: ServedTeacher, k: int, support: torch.Tensor, log_p_support: torch.Tensor,
               student_entropy: torch.Tensor, student_logprob: Optional[torch.Tensor],
               mask: Optional[torch.Tensor]) -> TopKStats:
    """The top-k statistics from the student's top-k (ids ``support`` and their log p) and the
    served answer (k <= K): the overlap and both masses on S ∩ T exactly (q on S ∩ T ⊆ T is
    served), the teacher's entropy as a lower bound (the top-K terms plus the tail as one bin;
    spreading the tail can only raise it), so ``teacher_entropy_is_bound`` is set."""
    q_by_id = teacher.logprobs.float()
    # log q at each id of S, looked up in the served list (-inf where absent: never used, as
    # S ∩ T lies inside the list)
    in_list = support[:, :, None] == teacher.ids[:, None, :]            # [i in S, j in the K list]
    log_q = torch.where(in_list, q_by_id[:, None, :], -torch.inf).amax(-1)
    q_top = q_by_id.exp()
    log_q_tail, _ = log_tail(q_by_id)
    h_q = -(torch.where(q_top > 0, q_top * q_by_id, torch.zeros_like(q_top)).sum(-1)
            + log_q_tail.exp() * log_q_tail)
    return TopKStats.from_support(k, support, ordered_topk(teacher, k), log_p_support, log_q,
                                  student_entropy, h_q, mask, student_logprob=student_logprob,
                                  teacher_logprob=teacher.token_logprob,
                                  teacher_entropy_is_bound=True)
