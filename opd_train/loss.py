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


def opd_loss_sum(pair: PairedModels, batch: Batch, *, objective: str, k: int, temperature: float,
                 exact_kl: bool):
    """(summed loss over the batch's response tokens, TopKStats, summed full-vocabulary reverse KL
    or None, summed token reward). Summing lets the caller take the token mean over a whole step
    of micro-batches. ``exact_kl`` adds KL(p || q) as a diagnostic for the objectives whose loss is
    not that KL. The token reward is the sampled objective's r = log q(y) - log p(y), whatever the
    objective: its mean is the one-sample estimate of -KL(p || q) on the rollouts."""
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
        reduction="sum", return_stats=True, vocab_size=pair.vocab_size)
    with torch.no_grad():
        student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
        kl = None
        if exact_kl:
            kl = opd_kernels.fused_linear_reverse_kl(
                student_hidden, student_weight, teacher_hidden, teacher_weight,
                mask=mask, temperature=temperature, reduction="sum", vocab_size=pair.vocab_size)
        ids = torch.where(mask, tokens, torch.zeros_like(tokens))
        log_q, log_p = (opd_kernels.fused_linear_token_logprobs(h, w[:pair.vocab_size], ids,
                                                                temperature=temperature)
                        for h, w in ((teacher_hidden, teacher_weight), (student_hidden, student_weight)))
        reward = torch.where(mask, log_q - log_p, torch.zeros_like(log_q)).sum()
    return loss, stats, kl, reward
