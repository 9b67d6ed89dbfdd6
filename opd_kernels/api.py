"""The public functions: check the arguments, flatten the positions to rows, hand the backend the
registry picks (opd_kernels.backends) one LossCall, and reduce or reshape its per-row results.

Conventions shared by every function:
- logits are [..., V] (or hidden states [..., H] with a weight [V, H]); the leading dims are the
  positions. ``mask`` (bool, the positions' shape, True = counted) leaves positions out entirely:
  they add no value and no gradient, and their statistics are NaN. Where ``tokens`` are given, a
  position whose id equals ``ignore_index`` (default -100, the trainers' label convention) is
  not counted either.
- ``objective``: a name from ``opd_kernels.objectives.names()`` or an Objective instance; its
  parameters (e.g. ``beta`` of "jsd") are keyword arguments.
- ``student_softcap`` / ``teacher_softcap``: final-logit soft-capping c tanh(z / c) of each model
  (Gemma 2: 30), applied before the temperature; ``student_bias`` / ``teacher_bias``: lm_head
  biases (fused-linear form).
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
from . import objectives
from .backends import LossCall, Model, resolve
from .objectives import Need
from .reference import reduce
from .stats import TopKStats

# What the statistics add to an objective's own needs: both models' full passes and the top-k.
_STATS_NEEDS = frozenset({Need.TEACHER_FULL, Need.SUPPORT})


def _rows(t: Optional[torch.Tensor], width: Optional[int] = None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.reshape(-1) if width is None else t.reshape(-1, width)


def _shaped_stats(stats: TopKStats, lead: torch.Size, mask: Optional[torch.Tensor]) -> TopKStats:
    stats = stats.map(lambda t: t.reshape(lead))
    stats.mask = mask
    return stats


def _counted_ids(tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Uncounted positions may hold any id (an ignore index): backends get 0 there instead."""
    return tokens if mask is None else torch.where(mask, tokens, torch.zeros_like(tokens))


def _logits_model(logits: torch.Tensor, softcap) -> Model:
    return Model(logits=_rows(logits, logits.shape[-1]), softcap=softcap)


def _linear_model(hidden, weight, bias, softcap) -> Model:
    return Model(hidden=_rows(hidden, hidden.shape[-1]), weight=weight, bias=bias, softcap=softcap)


def _run(form: str, student: Model, teacher: Model, lead, vocab: int, device, *, objective,
         objective_params: dict, tokens, k, mask, temperature, reduction, return_stats, ignore_index,
         backend, **options):
    """The checks every loss shares, the backend call, and the reduction."""
    objective = objectives.get(objective)
    params = objective.check_params(objective_params)
    needs = objective.needs(params)
    mask = check.mask(mask, lead, device)
    tau = check.temperature(temperature)
    check.choice("reduction", reduction, check.REDUCTIONS)
    return_stats = check.flag("return_stats", return_stats)
    if Need.TOKENS in needs and tokens is None:
        raise ValueError(f"objective={objective.name!r} needs tokens (the sampled token ids, one a "
                         f"position)")
    if tokens is not None:
        tokens, mask = check.tokens(tokens, lead, vocab, device, mask, check.ignore_index(ignore_index))
        tokens = _counted_ids(tokens, mask)
        needs = needs | {Need.TOKENS}
    if return_stats:
        needs = needs | _STATS_NEEDS
    if Need.SUPPORT in needs:  # k means nothing to the other objectives
        k = check.k(k, vocab)
    chosen = resolve(backend, form, [*student.tensors, *teacher.tensors], objective=objective,
                     needs=needs, k=k if Need.SUPPORT in needs else None)
    call = LossCall(student=student, teacher=teacher, objective=objective, params=params,
                    needs=needs, tokens=_rows(tokens), mask=_rows(mask), k=k, temperature=tau,
                    vocab_size=vocab, reduction=reduction, return_stats=return_stats, **options)
    result = chosen.loss(call)
    loss = result.values if result.reduced else reduce(result.values.reshape(lead), mask, reduction)
    return (loss, _shaped_stats(result.stats, lead, mask)) if return_stats else loss


def _statistics(form, student, teacher, lead, vocab, device, *, k, mask, temperature, tokens,
                ignore_index, backend, **options) -> TopKStats:
    mask = check.mask(mask, lead, device)
    tau = check.temperature(temperature)
    needs = _STATS_NEEDS
    if tokens is not None:
        tokens, mask = check.tokens(tokens, lead, vocab, device, mask, check.ignore_index(ignore_index))
        tokens = _counted_ids(tokens, mask)
        needs = needs | {Need.TOKENS}
    k = check.k(k, vocab)
    chosen = resolve(backend, form, [*student.tensors, *teacher.tensors], needs=needs, k=k)
    call = LossCall(student=student, teacher=teacher, objective=None, needs=needs,
                    tokens=_rows(tokens), mask=_rows(mask), k=k, temperature=tau, vocab_size=vocab,
                    return_stats=True, **options)
    return _shaped_stats(chosen.statistics(call), lead, mask)


# ---- logits form ---------------------------------------------------------------------------------

def logsumexp(logits: torch.Tensor, *, temperature: float = 1.0, softcap: Optional[float] = None,
              backend: str = "auto") -> torch.Tensor:
    """lse(logits / temperature) over the last axis, in fp32, differentiable."""
    check.logits("logits", logits)
    model = _logits_model(logits, check.softcap("softcap", softcap))
    tau = check.temperature(temperature)
    chosen = resolve(backend, "logits", [logits])
    return chosen.logsumexp(model, tau, logits.shape[-1]).reshape(logits.shape[:-1])


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                   softcap: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens`` (one id a position), differentiable."""
    check.logits("logits", logits)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    tokens, _ = check.tokens(tokens, lead, vocab, logits.device, None)
    model = _logits_model(logits, check.softcap("softcap", softcap))
    tau = check.temperature(temperature)
    chosen = resolve(backend, "logits", [logits])
    return chosen.token_logprobs(model, _rows(tokens), tau, vocab).reshape(lead)


def _logits_pair(student_logits, teacher_logits, student_softcap, teacher_softcap):
    check.logits_pair(student_logits, teacher_logits)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    student = _logits_model(student_logits, check.softcap("student_softcap", student_softcap))
    teacher = _logits_model(teacher_logits, check.softcap("teacher_softcap", teacher_softcap))
    return student, teacher, lead, vocab, student_logits.device


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
               reduction: str = "mean", student_softcap: Optional[float] = None,
               teacher_softcap: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """KL(p || q) with p = softmax(student / tau), q = softmax(teacher / tau); gradient to the
    student only. +inf where the teacher has a -inf logit at a token the student gives mass."""
    return opd_loss(student_logits, teacher_logits, objective="full", mask=mask,
                    temperature=temperature, reduction=reduction, student_softcap=student_softcap,
                    teacher_softcap=teacher_softcap, backend=backend)


def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, k: int = 16,
                 mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                 tokens: Optional[torch.Tensor] = None, ignore_index: Optional[int] = -100,
                 student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 backend: str = "auto") -> TopKStats:
    """The top-k shared-mass statistics per position (see TopKStats); no gradient. With
    ``tokens`` they carry both models' log-probs of them too."""
    student, teacher, lead, vocab, device = _logits_pair(student_logits, teacher_logits,
                                                         student_softcap, teacher_softcap)
    return _statistics("logits", student, teacher, lead, vocab, device, k=k, mask=mask,
                       temperature=temperature, tokens=tokens, ignore_index=ignore_index,
                       backend=backend)


def opd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, objective="topk",
             tokens: Optional[torch.Tensor] = None, k: int = 16, mask: Optional[torch.Tensor] = None,
             temperature: float = 1.0, reduction: str = "mean", return_stats: bool = False,
             ignore_index: Optional[int] = -100, student_softcap: Optional[float] = None,
             teacher_softcap: Optional[float] = None, backend: str = "auto", **objective_params):
    """An OPD objective (``opd_kernels.objectives``) on student rollouts.

    "full": KL(p || q) over the whole vocabulary. "sampled": -r log p(y) with the detached reward
    r = log q(y) - log p(y) at the sampled ``tokens``. "topk": KL(p̄ || q̄) over the student's
    top-k ids, both renormalized there (the paper's default, k = 16). "forward_kl": KL(q || p).
    "jsd" (``beta`` in [0, 1], default 0.5): TRL's generalized JSD. "topk_pg": the paper code's
    policy-gradient form of "topk".
    With ``return_stats=True`` returns ``(loss, TopKStats)``, the statistics from the same pass,
    with the full reverse KL and, given ``tokens``, both models' log-probs of them.
    """
    student, teacher, lead, vocab, device = _logits_pair(student_logits, teacher_logits,
                                                         student_softcap, teacher_softcap)
    return _run("logits", student, teacher, lead, vocab, device, objective=objective,
                objective_params=objective_params, tokens=tokens, k=k, mask=mask,
                temperature=temperature, reduction=reduction, return_stats=return_stats,
                ignore_index=ignore_index, backend=backend)


# ---- fused-linear form ---------------------------------------------------------------------------

def _linear_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, vocab_size,
                 student_bias, teacher_bias, student_softcap, teacher_softcap):
    check.linear("student_hidden", student_hidden, "student_weight", student_weight)
    check.linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    check.bias("student_bias", student_bias, "student_weight", student_weight)
    check.bias("teacher_bias", teacher_bias, "teacher_weight", teacher_weight)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden positions {tuple(teacher_hidden.shape[:-1])} != "
                         f"student_hidden positions {tuple(student_hidden.shape[:-1])}")
    check.same_device(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    vocab = check.vocab_size(vocab_size, student_weight.shape[0], teacher_weight.shape[0])
    student = _linear_model(student_hidden, student_weight, student_bias,
                            check.softcap("student_softcap", student_softcap))
    teacher = _linear_model(teacher_hidden, teacher_weight, teacher_bias,
                            check.softcap("teacher_softcap", teacher_softcap))
    return student, teacher, student_hidden.shape[:-1], vocab, student_hidden.device


def fused_linear_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, *, temperature: float = 1.0,
                           bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                           backend: str = "auto") -> torch.Tensor:
    """lse(hidden @ weight.T / temperature) without materializing the logits."""
    check.linear("hidden", hidden, "weight", weight)
    check.bias("bias", bias, "weight", weight)
    model = _linear_model(hidden, weight, bias, check.softcap("softcap", softcap))
    tau = check.temperature(temperature)
    chosen = resolve(backend, "fused_linear", model.tensors)
    return chosen.logsumexp(model, tau, weight.shape[0]).reshape(hidden.shape[:-1])


def fused_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                                temperature: float = 1.0, bias: Optional[torch.Tensor] = None,
                                softcap: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature) at ``tokens``, logits never materialized."""
    check.linear("hidden", hidden, "weight", weight)
    check.bias("bias", bias, "weight", weight)
    lead = hidden.shape[:-1]
    tokens, _ = check.tokens(tokens, lead, weight.shape[0], hidden.device, None)
    model = _linear_model(hidden, weight, bias, check.softcap("softcap", softcap))
    tau = check.temperature(temperature)
    chosen = resolve(backend, "fused_linear", model.tensors)
    return chosen.token_logprobs(model, _rows(tokens), tau, weight.shape[0]).reshape(lead)


def fused_linear_reverse_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                            teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                            mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                            reduction: str = "mean", **options) -> torch.Tensor:
    """reverse_kl on the logits h W^T of both models, which are never materialized: the "full"
    objective of :func:`fused_linear_opd_loss`, whose docstring explains the options."""
    return fused_linear_opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                 objective="full", mask=mask, temperature=temperature,
                                 reduction=reduction, **options)


def fused_linear_topk_overlap(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                              teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                              k: int = 16, mask: Optional[torch.Tensor] = None,
                              temperature: float = 1.0, tokens: Optional[torch.Tensor] = None,
                              ignore_index: Optional[int] = -100, vocab_size: Optional[int] = None,
                              student_bias: Optional[torch.Tensor] = None,
                              teacher_bias: Optional[torch.Tensor] = None,
                              student_softcap: Optional[float] = None,
                              teacher_softcap: Optional[float] = None,
                              backend: str = "auto") -> TopKStats:
    """topk_overlap on the logits h W^T (+ b) of both models, which are never materialized."""
    student, teacher, lead, vocab, device = _linear_pair(
        student_hidden, student_weight, teacher_hidden, teacher_weight, vocab_size, student_bias,
        teacher_bias, student_softcap, teacher_softcap)
    return _statistics("fused_linear", student, teacher, lead, vocab, device, k=k, mask=mask,
                       temperature=temperature, tokens=tokens, ignore_index=ignore_index,
                       backend=backend)


def fused_linear_opd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                          teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                          objective="topk", tokens: Optional[torch.Tensor] = None, k: int = 16,
                          mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          reduction: str = "mean", return_stats: bool = False,
                          ignore_index: Optional[int] = -100, vocab_size: Optional[int] = None,
                          student_bias: Optional[torch.Tensor] = None,
                          teacher_bias: Optional[torch.Tensor] = None,
                          student_softcap: Optional[float] = None,
                          teacher_softcap: Optional[float] = None,
                          weight_grad_dtype: torch.dtype = torch.float32,
                          grad_in_forward: bool = True, backend: str = "auto", **objective_params):
    """opd_loss on hidden states and lm_head weights: logits exist only as on-chip tiles.

    Each objective does only the work it needs: "topk" evaluates the teacher at the student's k
    ids alone (no teacher lm_head product) unless ``return_stats`` asks for the teacher's own
    top-k; "sampled" needs the teacher's lse and one logit; the dense divergences both full
    products. Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias``
    (where they require grad).

    Mixed precision: bf16/fp16 hidden states with fp32 weights are computed as autocast does
    (products in the activations' dtype, fp32 accumulation, the weight's gradient in fp32).
    ``vocab_size=K`` compares the first K ids when the two lm_heads are padded differently.
    ``weight_grad_dtype``: the dtype the student weight's gradient is summed in (fp32 default).
    ``grad_in_forward``: with reduction "mean" or "sum" the loss is a scalar, so its gradient is
    known up to one factor during the forward; a backend that can (Triton) then computes the
    student's gradients in the forward pass over a bounded scratch instead of recomputing the
    logits in the backward (fewer FLOPs; the weight gradient is held until the backward).
    False forces recomputation. No effect with reduction "none" or on the PyTorch path.
    """
    student, teacher, lead, vocab, device = _linear_pair(
        student_hidden, student_weight, teacher_hidden, teacher_weight, vocab_size, student_bias,
        teacher_bias, student_softcap, teacher_softcap)
    return _run("fused_linear", student, teacher, lead, vocab, device, objective=objective,
                objective_params=objective_params, tokens=tokens, k=k, mask=mask,
                temperature=temperature, reduction=reduction, return_stats=return_stats,
                ignore_index=ignore_index, backend=backend,
                weight_grad_dtype=check.weight_grad_dtype(weight_grad_dtype),
                grad_in_forward=check.flag("grad_in_forward", grad_in_forward))
