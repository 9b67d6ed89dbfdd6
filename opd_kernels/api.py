"""The public functions: check the arguments, flatten the positions to rows, call the backend that
``backend`` picks (opd_kernels._dispatch), and reduce or reshape the per-row results.

Conventions shared by every function:
- logits are [..., V] (or hidden states [..., H] with a weight [V, H]); the leading dims are the
  positions. ``mask`` (bool, the positions' shape, True = counted) leaves positions out entirely:
  they add no value and no gradient, and their statistics are NaN.
- ``reduction``: "mean" over counted positions (0 when none are), "sum", or "none" (per
  position, uncounted positions 0). Reductions happen here, in PyTorch, from per-position values,
  so any upstream gradient, per-position weights included, reaches the kernels.
- Values come back in fp32 (fp64 for fp64 input on the PyTorch path). Only the student gets a
  gradient; the teacher is treated as constant.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate as check
from ._dispatch import resolve
from .reference import reduce
from .stats import TopKStats


def _rows(t: Optional[torch.Tensor], width: Optional[int] = None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.reshape(-1) if width is None else t.reshape(-1, width)


def _shaped_stats(stats: TopKStats, lead: torch.Size, mask: Optional[torch.Tensor]) -> TopKStats:
    stats = stats.map(lambda t: t.reshape(lead))
    stats.mask = mask
    return stats


def _loss_arguments(lead, vocab, device, mask, objective, tokens, temperature, reduction):
    """The checks every loss shares; returns the mask, the tokens as int64 and the temperature."""
    mask = check.mask(mask, lead, device)
    check.objective(objective, tokens is not None)
    if tokens is not None:
        tokens = check.tokens(tokens, lead, vocab, device, mask)
    check.choice("reduction", reduction, check.REDUCTIONS)
    return mask, tokens, check.temperature(temperature)


# ---- logits form ---------------------------------------------------------------------------------

def logsumexp(logits: torch.Tensor, *, temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """lse(logits / temperature) over the last axis, in fp32, differentiable."""
    check.logits("logits", logits)
    tau = check.temperature(temperature)
    ops = resolve(check.choice("backend", backend, check.BACKENDS), "logits", logits)
    return ops.logsumexp(_rows(logits, logits.shape[-1]), tau).reshape(logits.shape[:-1])


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                   backend: str = "auto") -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens`` (one id a position), differentiable."""
    check.logits("logits", logits)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    tokens = check.tokens(tokens, lead, vocab, logits.device, None)
    tau = check.temperature(temperature)
    ops = resolve(check.choice("backend", backend, check.BACKENDS), "logits", logits)
    return ops.token_logprobs(_rows(logits, vocab), _rows(tokens), tau).reshape(lead)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
               reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """KL(p || q) with p = softmax(student / tau), q = softmax(teacher / tau); gradient to the
    student only. +inf where the teacher has a -inf logit at a token the student gives mass."""
    check.logits_pair(student_logits, teacher_logits)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    mask = check.mask(mask, lead, student_logits.device)
    tau = check.temperature(temperature)
    check.choice("reduction", reduction, check.REDUCTIONS)
    ops = resolve(check.choice("backend", backend, check.BACKENDS), "logits", student_logits, teacher_logits)
    per_row = ops.reverse_kl(_rows(student_logits, vocab), _rows(teacher_logits, vocab), _rows(mask), tau)
    return reduce(per_row.reshape(lead), mask, reduction)


def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, k: int = 16,
                 mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                 backend: str = "auto") -> TopKStats:
    """The top-k shared-mass statistics per position (see TopKStats); no gradient."""
    check.logits_pair(student_logits, teacher_logits)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    mask = check.mask(mask, lead, student_logits.device)
    tau = check.temperature(temperature)
    ops = resolve(check.choice("backend", backend, check.BACKENDS), "logits", student_logits, teacher_logits)
    k = check.k(k, vocab, getattr(ops, "MAX_K", vocab))
    stats = ops.topk_overlap(_rows(student_logits, vocab), _rows(teacher_logits, vocab), k, _rows(mask), tau)
    return _shaped_stats(stats, lead, mask)


def opd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, objective: str = "topk",
             tokens: Optional[torch.Tensor] = None, k: int = 16, mask: Optional[torch.Tensor] = None,
             temperature: float = 1.0, reduction: str = "mean", return_stats: bool = False,
             backend: str = "auto"):
    """One of the three OPD objectives of opd-math.md on student rollouts.

    "full": KL(p || q) over the whole vocabulary. "sampled": -r log p(y) with the detached reward
    r = log q(y) - log p(y) at the sampled ``tokens``. "topk": KL(p̄ || q̄) over the student's
    top-k ids, both renormalized there (the paper's default, k = 16).
    With ``return_stats=True`` returns ``(loss, TopKStats)``, the statistics from the same pass.
    """
    check.logits_pair(student_logits, teacher_logits)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    mask, tokens, tau = _loss_arguments(lead, vocab, student_logits.device, mask, objective, tokens,
                                        temperature, reduction)
    ops = resolve(check.choice("backend", backend, check.BACKENDS), "logits", student_logits, teacher_logits)
    if objective == "topk" or return_stats:  # k means nothing to the other objectives
        k = check.k(k, vocab, getattr(ops, "MAX_K", vocab))
    per_row, stats = ops.opd_loss(_rows(student_logits, vocab), _rows(teacher_logits, vocab), objective,
                                  _rows(tokens), k, _rows(mask), tau, bool(return_stats))
    loss = reduce(per_row.reshape(lead), mask, reduction)
    return (loss, _shaped_stats(stats, lead, mask)) if return_stats else loss


# ---- fused-linear form ---------------------------------------------------------------------------

def _check_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, vocab_size) -> int:
    check.linear("student_hidden", student_hidden, "student_weight", student_weight)
    check.linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden positions {tuple(teacher_hidden.shape[:-1])} != "
                         f"student_hidden positions {tuple(student_hidden.shape[:-1])}")
    check.same_device(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    return check.vocab_size(vocab_size, student_weight.shape[0], teacher_weight.shape[0])


def fused_linear_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, *, temperature: float = 1.0,
                           backend: str = "auto") -> torch.Tensor:
    """lse(hidden @ weight.T / temperature) without materializing the logits."""
    check.linear("hidden", hidden, "weight", weight)
    tau = check.temperature(temperature)
    ops = resolve(check.choice("backend", backend, check.BACKENDS), "fused_linear", hidden, weight)
    lead = hidden.shape[:-1]
    return ops.fused_linear_logsumexp(_rows(hidden, hidden.shape[-1]), weight, tau,
                                      weight.shape[0]).reshape(lead)


def fused_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                                temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature) at ``tokens``, logits never materialized."""
    check.linear("hidden", hidden, "weight", weight)
    lead = hidden.shape[:-1]
    tokens = check.tokens(tokens, lead, weight.shape[0], hidden.device, None)
    tau = check.temperature(temperature)
    ops = resolve(check.choice("backend", backend, check.BACKENDS), "fused_linear", hidden, weight)
    return ops.fused_linear_token_logprobs(_rows(hidden, hidden.shape[-1]), weight, _rows(tokens), tau,
                                           weight.shape[0]).reshape(lead)


def fused_linear_reverse_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                            teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                            mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                            reduction: str = "mean", vocab_size: Optional[int] = None,
                            weight_grad_dtype: torch.dtype = torch.float32,
                            grad_in_forward: bool = True, backend: str = "auto") -> torch.Tensor:
    """reverse_kl on the logits h W^T of both models, which are never materialized: the "full"
    objective of :func:`fused_linear_opd_loss`, whose docstring explains the options."""
    return fused_linear_opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                 objective="full", mask=mask, temperature=temperature,
                                 reduction=reduction, vocab_size=vocab_size,
                                 weight_grad_dtype=weight_grad_dtype,
                                 grad_in_forward=grad_in_forward, backend=backend)


def fused_linear_topk_overlap(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                              k: int = 16, mask: Optional[torch.Tensor] = None,
                              temperature: float = 1.0, vocab_size: Optional[int] = None,
                              backend: str = "auto") -> TopKStats:
    """topk_overlap on the logits h W^T of both models, which are never materialized."""
    vocab = _check_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, vocab_size)
    lead = student_hidden.shape[:-1]
    mask = check.mask(mask, lead, student_hidden.device)
    tau = check.temperature(temperature)
    ops = resolve(check.choice("backend", backend, check.BACKENDS), "fused_linear",
                  student_hidden, student_weight, teacher_hidden, teacher_weight)
    k = check.k(k, vocab, getattr(ops, "MAX_K", vocab))
    stats = ops.fused_linear_topk_overlap(
        _rows(student_hidden, student_hidden.shape[-1]), student_weight,
        _rows(teacher_hidden, teacher_hidden.shape[-1]), teacher_weight, k, _rows(mask), tau, vocab)
    return _shaped_stats(stats, lead, mask)


def fused_linear_opd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                          teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                          objective: str = "topk", tokens: Optional[torch.Tensor] = None, k: int = 16,
                          mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          reduction: str = "mean", return_stats: bool = False,
                          vocab_size: Optional[int] = None,
                          weight_grad_dtype: torch.dtype = torch.float32,
                          grad_in_forward: bool = True, backend: str = "auto"):
    """opd_loss on hidden states and lm_head weights: logits exist only as on-chip tiles.

    Each objective does only the work it needs: "topk" evaluates the teacher at the student's k
    ids alone (no teacher lm_head product) unless ``return_stats`` asks for the teacher's own
    top-k; "sampled" needs the teacher's lse and one logit; "full" both full products.
    Gradients reach ``student_hidden`` and ``student_weight`` (where they require grad).

    ``vocab_size=K`` compares the first K ids when the two lm_heads are padded differently.
    ``weight_grad_dtype``: the dtype the student weight's gradient is summed in (fp32 default).
    ``grad_in_forward``: with reduction "mean" or "sum" the loss is a scalar, so its gradient is
    known up to one factor during the forward; a backend that can (Triton) then computes the
    student's gradients in the forward pass over a bounded scratch instead of recomputing the
    logits in the backward (fewer FLOPs; the weight gradient is held until the backward).
    False forces recomputation. No effect with reduction "none" or on the PyTorch path.
    """
    vocab = _check_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, vocab_size)
    lead = student_hidden.shape[:-1]
    mask, tokens, tau = _loss_arguments(lead, vocab, student_hidden.device, mask, objective, tokens,
                                        temperature, reduction)
    weight_grad_dtype = check.weight_grad_dtype(weight_grad_dtype)
    ops = resolve(check.choice("backend", backend, check.BACKENDS), "fused_linear",
                  student_hidden, student_weight, teacher_hidden, teacher_weight)
    if objective == "topk" or return_stats:  # k means nothing to the other objectives
        k = check.k(k, vocab, getattr(ops, "MAX_K", vocab))
    args = (_rows(student_hidden, student_hidden.shape[-1]), student_weight,
            _rows(teacher_hidden, teacher_hidden.shape[-1]), teacher_weight, objective, _rows(tokens),
            k, _rows(mask), tau, bool(return_stats), vocab, weight_grad_dtype)
    if check.flag("grad_in_forward", grad_in_forward) and reduction != "none" \
            and hasattr(ops, "fused_linear_opd_loss_reduced"):
        loss, stats = ops.fused_linear_opd_loss_reduced(*args, reduction)
    else:
        per_row, stats = ops.fused_linear_opd_loss(*args)
        loss = reduce(per_row.reshape(lead), mask, reduction)
    return (loss, _shaped_stats(stats, lead, mask)) if return_stats else loss
