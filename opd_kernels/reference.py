"""The math of opd-math.md in plain PyTorch: the readable statement and the test oracle.

Every function works in the dtype it is given (pass float64 for an oracle), over the last axis
(the vocabulary), and is differentiable where the spec defines a gradient. Nothing here is
chunked or fused: it materializes softmaxes freely, for clarity.
"""
from __future__ import annotations

from typing import Optional

import torch

from .stats import TopKStats

OBJECTIVES = ("full", "sampled", "topk")


def log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits / temperature, dim=-1)


def logsumexp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """lse(z / tau)."""
    return torch.logsumexp(logits / temperature, dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(y) = z_y / tau - lse(z / tau)."""
    return log_softmax(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _plogp_terms(log_p: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """p * (log p - other) with the term 0 where p = 0 (gradient-safe: no 0 * inf anywhere)."""
    p = log_p.exp()
    return p * torch.where(p > 0, log_p - other, torch.zeros_like(log_p))


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H(p) = -sum_v p_v log p_v."""
    return _entropy(log_softmax(logits, temperature))


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -_plogp_terms(log_p, torch.zeros_like(log_p)).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) per position; +inf where q_v = 0 < p_v. The teacher gets no gradient."""
    log_p = log_softmax(student_logits, temperature)
    log_q = log_softmax(teacher_logits.detach(), temperature)
    return _plogp_terms(log_p, log_q).sum(-1)


full_loss = reverse_kl


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the k largest logits, largest first, ties going to the lower token id.

    Equal to ``torch.sort(logits, descending=True, stable=True).indices[..., :k]``, in O(V):
    torch.topk finds the k-th value; every id above it is in, and of the ids equal to it the
    lowest ones fill the remaining places (torch.topk alone breaks ties arbitrarily).
    """
    top = torch.topk(logits, k, dim=-1)
    kth = top.values[..., -1:]
    if bool(((logits >= kth).sum(-1) == k).all()):
        ids = top.indices.sort(dim=-1).values  # no tie straddles the k-th place: topk's set is it
    else:
        above, at_kth = logits > kth, logits == kth
        places_left = k - above.sum(-1, keepdim=True)
        chosen = above | (at_kth & (at_kth.cumsum(-1) <= places_left))
        ids = chosen.nonzero()[:, -1].reshape(*logits.shape[:-1], k)  # ascending ids, k a row
    order = torch.sort(logits.gather(-1, ids), dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order)


@torch.no_grad()
def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 16,
                 temperature: float = 1.0) -> TopKStats:
    """The top-k shared-mass statistics per position (no mask: every position counted)."""
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
    terms = torch.where(shared, -_plogp_terms(log_p_bar, log_q_bar), zero).sum(-1)  # 0 where p̄ = 0
    advantage = torch.where(n_shared > 0, terms / n_shared.clamp(min=1),
                            torch.full_like(terms, float("nan")))
    h_p, h_q = _entropy(log_p), _entropy(log_q)
    return TopKStats(overlap=n_shared.to(log_p.dtype) / k, student_mass=student_mass,
                     teacher_mass=teacher_mass, overlap_advantage=advantage,
                     student_entropy=h_p, teacher_entropy=h_q, entropy_gap=(h_q - h_p).abs())


def sampled_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """-r log p(y) with the detached reward r = log q(y) - log p(y) (eq. 3, importance ratio 1)."""
    log_p_y = token_logprobs(student_logits, tokens, temperature)
    reward = (token_logprobs(teacher_logits.detach(), tokens, temperature) - log_p_y).detach()
    return -reward * log_p_y


def topk_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 16,
              temperature: float = 1.0) -> torch.Tensor:
    """KL(p̄ || q̄) over S = TopK(p, k), both renormalized over S (eq. 5); S is not differentiated."""
    support = topk_ids(student_logits.detach(), k)
    return renormalized_kl(student_logits.gather(-1, support), teacher_logits.gather(-1, support),
                           temperature)


def renormalized_kl(student_at_support: torch.Tensor, teacher_at_support: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """KL(p̄ || q̄) from the logits at the support only: the full-vocabulary lse of either model
    cancels in the renormalization, so the teacher is needed at these ids and nowhere else."""
    log_p_bar = torch.log_softmax(student_at_support / temperature, dim=-1)
    log_q_bar = torch.log_softmax(teacher_at_support.detach() / temperature, dim=-1)
    return _plogp_terms(log_p_bar, log_q_bar).sum(-1)


def per_position_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, objective: str,
                      tokens: Optional[torch.Tensor] = None, k: int = 16,
                      temperature: float = 1.0) -> torch.Tensor:
    if objective == "full":
        return full_loss(student_logits, teacher_logits, temperature)
    if objective == "sampled":
        return sampled_loss(student_logits, teacher_logits, tokens, temperature)
    if objective == "topk":
        return topk_loss(student_logits, teacher_logits, k, temperature)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


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


def opd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, objective: str = "topk",
             tokens: Optional[torch.Tensor] = None, k: int = 16, mask: Optional[torch.Tensor] = None,
             temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """One of the three OPD objectives, reduced over the positions where ``mask`` is True.

    Positions that are not counted are left out before any math, so they add neither a value
    nor a gradient (nor a NaN from 0 * inf).
    """
    lead = student_logits.shape[:-1]
    if mask is None:
        return reduce(per_position_loss(student_logits, teacher_logits, objective, tokens, k,
                                        temperature), None, reduction)
    rows = mask.reshape(-1)
    vocab = student_logits.shape[-1]
    counted = per_position_loss(student_logits.reshape(-1, vocab)[rows],
                                teacher_logits.reshape(-1, vocab)[rows], objective,
                                None if tokens is None else tokens.reshape(-1)[rows], k, temperature)
    per_position = counted.new_zeros(rows.shape).index_put((rows,), counted).reshape(lead)
    return reduce(per_position, mask, reduction)


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: Optional[int] = None) -> torch.Tensor:
    """z = h W^T over the first ``vocab_size`` rows of W (the materialized logits)."""
    return hidden @ weight[:vocab_size].T
