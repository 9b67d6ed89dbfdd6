"""The pure-PyTorch backend: the reference math run over chunks of positions.

Each chunk's logits (materialized in fp32, or fp64 for fp64 input) are freed before the next chunk
starts, and under autograd each chunk is checkpointed, so the backward recomputes one chunk at a
time: extra memory stays about one chunk's worth of logits whatever N is. A chunk holds as many
rows as fit ``CHUNK_BYTES`` of fp32 logits; one row of even a 262K vocabulary is 1 MB, so chunking
the rows bounds the memory without also splitting the vocabulary.

Implements the backend interface of opd_kernels._dispatch (2-D rows in, per-row values out).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from . import reference
from .stats import STAT_FIELDS, TopKStats

CHUNK_BYTES = 4 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _over_chunks(fn: Callable, row_width: int, rows: list, shared: list = ()) -> list:
    """fn(*row_chunks, *shared) -> tuple of per-row tensors, concatenated over row chunks of
    ``CHUNK_BYTES`` / (4 ``row_width``) rows (row_width: the elements a row's temporaries hold)."""
    n = next(t for t in rows if t is not None).shape[0]
    step = max(1, CHUNK_BYTES // (4 * row_width))
    n_chunks = max(1, -(-n // step))
    # torch.split, not slicing: the backward of a slice fills a zero tensor of the whole input
    # per chunk, the backward of a split concatenates the chunks' gradients once.
    columns = [[None] * n_chunks if t is None else t.split(step) for t in rows]
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in [*rows, *shared])
    parts = []
    for chunk in zip(*columns):
        if differentiable:
            parts.append(checkpoint(fn, *chunk, *shared, use_reentrant=False))
        else:
            parts.append(fn(*chunk, *shared))
    return [torch.cat(column) for column in zip(*parts)]


def _blank_uncounted(mask: Optional[torch.Tensor], *logits: torch.Tensor):
    """Zero logits at uncounted rows so no inf or NaN there can reach a value or a gradient."""
    if mask is None:
        return logits
    return tuple(torch.where(mask[:, None], z, torch.zeros_like(z)) for z in logits)


def _masked(values: torch.Tensor, mask: Optional[torch.Tensor], fill: float) -> torch.Tensor:
    return values if mask is None else torch.where(mask, values, torch.full_like(values, fill))


def _stats_rows(student: torch.Tensor, teacher: torch.Tensor, k: int, mask, temperature) -> tuple:
    stats = reference.topk_overlap(student, teacher, k, temperature)
    return tuple(_masked(v.float(), mask, float("nan")) for v in stats.tensors().values())


def _loss_rows(student, teacher, tokens, mask, objective, k, temperature, with_stats):
    """Per-row loss (0 at uncounted rows) and, if asked, the statistics, for one chunk of logits."""
    cd = _compute_dtype(student.dtype)
    student, teacher = _blank_uncounted(mask, student.to(cd), teacher.detach().to(cd))
    if tokens is not None and mask is not None:
        tokens = torch.where(mask, tokens, torch.zeros_like(tokens))
    loss = _masked(reference.per_position_loss(student, teacher, objective, tokens, k, temperature),
                   mask, 0.0)
    stats = _stats_rows(student, teacher, k, mask, temperature) if with_stats else ()
    return (loss, *stats)


def _stats_from_columns(columns: list) -> TopKStats:
    return TopKStats(**dict(zip(STAT_FIELDS, columns)))


# ---- logits form ---------------------------------------------------------------------------------

def logsumexp(logits, temperature):
    fn = lambda z: (reference.logsumexp(z.to(_compute_dtype(z.dtype)), temperature),)
    return _over_chunks(fn, logits.shape[-1], [logits])[0]


def token_logprobs(logits, tokens, temperature):
    fn = lambda z, y: (reference.token_logprobs(z.to(_compute_dtype(z.dtype)), y, temperature),)
    return _over_chunks(fn, logits.shape[-1], [logits, tokens])[0]


def reverse_kl(student, teacher, mask, temperature):
    return opd_loss(student, teacher, "full", None, 1, mask, temperature, False)[0]


def topk_overlap(student, teacher, k, mask, temperature):
    cd = _compute_dtype(student.dtype)

    def fn(s, t, m):
        return _stats_rows(*_blank_uncounted(m, s.to(cd), t.to(cd)), k, m, temperature)

    with torch.no_grad():
        return _stats_from_columns(_over_chunks(fn, student.shape[-1], [student, teacher, mask]))


def _topk_support(logits_of_rows: Callable, width: int, rows: list, k: int, mask) -> torch.Tensor:
    """S = TopK(p, k) per row, found chunk by chunk without autograd (S is not differentiated);
    uncounted rows get some valid ids, so gathers at them stay in range."""
    def fn(*chunk):
        (student,) = _blank_uncounted(chunk[-1], logits_of_rows(*chunk[:-1]))
        return (reference.topk_ids(student, k),)

    with torch.no_grad():
        return _over_chunks(fn, width, [*rows, mask])[0]


def _renormalized_kl_rows(student_at_support, teacher_at_support, mask, temperature):
    """The topk objective's per-row loss from the k logits of each model at S (eq. 5)."""
    cd = _compute_dtype(student_at_support.dtype)
    s, t = _blank_uncounted(mask, student_at_support.to(cd), teacher_at_support.detach().to(cd))
    return _masked(reference.renormalized_kl(s, t, temperature), mask, 0.0)


def opd_loss(student, teacher, objective, tokens, k, mask, temperature, return_stats):
    if objective == "topk" and not return_stats:
        # The loss touches k logits a row: after a no-grad pass for S, a plain gather keeps
        # autograd's memory at [N, k], with nothing to recompute in the backward.
        support = _topk_support(lambda s: s.to(_compute_dtype(s.dtype)), student.shape[-1], [student],
                                k, mask)
        return _renormalized_kl_rows(student.gather(-1, support), teacher.gather(-1, support), mask,
                                     temperature), None

    def fn(s, t, y, m):
        return _loss_rows(s, t, y, m, objective, k, temperature, return_stats)

    columns = _over_chunks(fn, student.shape[-1], [student, teacher, tokens, mask])
    return columns[0], (_stats_from_columns(columns[1:]) if return_stats else None)


# ---- fused-linear form: the same math on logits made one chunk at a time -----------------------

def _accumulating(weight: torch.Tensor, weight_grad_dtype: torch.dtype) -> torch.Tensor:
    """The weight as the chunks see it: autograd sums its per-chunk gradients in this tensor's
    dtype, so a bf16 weight is upcast once here to keep that sum in fp32 (cast back at the end)."""
    return weight.to(torch.promote_types(weight.dtype, weight_grad_dtype))


def _logits(hidden, weight, vocab_size):
    cd = _compute_dtype(hidden.dtype)
    return reference.linear_logits(hidden.to(cd), weight.to(cd), vocab_size)


def fused_linear_logsumexp(hidden, weight, temperature, vocab_size, weight_grad_dtype=torch.float32):
    fn = lambda h, w: (reference.logsumexp(_logits(h, w, vocab_size), temperature),)
    return _over_chunks(fn, vocab_size, [hidden], [_accumulating(weight, weight_grad_dtype)])[0]


def fused_linear_token_logprobs(hidden, weight, tokens, temperature, vocab_size,
                                weight_grad_dtype=torch.float32):
    fn = lambda h, y, w: (reference.token_logprobs(_logits(h, w, vocab_size), y, temperature),)
    return _over_chunks(fn, vocab_size, [hidden, tokens], [_accumulating(weight, weight_grad_dtype)])[0]


def fused_linear_topk_overlap(student_hidden, student_weight, teacher_hidden, teacher_weight, k,
                              mask, temperature, vocab_size):
    def fn(hs, ht, m, ws, wt):
        s, t = _blank_uncounted(m, _logits(hs, ws, vocab_size), _logits(ht, wt, vocab_size))
        return _stats_rows(s, t, k, m, temperature)

    with torch.no_grad():
        return _stats_from_columns(_over_chunks(fn, vocab_size, [student_hidden, teacher_hidden, mask],
                                                [student_weight, teacher_weight]))


def fused_linear_opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, objective,
                          tokens, k, mask, temperature, return_stats, vocab_size,
                          weight_grad_dtype=torch.float32):
    ws = _accumulating(student_weight, weight_grad_dtype)
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    if objective == "topk" and not return_stats:
        # Neither model's lm_head product is kept: S comes from a no-grad pass over the student's
        # logits, then both models are evaluated at S alone, k dot products a row (the teacher's
        # lse cancels in the renormalization), so the backward is k-sparse.
        support = _topk_support(lambda h: _logits(h, student_weight.detach(), vocab_size), vocab_size,
                                [student_hidden], k, mask)
        hidden_size = max(student_hidden.shape[-1], teacher_hidden.shape[-1])

        def fn(hs, ht, ids, m, ws_, wt):
            cd = _compute_dtype(hs.dtype)
            at_support = [torch.einsum("nkh,nh->nk", w.to(cd)[ids], h.to(cd)) for h, w in ((hs, ws_), (ht, wt))]
            return (_renormalized_kl_rows(*at_support, m, temperature),)

        loss = _over_chunks(fn, k * hidden_size, [student_hidden, teacher_hidden, support, mask],
                            [ws, teacher_weight])
        return loss[0], None

    def fn(hs, ht, y, m, ws_, wt):
        return _loss_rows(_logits(hs, ws_, vocab_size), _logits(ht, wt, vocab_size), y, m, objective,
                          k, temperature, return_stats)

    columns = _over_chunks(fn, vocab_size, [student_hidden, teacher_hidden, tokens, mask],
                           [ws, teacher_weight])
    return columns[0], (_stats_from_columns(columns[1:]) if return_stats else None)
