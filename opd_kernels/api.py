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
- ``vocab_parallel``: an ``opd_kernels.VocabParallel(start, stop, total, group)`` when each rank
  of a process group holds only the ids [start, stop) of the vocabulary (its shard of the logits,
  or of the lm_head weights and biases); tokens and top-k ids stay global ids, ``vocab_size`` a
  global count (opd_kernels/backends/vocab_parallel.py). DTensor weights are taken as
  opd_kernels/distributed.py says.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _validate as check
from . import distributed, objectives
from .backends import Backend, LossCall, Model, resolve
from .backends.vocab_parallel import backend as vocab_parallel_backend
from .distributed import VocabParallel
from .objectives import Need
from .reference import reduce
from .served import MASS_TOLERANCE, MISSING, ServedTeacher
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


def _logits_model(name: str, logits: torch.Tensor, softcap) -> Model:
    logits = distributed.local_rows(name, logits)
    return Model(logits=_rows(logits, logits.shape[-1]), softcap=softcap)


def _linear_model(prefix: str, hidden, weight, bias, softcap, vocab_parallel) -> Model:
    """``prefix``: of the arguments' names ("student_" for student_hidden, ...)."""
    hidden = distributed.local_rows(f"{prefix}hidden", hidden)
    weight = distributed.local_weight(f"{prefix}weight", weight, vocab_parallel)
    bias = distributed.local_weight(f"{prefix}bias", bias, vocab_parallel)
    return Model(hidden=_rows(hidden, hidden.shape[-1]), weight=weight, bias=bias, softcap=softcap)


def _vocab(width: int, vocab_parallel: Optional[VocabParallel]) -> int:
    """The ids a call's vocabulary holds: its tensors' own width, or a split's total (each
    shard's width is checked against its range by the split's set-up check)."""
    return width if vocab_parallel is None else distributed.checked(vocab_parallel).total


def _backend(name: str, form: str, tensors, vocab_parallel: Optional[VocabParallel], what: str,
             **match) -> Backend:
    """The registry's backend, or the vocabulary-parallel one (``what``: the public op)."""
    if vocab_parallel is None:
        return resolve(name, form, tensors, **match)
    return vocab_parallel_backend(vocab_parallel, name, form, what)


def _loss_arguments(objective, objective_params, lead, vocab, device, tokens, mask, temperature,
                    reduction, return_stats, ignore_index) -> tuple:
    """The checks every loss shares: (objective, params, needs, mask, tau, return_stats, tokens),
    the mask holding the ignore_index positions, the tokens 0 at uncounted ones; needs includes
    Need.TOKENS where tokens are given."""
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
    return objective, params, needs, mask, tau, return_stats, tokens


def _run(form: str, student: Model, teacher: Model, lead, vocab: int, device, *, objective,
         objective_params: dict, tokens, k, mask, temperature, reduction, return_stats, ignore_index,
         backend, vocab_parallel, **options):
    """The checks every loss shares, the backend call, and the reduction."""
    objective, params, needs, mask, tau, return_stats, tokens = _loss_arguments(
        objective, objective_params, lead, vocab, device, tokens, mask, temperature, reduction,
        return_stats, ignore_index)
    if return_stats:
        needs = needs | _STATS_NEEDS
    if Need.SUPPORT in needs:  # k means nothing to the other objectives
        k = check.k(k, vocab)
    chosen = _backend(backend, form, [*student.tensors, *teacher.tensors], vocab_parallel,
                      f"{form} loss", objective=objective, needs=needs,
                      k=k if Need.SUPPORT in needs else None)
    call = LossCall(student=student, teacher=teacher, objective=objective, params=params,
                    needs=needs, tokens=_rows(tokens), mask=_rows(mask), k=k, temperature=tau,
                    vocab_size=vocab, reduction=reduction, return_stats=return_stats, **options)
    result = chosen.loss(call)
    loss = result.values if result.reduced else reduce(result.values.reshape(lead), mask, reduction)
    return (loss, _shaped_stats(result.stats, lead, mask)) if return_stats else loss


def _statistics(form, student, teacher, lead, vocab, device, *, k, mask, temperature, tokens,
                ignore_index, backend, vocab_parallel, **options) -> TopKStats:
    mask = check.mask(mask, lead, device)
    tau = check.temperature(temperature)
    needs = _STATS_NEEDS
    if tokens is not None:
        tokens, mask = check.tokens(tokens, lead, vocab, device, mask, check.ignore_index(ignore_index))
        tokens = _counted_ids(tokens, mask)
        needs = needs | {Need.TOKENS}
    k = check.k(k, vocab)
    chosen = _backend(backend, form, [*student.tensors, *teacher.tensors], vocab_parallel,
                      f"{form} statistics", needs=needs, k=k)
    call = LossCall(student=student, teacher=teacher, objective=None, needs=needs,
                    tokens=_rows(tokens), mask=_rows(mask), k=k, temperature=tau, vocab_size=vocab,
                    return_stats=True, **options)
    return _shaped_stats(chosen.statistics(call), lead, mask)


# ---- logits form ---------------------------------------------------------------------------------

def logsumexp(logits: torch.Tensor, *, temperature: float = 1.0, softcap: Optional[float] = None,
              backend: str = "auto",
              vocab_parallel: Optional[VocabParallel] = None) -> torch.Tensor:
    """lse(logits / temperature) over the last axis, in fp32, differentiable."""
    check.logits("logits", logits)
    model = _logits_model("logits", logits, check.softcap("softcap", softcap))
    tau = check.temperature(temperature)
    chosen = _backend(backend, "logits", model.tensors, vocab_parallel, "logsumexp")
    return chosen.logsumexp(model, tau, _vocab(logits.shape[-1], vocab_parallel)).reshape(
        logits.shape[:-1])


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                   softcap: Optional[float] = None, backend: str = "auto",
                   vocab_parallel: Optional[VocabParallel] = None) -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens`` (one id a position), differentiable."""
    check.logits("logits", logits)
    lead, vocab = logits.shape[:-1], _vocab(logits.shape[-1], vocab_parallel)
    tokens, _ = check.tokens(tokens, lead, vocab, logits.device, None)
    model = _logits_model("logits", logits, check.softcap("softcap", softcap))
    tau = check.temperature(temperature)
    chosen = _backend(backend, "logits", model.tensors, vocab_parallel, "token_logprobs")
    return chosen.token_logprobs(model, _rows(tokens), tau, vocab).reshape(lead)


def _logits_pair(student_logits, teacher_logits, student_softcap, teacher_softcap, vocab_parallel):
    check.logits_pair(student_logits, teacher_logits)
    lead, vocab = student_logits.shape[:-1], _vocab(student_logits.shape[-1], vocab_parallel)
    student = _logits_model("student_logits", student_logits,
                            check.softcap("student_softcap", student_softcap))
    teacher = _logits_model("teacher_logits", teacher_logits,
                            check.softcap("teacher_softcap", teacher_softcap))
    return student, teacher, lead, vocab, student_logits.device


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
               reduction: str = "mean", student_softcap: Optional[float] = None,
               teacher_softcap: Optional[float] = None, backend: str = "auto",
               vocab_parallel: Optional[VocabParallel] = None) -> torch.Tensor:
    """KL(p || q) with p = softmax(student / tau), q = softmax(teacher / tau); gradient to the
    student only. +inf where the teacher has a -inf logit at a token the student gives mass."""
    return opd_loss(student_logits, teacher_logits, objective="full", mask=mask,
                    temperature=temperature, reduction=reduction, student_softcap=student_softcap,
                    teacher_softcap=teacher_softcap, backend=backend,
                    vocab_parallel=vocab_parallel)


def topk_overlap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, k: int = 16,
                 mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                 tokens: Optional[torch.Tensor] = None, ignore_index: Optional[int] = -100,
                 student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 backend: str = "auto",
                 vocab_parallel: Optional[VocabParallel] = None) -> TopKStats:
    """The top-k shared-mass statistics per position (see TopKStats); no gradient. With
    ``tokens`` they carry both models' log-probs of them too."""
    student, teacher, lead, vocab, device = _logits_pair(student_logits, teacher_logits,
                                                         student_softcap, teacher_softcap,
                                                         vocab_parallel)
    return _statistics("logits", student, teacher, lead, vocab, device, k=k, mask=mask,
                       temperature=temperature, tokens=tokens, ignore_index=ignore_index,
                       backend=backend, vocab_parallel=vocab_parallel)


def opd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, objective="topk",
             tokens: Optional[torch.Tensor] = None, k: int = 16, mask: Optional[torch.Tensor] = None,
             temperature: float = 1.0, reduction: str = "mean", return_stats: bool = False,
             ignore_index: Optional[int] = -100, student_softcap: Optional[float] = None,
             teacher_softcap: Optional[float] = None, backend: str = "auto",
             vocab_parallel: Optional[VocabParallel] = None, **objective_params):
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
                                                         student_softcap, teacher_softcap,
                                                         vocab_parallel)
    return _run("logits", student, teacher, lead, vocab, device, objective=objective,
                objective_params=objective_params, tokens=tokens, k=k, mask=mask,
                temperature=temperature, reduction=reduction, return_stats=return_stats,
                ignore_index=ignore_index, backend=backend, vocab_parallel=vocab_parallel)


# ---- fused-linear form ---------------------------------------------------------------------------

def _linear_pair(student_hidden, student_weight, teacher_hidden, teacher_weight, vocab_size,
                 student_bias, teacher_bias, student_softcap, teacher_softcap, vocab_parallel):
    check.linear("student_hidden", student_hidden, "student_weight", student_weight)
    check.linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    check.bias("student_bias", student_bias, "student_weight", student_weight)
    check.bias("teacher_bias", teacher_bias, "teacher_weight", teacher_weight)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden positions {tuple(teacher_hidden.shape[:-1])} != "
                         f"student_hidden positions {tuple(student_hidden.shape[:-1])}")
    check.same_device(student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    vocab = check.vocab_size(vocab_size, _vocab(student_weight.shape[0], vocab_parallel),
                             _vocab(teacher_weight.shape[0], vocab_parallel))
    student = _linear_model("student_", student_hidden, student_weight, student_bias,
                            check.softcap("student_softcap", student_softcap), vocab_parallel)
    teacher = _linear_model("teacher_", teacher_hidden, teacher_weight, teacher_bias,
                            check.softcap("teacher_softcap", teacher_softcap), vocab_parallel)
    return student, teacher, student_hidden.shape[:-1], vocab, student_hidden.device


def fused_linear_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, *, temperature: float = 1.0,
                           bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                           backend: str = "auto",
                           vocab_parallel: Optional[VocabParallel] = None) -> torch.Tensor:
    """lse(hidden @ weight.T / temperature) without materializing the logits."""
    check.linear("hidden", hidden, "weight", weight)
    check.bias("bias", bias, "weight", weight)
    model = _linear_model("", hidden, weight, bias, check.softcap("softcap", softcap),
                          vocab_parallel)
    tau = check.temperature(temperature)
    chosen = _backend(backend, "fused_linear", model.tensors, vocab_parallel,
                      "fused_linear_logsumexp")
    return chosen.logsumexp(model, tau, _vocab(weight.shape[0], vocab_parallel)).reshape(
        hidden.shape[:-1])


def fused_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                                temperature: float = 1.0, bias: Optional[torch.Tensor] = None,
                                softcap: Optional[float] = None, backend: str = "auto",
                                vocab_parallel: Optional[VocabParallel] = None) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature) at ``tokens``, logits never materialized."""
    check.linear("hidden", hidden, "weight", weight)
    check.bias("bias", bias, "weight", weight)
    lead, vocab = hidden.shape[:-1], _vocab(weight.shape[0], vocab_parallel)
    tokens, _ = check.tokens(tokens, lead, vocab, hidden.device, None)
    model = _linear_model("", hidden, weight, bias, check.softcap("softcap", softcap),
                          vocab_parallel)
    tau = check.temperature(temperature)
    chosen = _backend(backend, "fused_linear", model.tensors, vocab_parallel,
                      "fused_linear_token_logprobs")
    return chosen.token_logprobs(model, _rows(tokens), tau, vocab).reshape(lead)


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
                              backend: str = "auto",
                              vocab_parallel: Optional[VocabParallel] = None) -> TopKStats:
    """topk_overlap on the logits h W^T (+ b) of both models, which are never materialized."""
    student, teacher, lead, vocab, device = _linear_pair(
        student_hidden, student_weight, teacher_hidden, teacher_weight, vocab_size, student_bias,
        teacher_bias, student_softcap, teacher_softcap, vocab_parallel)
    return _statistics("fused_linear", student, teacher, lead, vocab, device, k=k, mask=mask,
                       temperature=temperature, tokens=tokens, ignore_index=ignore_index,
                       backend=backend, vocab_parallel=vocab_parallel)


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
                          grad_in_forward: bool = True, backend: str = "auto",
                          vocab_parallel: Optional[VocabParallel] = None, **objective_params):
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
    A DTensor ``student_weight`` (FSDP2, Shard(0)) is gathered for the loss and gets its
    gradient averaged over the ranks, as FSDP2 averages its own (opd_kernels/distributed.py).
    """
    student, teacher, lead, vocab, device = _linear_pair(
        student_hidden, student_weight, teacher_hidden, teacher_weight, vocab_size, student_bias,
        teacher_bias, student_softcap, teacher_softcap, vocab_parallel)
    return _run("fused_linear", student, teacher, lead, vocab, device, objective=objective,
                objective_params=objective_params, tokens=tokens, k=k, mask=mask,
                temperature=temperature, reduction=reduction, return_stats=return_stats,
                ignore_index=ignore_index, backend=backend, vocab_parallel=vocab_parallel,
                weight_grad_dtype=check.weight_grad_dtype(weight_grad_dtype),
                grad_in_forward=check.flag("grad_in_forward", grad_in_forward))


# ---- a served (sparse) teacher -------------------------------------------------------------------

def _served(teacher_ids, teacher_logprobs, teacher_token_logprob, teacher_logprobs_at, lead, vocab,
            device, mask, stats_k) -> ServedTeacher:
    """The checked answer, rows flattened; uncounted rows get harmless stand-ins (distinct ids
    0..K-1, log-probs log(1/K), 0) so that no backend gathers or logs anything invalid there."""
    top_k = check.served_teacher(teacher_ids, teacher_logprobs, teacher_token_logprob,
                                 teacher_logprobs_at, lead, vocab, device, mask, stats_k,
                                 MASS_TOLERANCE)
    ids = _rows(teacher_ids.long(), top_k)
    logprobs = _rows(teacher_logprobs.float(), top_k)
    token_logprob = _rows(None if teacher_token_logprob is None else teacher_token_logprob.float())
    logprobs_at = (None if teacher_logprobs_at is None
                   else _rows(teacher_logprobs_at.float(), teacher_logprobs_at.shape[-1]))
    if mask is not None:
        rows = _rows(mask)[:, None]
        ids = torch.where(rows, ids, torch.arange(top_k, device=device))
        logprobs = torch.where(rows, logprobs, torch.full_like(logprobs, -math.log(top_k)))
        blank = lambda t, r: None if t is None else torch.where(r, t, torch.zeros_like(t))
        token_logprob, logprobs_at = blank(token_logprob, rows[:, 0]), blank(logprobs_at, rows)
    return ServedTeacher(ids, logprobs.contiguous(), token_logprob, logprobs_at)


def _run_served(form: str, student: Model, lead, vocab: int, device, *, teacher_ids,
                teacher_logprobs, teacher_token_logprob, teacher_logprobs_at, objective,
                objective_params, tokens, k, mask, temperature, reduction, return_stats,
                ignore_index, backend, vocab_parallel, **options):
    objective, params, needs, mask, tau, return_stats, tokens = _loss_arguments(
        objective, objective_params, lead, vocab, device, tokens, mask, temperature, reduction,
        return_stats, ignore_index)
    if Need.SUPPORT in needs or return_stats:
        k = check.k(k, vocab)
    teacher = _served(teacher_ids, teacher_logprobs, teacher_token_logprob, teacher_logprobs_at,
                      lead, vocab, device, mask, k if return_stats else None)
    missing = needs - teacher.quantities
    if missing:
        what = [MISSING[m] for m in sorted(missing, key=lambda m: m.name)]
        if None in what:
            raise ValueError(f"objective {objective.name!r} needs {', '.join(m.value for m in missing)}"
                             f", which a served teacher does not give (its objectives: "
                             f"{objectives.names('served')})")
        raise ValueError(f"objective {objective.name!r} with a served teacher needs "
                         + "; ".join(what))
    if Need.SUPPORT in needs and teacher.logprobs_at.shape[-1] != k:
        raise ValueError(f"teacher_logprobs_at has {teacher.logprobs_at.shape[-1]} log-probs a "
                         f"position but k={k} (one for each of the student's top-k ids)")
    chosen = _backend(backend, form, [*student.tensors, *teacher.tensors], vocab_parallel,
                      f"{form} served loss", objective=objective,
                      k=k if Need.SUPPORT in needs or return_stats else None, served=True)
    call = LossCall(student=student, teacher=teacher, objective=objective, params=params,
                    needs=needs, tokens=_rows(tokens), mask=_rows(mask), k=k, temperature=tau,
                    vocab_size=vocab, reduction=reduction, return_stats=return_stats, **options)
    result = chosen.served_loss(call)
    loss = reduce(result.values.reshape(lead), mask, reduction)
    return (loss, _shaped_stats(result.stats, lead, mask)) if return_stats else loss


def sparse_teacher_opd_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                            teacher_logprobs: torch.Tensor, *, objective="teacher_topk",
                            teacher_token_logprob: Optional[torch.Tensor] = None,
                            teacher_logprobs_at: Optional[torch.Tensor] = None,
                            tokens: Optional[torch.Tensor] = None, k: int = 16,
                            mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                            reduction: str = "mean", return_stats: bool = False,
                            ignore_index: Optional[int] = -100,
                            student_softcap: Optional[float] = None, backend: str = "auto",
                            vocab_parallel: Optional[VocabParallel] = None, **objective_params):
    """An OPD objective against a served teacher: its top-K ``teacher_ids`` [..., K] and
    ``teacher_logprobs`` [..., K] at each position (nothing of size V on the teacher's side).

    Objectives (``objectives.names("served")``): "teacher_topk" (forward KL over T plus a tail
    bin), "teacher_topk_renormalized" (both renormalized over T), "sampled" (needs
    ``teacher_token_logprob``, log q of each of ``tokens``), "topk" (the paper's eq. 5; needs
    ``teacher_logprobs_at``, log q at the student's top-k ids as ``student_topk_ids`` returns
    them). The teacher's log-probs are used as served: serve them at the loss temperature. With
    ``return_stats=True`` the statistics compare the student's top-k with the teacher's first k
    (k <= K): exact overlap and masses, the teacher's entropy as a lower bound.
    """
    check.logits("student_logits", student_logits)
    lead, vocab = student_logits.shape[:-1], _vocab(student_logits.shape[-1], vocab_parallel)
    student = _logits_model("student_logits", student_logits,
                            check.softcap("student_softcap", student_softcap))
    return _run_served("logits", student, lead, vocab, student_logits.device,
                       teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs,
                       teacher_token_logprob=teacher_token_logprob,
                       teacher_logprobs_at=teacher_logprobs_at, objective=objective,
                       objective_params=objective_params, tokens=tokens, k=k, mask=mask,
                       temperature=temperature, reduction=reduction, return_stats=return_stats,
                       ignore_index=ignore_index, backend=backend, vocab_parallel=vocab_parallel)


def fused_linear_sparse_teacher_opd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                         teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                                         *, objective="teacher_topk",
                                         teacher_token_logprob: Optional[torch.Tensor] = None,
                                         teacher_logprobs_at: Optional[torch.Tensor] = None,
                                         tokens: Optional[torch.Tensor] = None, k: int = 16,
                                         mask: Optional[torch.Tensor] = None,
                                         temperature: float = 1.0, reduction: str = "mean",
                                         return_stats: bool = False,
                                         ignore_index: Optional[int] = -100,
                                         vocab_size: Optional[int] = None,
                                         student_bias: Optional[torch.Tensor] = None,
                                         student_softcap: Optional[float] = None,
                                         weight_grad_dtype: torch.dtype = torch.float32,
                                         backend: str = "auto",
                                         vocab_parallel: Optional[VocabParallel] = None,
                                         **objective_params):
    """:func:`sparse_teacher_opd_loss` with the student as hidden states and its lm_head weight
    (logits only ever as on-chip tiles): one student lm_head pass, the teacher as served.
    ``vocab_size``: the ids the teacher can name, when the student's lm_head is padded."""
    check.linear("student_hidden", student_hidden, "student_weight", student_weight)
    check.bias("student_bias", student_bias, "student_weight", student_weight)
    rows = _vocab(student_weight.shape[0], vocab_parallel)
    vocab = check.vocab_size(vocab_size, rows, rows)
    student = _linear_model("student_", student_hidden, student_weight, student_bias,
                            check.softcap("student_softcap", student_softcap), vocab_parallel)
    return _run_served("fused_linear", student, student_hidden.shape[:-1], vocab,
                       student_hidden.device, teacher_ids=teacher_ids,
                       teacher_logprobs=teacher_logprobs,
                       teacher_token_logprob=teacher_token_logprob,
                       teacher_logprobs_at=teacher_logprobs_at, objective=objective,
                       objective_params=objective_params, tokens=tokens, k=k, mask=mask,
                       temperature=temperature, reduction=reduction, return_stats=return_stats,
                       ignore_index=ignore_index, backend=backend, vocab_parallel=vocab_parallel,
                       weight_grad_dtype=check.weight_grad_dtype(weight_grad_dtype))


def _student_topk(form, model: Model, lead, vocab, k, backend, vocab_parallel) -> torch.Tensor:
    k = check.k(k, vocab)
    chosen = _backend(backend, form, model.tensors, vocab_parallel, f"{form} student top-k", k=k,
                      served=True)
    return chosen.student_topk(model, k, vocab).reshape(*lead, k)


def student_topk_ids(student_logits: torch.Tensor, *, k: int = 16, softcap: Optional[float] = None,
                     backend: str = "auto",
                     vocab_parallel: Optional[VocabParallel] = None) -> torch.Tensor:
    """The student's top-k ids [..., k] (largest first, ties to the lower id): the ids to ask a
    served teacher's log-probs at, for the "topk" objective's ``teacher_logprobs_at``."""
    check.logits("student_logits", student_logits)
    model = _logits_model("student_logits", student_logits, check.softcap("softcap", softcap))
    return _student_topk("logits", model, student_logits.shape[:-1],
                         _vocab(student_logits.shape[-1], vocab_parallel), k, backend,
                         vocab_parallel)


def fused_linear_student_topk_ids(hidden: torch.Tensor, weight: torch.Tensor, *, k: int = 16,
                                  bias: Optional[torch.Tensor] = None,
                                  softcap: Optional[float] = None,
                                  vocab_size: Optional[int] = None,
                                  backend: str = "auto",
                                  vocab_parallel: Optional[VocabParallel] = None) -> torch.Tensor:
    """student_topk_ids on hidden @ weight.T (+ bias), the logits never materialized."""
    check.linear("hidden", hidden, "weight", weight)
    check.bias("bias", bias, "weight", weight)
    rows = _vocab(weight.shape[0], vocab_parallel)
    vocab = check.vocab_size(vocab_size, rows, rows)
    model = _linear_model("", hidden, weight, bias, check.softcap("softcap", softcap),
                          vocab_parallel)
    return _student_topk("fused_linear", model, hidden.shape[:-1], vocab, k, backend,
                         vocab_parallel)
