"""Logits backend: the OPD losses and statistics from [N, V] logits with Triton kernels.

Implements the logits functions of the backend interface (rows already flattened to 2-D by the
public layer). Every call makes one forward pass over the logits (``row_stats``: the partial
kernel over (rows, vocabulary splits) and a small finalize kernel that merges the splits in a
fixed order and computes the per-row results); nothing of size [N, V] is written in the
forward. The autograd Functions here hold the forward's per-row results and write the gradient
in a second pass over the logits (``logits_grad``), so any upstream gradient works (reduction
'none', per-position weights), and a forward-only call costs one read.

Bytes per element of the logits (bf16, 2 B an element of each model):
    reverse KL   forward 4 (both read once)   backward 6 (both read, gradient written)
    sampled      forward 4                    backward 4 (student read, gradient written)
    topk         forward 2 (student read)     backward 2 (zeros + k values a row written)
``return_stats`` rides the same forward pass (the top-k of both models and their entropies are
kept while the blocks stream by); for ``topk`` it adds the teacher's read (4 B in all).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from opd_kernels import reference
from opd_kernels.kernels import row_stats
from opd_kernels.kernels.logits_grad import reverse_kl_grad_kernel, softmax_grad_kernel
from opd_kernels.kernels.row_stats import row_stats_finalize_kernel, row_stats_partial_kernel
from opd_kernels.stats import TopKStats

# Vocabulary block widths, for 8 warps. Forward: every lane keeps its own running state
# (5 fp32 values for a pair, 7 with statistics), so 2048 lanes, 8 a thread, keep the KL pass
# at 87 registers on sm_90 (4096 would need 183). Backward: no state, one block a program,
# 4096 elements (8 KB of bf16 a model) for enough bytes in flight.
_FORWARD_BLOCK_V = 2048
BACKWARD_BLOCK_V = 4096

# The largest k the running top-k keeps on-chip (the public layer checks it).
MAX_K = 64


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Any row stride works; the vocabulary axis must be contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def vocab_block(vocab: int, cap: int, k_pad: int = 0) -> int:
    return max(min(triton.next_power_of_2(vocab), cap), k_pad, 16)


def warps_for_block(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def vocab_splits(n_rows: int, n_blocks: int, device: torch.device) -> int:
    """Programs a row is split into: enough to give every SM a few programs when rows are few."""
    units = (torch.cuda.get_device_properties(device).multi_processor_count
             if device.type == "cuda" else 1)
    return max(1, min(n_blocks, triton.cdiv(4 * units, max(n_rows, 1))))


class RowPass(NamedTuple):
    fields: torch.Tensor                 # [NUM_FIELDS, N] fp32, rows named by row_stats.FIELDS
    top_ids: Optional[torch.Tensor]      # [N, k] int64 student top-k ids (descending), or None

    def field(self, name: str) -> torch.Tensor:
        return self.fields[row_stats.FIELDS.index(name)]


@torch.no_grad()
def row_pass(student: torch.Tensor, teacher: Optional[torch.Tensor] = None,
             tokens: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
             k: int = 0, temperature: float = 1.0) -> RowPass:
    """One read of the logits: lse (both models), KL, token logits, entropies, top-k statistics
    (teacher and k > 0), student top-k ids (k > 0), as ``row_stats`` describes."""
    n, vocab = student.shape
    device = student.device
    fields = torch.empty(row_stats.NUM_FIELDS.value, n, dtype=torch.float32, device=device)
    top_ids = torch.empty(n, k, dtype=torch.int64, device=device) if k else None
    if n == 0:
        return RowPass(fields, top_ids)
    mask = None if mask is None else mask.contiguous()
    tokens = None if tokens is None else tokens.contiguous()
    k_pad = triton.next_power_of_2(k) if k else 0
    block_v = vocab_block(vocab, _FORWARD_BLOCK_V, k_pad)
    n_blocks = triton.cdiv(vocab, block_v)
    splits = vocab_splits(n, n_blocks, student.device)
    blocks_per_split = triton.cdiv(n_blocks, splits)
    splits = triton.cdiv(n_blocks, blocks_per_split)
    state = torch.empty(n, splits, row_stats.NUM_STATE.value, dtype=torch.float32, device=device)
    keys = torch.empty(n, splits, 2, k_pad, dtype=torch.int64, device=device) if k else None
    inv_tau = 1.0 / temperature
    stride_t = teacher.stride(0) if teacher is not None else 0
    row_stats_partial_kernel[(n, splits)](
        student, teacher, mask, state, keys, vocab, student.stride(0), stride_t, blocks_per_split,
        inv_tau, BLOCK_V=block_v, K_PAD=max(k_pad, 1), num_warps=warps_for_block(block_v))
    row_stats_finalize_kernel[(n,)](
        state, keys, student, teacher, tokens, mask, fields, top_ids, n, splits,
        student.stride(0), stride_t, inv_tau, k, SPLITS_PAD=triton.next_power_of_2(splits),
        K_PAD=max(k_pad, 1), num_warps=4)
    return RowPass(fields, top_ids)


def _grid(n: int, vocab: int, block_v: int) -> tuple:
    return (n, triton.cdiv(vocab, block_v))


def _softmax_grad(logits, lse_parts, coef_p, coef_y=None, tokens=None, mask=None,
                  temperature=1.0):
    """dL/dz = coef_p * p + coef_y * onehot(tokens), rows with mask False zero;
    lse_parts = (max, logsum) of the row, lse = max + logsum."""
    n, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n == 0:
        return grad
    block_v = vocab_block(vocab, BACKWARD_BLOCK_V)
    softmax_grad_kernel[_grid(n, vocab, block_v)](
        logits, grad, *lse_parts, coef_p, coef_y, tokens, mask, vocab, logits.stride(0),
        grad.stride(0), 1.0 / temperature, BLOCK_V=block_v, num_warps=warps_for_block(block_v))
    return grad


def _per_row(grad: torch.Tensor) -> torch.Tensor:
    return grad.float().contiguous()


class _LogSumExp(torch.autograd.Function):
    """lse per row, value and parts (max, logsum) from the forward pass."""

    @staticmethod
    def forward(ctx, logits, rp, temperature):
        ctx.save_for_backward(logits, rp.field("max_s"), rp.field("logsum_s"))
        ctx.temperature = temperature
        return rp.field("lse_s").clone()

    @staticmethod
    def backward(ctx, grad):
        logits, *lse_parts = ctx.saved_tensors
        coef_p = _per_row(grad) / ctx.temperature
        return _softmax_grad(logits, lse_parts, coef_p, temperature=ctx.temperature), None, None


class _TokenLogProb(torch.autograd.Function):
    """log p(y) per row from the forward pass (0 at rows with mask False)."""

    @staticmethod
    def forward(ctx, logits, tokens, rp, mask, temperature):
        ctx.save_for_backward(logits, tokens, rp.field("max_s"), rp.field("logsum_s"), mask)
        ctx.temperature = temperature
        return rp.field("student_logprob").clone()

    @staticmethod
    def backward(ctx, grad):
        logits, tokens, max_s, logsum_s, mask = ctx.saved_tensors
        coef_y = _per_row(grad) / ctx.temperature
        grad_logits = _softmax_grad(logits, (max_s, logsum_s), -coef_y, coef_y, tokens, mask,
                                    ctx.temperature)
        return grad_logits, None, None, None, None


class _ReverseKL(torch.autograd.Function):
    """KL(p || q) per row from the forward pass; gradient w.r.t. the student only."""

    @staticmethod
    def forward(ctx, student, teacher, rp, mask, temperature):
        ctx.save_for_backward(student, teacher, *(rp.field(name) for name in (
            "max_s", "logsum_s", "max_t", "logsum_t", "kl")), mask)
        ctx.temperature = temperature
        return rp.field("kl").clone()

    @staticmethod
    def backward(ctx, grad):
        student, teacher, max_s, logsum_s, max_t, logsum_t, kl, mask = ctx.saved_tensors
        n, vocab = student.shape
        coef = _per_row(grad) / ctx.temperature
        grad_student = torch.empty_like(student, memory_format=torch.contiguous_format)
        if n == 0:
            return grad_student, None, None, None, None
        block_v = vocab_block(vocab, BACKWARD_BLOCK_V)
        reverse_kl_grad_kernel[_grid(n, vocab, block_v)](
            student, teacher, grad_student, max_s, logsum_s, max_t, logsum_t, kl, coef, mask,
            vocab, student.stride(0), teacher.stride(0), grad_student.stride(0),
            1.0 / ctx.temperature, BLOCK_V=block_v, num_warps=warps_for_block(block_v))
        return grad_student, None, None, None, None


def row_pass_stats(rp: RowPass) -> TopKStats:
    f = rp.field
    return TopKStats(overlap=f("overlap"), student_mass=f("student_mass"),
                     teacher_mass=f("teacher_mass"), overlap_advantage=f("overlap_advantage"),
                     student_entropy=f("student_entropy"), teacher_entropy=f("teacher_entropy"),
                     entropy_gap=(f("teacher_entropy") - f("student_entropy")).abs())


# ---- the backend interface -------------------------------------------------------------------

def logsumexp(logits, temperature):
    logits = _rows(logits)
    return _LogSumExp.apply(logits, row_pass(logits, temperature=temperature), temperature)


def token_logprobs(logits, tokens, temperature):
    logits, tokens = _rows(logits), tokens.contiguous()  # the backward reads the ids by row too
    rp = row_pass(logits, tokens=tokens, temperature=temperature)
    return _TokenLogProb.apply(logits, tokens, rp, None, temperature)


def reverse_kl(student, teacher, mask, temperature):
    return opd_loss(student, teacher, "full", None, 0, mask, temperature, False)[0]


def topk_overlap(student, teacher, k, mask, temperature):
    rp = row_pass(_rows(student), _rows(teacher), mask=mask, k=k, temperature=temperature)
    return row_pass_stats(rp)


def opd_loss(student, teacher, objective, tokens, k, mask, temperature, return_stats):
    student, teacher = _rows(student), _rows(teacher.detach())
    mask = None if mask is None else mask.contiguous()
    tokens = None if tokens is None else tokens.contiguous()  # read by row in the backward too
    if objective == "topk" and not return_stats:
        # The teacher is needed at the student's k ids only: no pass over its logits.
        rp = row_pass(student, mask=mask, k=k, temperature=temperature)
    else:
        rp = row_pass(student, teacher, tokens if objective == "sampled" else None, mask,
                      k if return_stats or objective == "topk" else 0, temperature)
    if objective == "full":
        loss = _ReverseKL.apply(student, teacher, rp, mask, temperature)
    elif objective == "sampled":
        # r = log q(y) - log p(y), detached (0 at uncounted rows); loss -r log p(y)
        reward = rp.field("teacher_logprob") - rp.field("student_logprob")
        loss = -reward * _TokenLogProb.apply(student, tokens, rp, mask, temperature)
    elif objective == "topk":
        # Gathering at the ids makes autograd write the k-sparse gradient (zeros + k values).
        ids = rp.top_ids
        student_at, teacher_at = student.gather(1, ids).float(), teacher.gather(1, ids).float()
        if mask is not None:  # uncounted rows: finite stand-ins, then value and gradient 0
            counted = mask[:, None]
            student_at = torch.where(counted, student_at, torch.zeros_like(student_at))
            teacher_at = torch.where(counted, teacher_at, torch.zeros_like(teacher_at))
        loss = reference.renormalized_kl(student_at, teacher_at, temperature)
        if mask is not None:
            loss = torch.where(mask, loss, torch.zeros_like(loss))
    else:
        raise ValueError(f"objective must be one of {reference.OBJECTIVES}, got {objective!r}")
    return loss, (row_pass_stats(rp) if return_stats else None)
