"""The math of opd-math.md in plain PyTorch: the readable statement and the test oracle.

Every function works in the dtype it is given (pass float64 for an oracle), over the last axis
(the vocabulary), and is differentiable where the spec defines a gradient. Nothing here is
chunked or fused: it materializes softmaxes freely, for clarity. The objectives' own math lives
in opd_kernels/objectives (one module each); ``opd_loss`` here runs any of them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import objectives
from .objectives.base import Need, PassResults, kl, log_softmax, plogp_terms, topk_ids
from .stats import TopKStats

__all__ = ["log_softmax", "logsumexp", "token_logprobs", "entropy", "reverse_kl", "forward_kl",
           "topk_ids", "topk_overlap", "softcapped", "linear_logits", "pass_results", "reduce",
           "opd_loss"]


def softcapped(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """Final-logit soft-capping (Gemma 2): c tanh(z / c); ``None`` leaves z as it is."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def logsumexp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """lse(z / tau)."""
    return torch.logsumexp(logits / temperature, dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(y) = z_y / tau - lse(z / tau)."""
    return log_softmax(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -plogp_terms(log_p, torch.zeros_like(log_p)).sum(-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H(p) = -sum_v p_v log p_v."""
    return _entropy(log_softmax(logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) per position; +inf where q_v = 0 < p_v. The teacher gets no gradient."""
    return kl(log_softmax(student_logits, temperature), log_softmax(teacher_logits.detach(), temperature))


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(q || p) per position; +inf where p_v = 0 < q_v."""
    return kl(log_softmax(teacher_logits.detach(), temperature), log_softmax(student_logits, temperature))


@torch.no_grad()
def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 16,
                 temperature: float = 1.0, tokens: Optional[torch.Tensor] = None) -> TopKStats:
    """The top-k shared-mass statistics per position (no mask: every position counted), with
    the full reverse KL and, given ``tokens``, both models' log-probs of them."""
    support = topk_ids(student_logits, k)                                    # S
    in_teacher_topk = torch.zeros_like(teacher_logits, dtype=torch.bool).scatter_(
        -1, topk_ids(teacher_logits, k), True)                               # T
    shared = in_teacher_topk.gather(-1, support)                             # S ∩ T, as a mask on S
    n_shared = shared.sum(-1)
    log_p = log_softmax(student_logits, temperature)
    log_q = log_softmax(teacher_logits, temperature)
    log_p_s, log_q_s = log_p.gather(-1, support), log_q.gather(-1, support)
    zero = torch.zeros_like(log_p_s)
    student_mass = torch.where(shared, log_p_s.exp(), zero).sum(-1)
    teacher_mass = torch.where(shared, log_q_s.exp(), zero).sum(-1)
    # Renormalized over S ∩ T: log p̄ = log p - log m_p, log q̄ = log q - log m_q.
    log_p_bar = log_p_s - student_mass.log().unsqueeze(-1)
    log_q_bar = log_q_s - teacher_mass.log().unsqueeze(-1)
    terms = torch.where(shared, -plogp_terms(log_p_bar, log_q_bar), zero).sum(-1)  # 0 where p̄ = 0
    advantage = torch.where(n_shared > 0, terms / n_shared.clamp(min=1),
                            torch.full_like(terms, float("nan")))
    h_p, h_q = _entropy(log_p), _entropy(log_q)
    at = lambda lp: None if tokens is None else lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return TopKStats(overlap=n_shared.to(log_p.dtype) / k, student_mass=student_mass,
                     teacher_mass=teacher_mass, overlap_advantage=advantage,
                     student_entropy=h_p, teacher_entropy=h_q, entropy_gap=(h_q - h_p).abs(),
                     reverse_kl=kl(log_p, log_q), student_logprob=at(log_p),
                     teacher_logprob=at(log_q))


def pass_results(student_logits: torch.Tensor, teacher_logits: torch.Tensor, needs: frozenset,
                 *, tokens: Optional[torch.Tensor] = None, k: int = 16, temperature: float = 1.0,
                 **params) -> PassResults:
    """Every per-row quantity of objectives.base.PassResults that ``needs`` asks for, from full
    [N, V] logits (no gradient): what a backend's passes produce, stated plainly. ``params``: the
    objective's parameters (the mixture pass reads ``beta``)."""
    with torch.no_grad():
        x_s, x_t = student_logits / temperature, teacher_logits / temperature
        log_p, log_q = torch.log_softmax(x_s, -1), torch.log_softmax(x_t, -1)
        r = PassResults(lse_s=torch.logsumexp(x_s, -1), tokens=tokens)
        if tokens is not None:
            at = lambda lp: lp.gather(-1, tokens[:, None]).squeeze(-1)
            r.student_logprob, r.teacher_logprob = at(log_p), at(log_q)
        if Need.TEACHER_FULL in needs:
            r.lse_t = torch.logsumexp(x_t, -1)
            r.reverse_kl, r.forward_kl = kl(log_p, log_q), kl(log_q, log_p)
        if Need.SUPPORT in needs:
            r.support = topk_ids(x_s, k)
            r.student_at_support, r.teacher_at_support = x_s.gather(-1, r.support), x_t.gather(-1, r.support)
        if Need.MIXTURE in needs:
            beta = params["beta"]
            log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
            r.mixture_student, r.mixture_teacher = kl(log_p, log_m), kl(log_q, log_m)
    return r


def reduce(per_position: torch.Tensor, mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """'mean' over counted positions (0 when none are), 'sum', or 'none' (uncounted ones 0)."""
    if mask is not None:
        per_position = torch.where(mask, per_position, torch.zeros_like(per_position))
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    count = per_position.numel() if mask is None else mask.sum()
    return total / torch.clamp(torch.as_tensor(count, device=total.device), min=1)


def opd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, objective="topk",
             tokens: Optional[torch.Tensor] = None, k: int = 16, mask: Optional[torch.Tensor] = None,
             temperature: float = 1.0, reduction: str = "mean", student_softcap=None,
             teacher_softcap=None, **params) -> torch.Tensor:
    """Any objective (a name or an Objective), reduced over the positions where ``mask`` is True.

    Positions that are not counted are left out before any math, so they add neither a value
    nor a gradient (nor a NaN from 0 * inf). Soft-capping applies before the temperature.
    """
    objective = objectives.get(objective)
    params = objective.check_params(params)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    student = softcapped(student_logits, student_softcap).reshape(-1, vocab)
    teacher = softcapped(teacher_logits, teacher_softcap).reshape(-1, vocab)
    rows = torch.ones(student.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1)
    rows = rows.to(student.device)
    ids = None if tokens is None else tokens.reshape(-1)[rows]
    counted = objective.reference(student[rows], teacher[rows], tokens=ids, k=k,
                                  temperature=temperature, **params)
    per_position = counted.new_zeros(rows.shape).index_put((rows,), counted).reshape(lead)
    return reduce(per_position, mask, reduction)


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: Optional[int] = None,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """z = h W^T (+ b) over the first ``vocab_size`` rows of W (the materialized logits)."""
    z = hidden @ weight[:vocab_size].T
    return z if bias is None else z + bias[:vocab_size]
