"""The OPD loss of one batch of student rollouts, from final hidden states (never logits).

Position t's hidden state predicts token t+1, so the positions that predict response tokens are
columns prompt_len-1 .. L-2, and their targets are columns prompt_len .. L-1. Both models read the
same student-generated prefix; the teacher runs under no_grad.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import opd_kernels

from .models import OutputHead, final_hidden
from .rollout import Batch


@dataclass
class PairedModels:
    student: torch.nn.Module
    teacher: torch.nn.Module
    student_head: OutputHead
    teacher_head: OutputHead
    vocab_size: int            # min of the two lm_heads' rows: ids both models score
    compute_dtype: torch.dtype  # dtype of the hidden states and weights handed to the kernels


def _scaled(hidden: torch.Tensor, head: OutputHead, dtype: torch.dtype) -> torch.Tensor:
    hidden = hidden if head.hidden_scale == 1.0 else hidden * head.hidden_scale
    return hidden.to(dtype)


def predicting_states(model, head: OutputHead, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
    """Hidden states [B, T, H] at the positions that predict the T response columns."""
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    return _scaled(hidden[:, batch.prompt_len - 1:-1], head, dtype)


def _bias(head: OutputHead, dtype: torch.dtype):
    return None if head.bias is None else head.bias.to(dtype)


def opd_loss_sum(pair: PairedModels, batch: Batch, *, objective: str, k: int, temperature: float,
                 **objective_params):
    """(summed loss over the batch's response tokens, TopKStats, summed full-vocabulary reverse KL,
    summed token reward), all from one fused pass (``return_stats``: the statistics carry the exact
    KL(p || q) and both models' log-probs of the response tokens). Summing lets the caller take the
    token mean over a whole step of micro-batches. The token reward is the sampled objective's
    r = log q(y) - log p(y), whatever the objective: its mean is the one-sample estimate of
    -KL(p || q) on the rollouts. The KL and the reward are detached device scalars (no sync).
    ``objective_params``: the objective's declared parameters (e.g. jsd's ``beta``)."""
    mask = batch.response_mask[:, batch.prompt_len:]
    tokens = batch.input_ids[:, batch.prompt_len:]
    student_hidden = predicting_states(pair.student, pair.student_head, batch, pair.compute_dtype)
    student_weight = pair.student_head.weight.to(pair.compute_dtype)
    with torch.no_grad():
        teacher_hidden = predicting_states(pair.teacher, pair.teacher_head, batch, pair.compute_dtype)
        teacher_weight = pair.teacher_head.weight.to(pair.compute_dtype)
    loss, stats = opd_kernels.fused_linear_opd_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight,
        objective=objective, tokens=tokens, k=k, mask=mask, temperature=temperature,
        reduction="sum", return_stats=True, vocab_size=pair.vocab_size,
        student_bias=_bias(pair.student_head, pair.compute_dtype),
        teacher_bias=_bias(pair.teacher_head, pair.compute_dtype),
        student_softcap=pair.student_head.softcap, teacher_softcap=pair.teacher_head.softcap,
        **objective_params)
    # Uncounted positions hold NaN in the statistics: sum the counted ones only.
    counted = lambda t: torch.where(stats.mask, t.detach(), torch.zeros_like(t)).sum()  # noqa: E731
    kl = counted(stats.reverse_kl)
    reward = counted(stats.teacher_logprob - stats.student_logprob)
    return loss, stats, kl, reward
