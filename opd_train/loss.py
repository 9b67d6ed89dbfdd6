"""The OPD loss of one batch of student rollouts, from final hidden states (never logits).

Position t's hidden state predicts token t+1, so the positions that predict response tokens are
columns prompt_len-1 .. L-2, and their targets are columns prompt_len .. L-1. Both models read the
same student-generated prefix; the teacher runs under no_grad. A model sharded over processes
(distributed.shard) gives its hidden states with its output head as gathered for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import opd_kernels
from opd_kernels import objectives
from opd_kernels.objectives import Need

from .distributed import hidden_and_head
from .models import OutputHead
from .rollout import Batch
from .teacher_client import TeacherClient, lookup_ids


@dataclass
class PairedModels:
    """The student and its teacher: in-process (``teacher``, ``teacher_head``) or served
    (``served``; the teacher and its head are then None)."""
    student: torch.nn.Module
    teacher: Optional[torch.nn.Module]
    student_head: OutputHead
    teacher_head: Optional[OutputHead]
    vocab_size: int            # ids both models score: min of the lm_heads' rows (served: the student's)
    compute_dtype: torch.dtype  # dtype of the hidden states and weights handed to the kernels
    served: Optional[TeacherClient] = None


def _scaled(hidden: torch.Tensor, head: OutputHead, dtype: torch.dtype) -> torch.Tensor:
    hidden = hidden if head.hidden_scale == 1.0 else hidden * head.hidden_scale
    return hidden.to(dtype)


def _states(model, head: OutputHead, batch: Batch, dtype: torch.dtype) -> tuple:
    """(hidden states [B, T, H] at the positions that predict the T response columns, the head
    holding the weight to multiply them with)."""
    hidden, head = hidden_and_head(model, head, batch.input_ids, batch.attention_mask, batch.position_ids)
    return _scaled(hidden[:, batch.prompt_len - 1:-1], head, dtype), head


def predicting_states(model, head: OutputHead, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
    """Hidden states [B, T, H] at the positions that predict the T response columns."""
    return _states(model, head, batch, dtype)[0]


def _bias(head: OutputHead, dtype: torch.dtype):
    return None if head.bias is None else head.bias.to(dtype)


def _heads(pair: PairedModels, batch: Batch, student_head: OutputHead, teacher_head: OutputHead,
           with_tokens: bool = True) -> dict:
    """The arguments both kernel calls share: the heads (biases, caps, shared ids), the response
    ids (``with_tokens``) and the mask of the positions that predict them."""
    dtype = pair.compute_dtype
    tokens = batch.input_ids[:, batch.prompt_len:] if with_tokens else None
    return dict(tokens=tokens, mask=batch.response_mask[:, batch.prompt_len:],
                vocab_size=pair.vocab_size, student_bias=_bias(student_head, dtype),
                teacher_bias=_bias(teacher_head, dtype), student_softcap=student_head.softcap,
                teacher_softcap=teacher_head.softcap)


def _teacher_states(pair: PairedModels, batch: Batch) -> tuple:
    with torch.no_grad():
        return _states(pair.teacher, pair.teacher_head, batch, pair.compute_dtype)


def opd_loss_sum(pair: PairedModels, batch: Batch, *, objective: str, k: int, temperature: float,
                 diagnostics: bool, **objective_params):
    """(summed loss over the batch's response tokens, TopKStats or None), from one fused pass.
    Summing lets the caller take the token mean over a whole step of micro-batches.

    ``diagnostics``: ``return_stats``, so the same pass also gives the statistics with the exact
    KL(p || q) and both models' log-probs of the response tokens (the token reward
    r = log q(y) - log p(y), whatever the objective). It costs the teacher's full lm_head pass
    and both models' top-k; without it the pass does only what the objective needs ("topk":
    no teacher lm_head product at all). The response ids go to the kernels only where the
    objective or the diagnostics read them: the kernels check their range with a host
    synchronization a call. ``objective_params``: the objective's declared parameters (e.g.
    jsd's ``beta``)."""
    if pair.served is not None:
        return _served_loss_sum(pair, batch, objective=objective, k=k, temperature=temperature,
                                diagnostics=diagnostics, **objective_params)
    spec = objectives.get(objective)
    with_tokens = diagnostics or Need.TOKENS in spec.needs(spec.check_params(objective_params))
    student_hidden, student_head = _states(pair.student, pair.student_head, batch, pair.compute_dtype)
    teacher_hidden, teacher_head = _teacher_states(pair, batch)
    out = opd_kernels.fused_linear_opd_loss(
        student_hidden, student_head.weight.to(pair.compute_dtype), teacher_hidden,
        teacher_head.weight.to(pair.compute_dtype), objective=objective, k=k,
        temperature=temperature, reduction="sum", return_stats=diagnostics,
        **_heads(pair, batch, student_head, teacher_head, with_tokens), **objective_params)
    return out if diagnostics else (out, None)


def _served_loss_sum(pair: PairedModels, batch: Batch, *, objective: str, k: int,
                     temperature: float, diagnostics: bool, **objective_params):
    """``opd_loss_sum`` against the served teacher's answer for the batch (``batch.teacher``,
    served.score), through fused_linear_sparse_teacher_opd_loss. For "topk" (eq. 5) the student's
    top-k ids are looked up in that answer (``MissingTeacherLogprob`` where one lies beyond the
    teacher's top-K). Its statistics have no reverse KL (the server gives no full distribution)
    and the teacher's entropy is a lower bound."""
    answer, dtype = batch.teacher, pair.compute_dtype
    spec = objectives.get(objective)
    needs = spec.needs(spec.check_params(objective_params))
    with_tokens = diagnostics or Need.TOKENS in needs  # as above: a range check costs a sync
    hidden, head = _states(pair.student, pair.student_head, batch, dtype)
    weight, bias = head.weight.to(dtype), _bias(head, dtype)
    logprobs_at = None
    if Need.SUPPORT in needs:
        with torch.no_grad():
            ids = opd_kernels.fused_linear_student_topk_ids(hidden, weight, k=k, bias=bias, softcap=head.softcap,
                                                            vocab_size=pair.vocab_size)
        logprobs_at = lookup_ids(answer, ids)
    out = opd_kernels.fused_linear_sparse_teacher_opd_loss(
        hidden, weight, answer.ids, answer.logprobs, objective=objective,
        teacher_token_logprob=answer.token_logprobs if with_tokens else None,
        teacher_logprobs_at=logprobs_at, tokens=batch.input_ids[:, batch.prompt_len:] if with_tokens else None,
        k=k, mask=batch.response_mask[:, batch.prompt_len:], temperature=temperature, reduction="sum",
        return_stats=diagnostics, vocab_size=pair.vocab_size, student_bias=bias,
        student_softcap=head.softcap, **objective_params)
    return out if diagnostics else (out, None)


@torch.no_grad()
def statistics(pair: PairedModels, batch: Batch, *, k: int, temperature: float):
    """The TopKStats of a batch without a loss (the held-out diagnostics)."""
    if pair.served is not None:  # any served objective: the statistics are the same
        return _served_loss_sum(pair, batch, objective="teacher_topk", k=k, temperature=temperature,
                                diagnostics=True)[1]
    student_hidden, student_head = _states(pair.student, pair.student_head, batch, pair.compute_dtype)
    teacher_hidden, teacher_head = _teacher_states(pair, batch)
    return opd_kernels.fused_linear_topk_overlap(
        student_hidden, student_head.weight.to(pair.compute_dtype), teacher_hidden,
        teacher_head.weight.to(pair.compute_dtype), k=k, temperature=temperature,
        **_heads(pair, batch, student_head, teacher_head))


def token_reward(summary: dict) -> float:
    """The mean token reward log q(y) - log p(y) from TopKStats.summary() (both means are over
    the same counted positions)."""
    return summary["teacher_logprob"] - summary["student_logprob"]
