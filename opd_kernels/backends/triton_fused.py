"""Fused-linear backend: OPD losses and statistics from hidden states, logits never in memory.

Implements the ``fused_linear_*`` functions of the backend interface (rows already flattened to
2D, ``vocab_size`` = K filled in by the public layer). Two ways to a gradient:

- Per-row values (reduction "none", ``grad_in_forward=False``, and "topk" always): the forward
  kernels compute logits tiles z = h W^T / tau with ``tl.dot`` and keep only per-row
  statistics; the backward recomputes the tiles, writes one token chunk of dL/du (u = h W^T) at
  a time, and turns it into dh and dW with two GEMMs. Any upstream gradient works.
- Gradient in the forward (``fused_linear_opd_loss_reduced``: "full" and "sampled" reduced to a
  scalar): per token chunk, both lm_head products once by cuBLAS into an fp32 scratch, the
  row statistics and dL/du by the logits backend's Triton kernels over it, then the two GEMMs;
  the backward only scales dh and dW by the upstream scalar.
dW is accumulated in ``weight_grad_dtype`` (fp32 by default) in place, then cast.

FLOPs per call, with P_s = 2 N K Hs and P_t = 2 N K Ht one lm_head product of each model; the
floor counts what no implementation can avoid (the forward products the loss needs, plus the
dense backward's two GEMMs, 2 P_s, where the gradient is dense):
    objective  path               forward             backward                       total          floor
    full       per-row            P_s + P_t           P_s + P_t (recompute) + 2 P_s  4 P_s + 2 P_t  3 P_s + P_t
    full       grad in forward    P_s + P_t + 2 P_s   (a scale)                      3 P_s + P_t    3 P_s + P_t
    sampled    per-row            P_s + P_t           P_s (recompute) + 2 P_s        4 P_s + P_t    3 P_s + P_t
    sampled    grad in forward    P_s + P_t + 2 P_s   (a scale)                      3 P_s + P_t    3 P_s + P_t
    topk       (both)             P_s + 2 N k Ht      4 N k Hs (k-sparse)            ~P_s           P_s
    logsumexp, token log-probs: P_s forward, P_s + 2 P_s backward                    4 P_s          3 P_s
Qwen2.5 1.5B <- 7B, N = 8192: P_s = 3.8 TFLOP, P_t = 8.9 TFLOP, so "full" does 33.1 TFLOP on
the per-row path (62% of the matmul rate over the 20.4 TFLOP floor at best) and the 20.4 TFLOP
floor with the gradient in the forward; "topk" ~3.8 TFLOP, no teacher lm_head product at all.
The gradient-in-forward path pays memory passes instead, per element of the [N, K] logits:
8 B written by the two products (fp32), 8 B read for the statistics, 8 B (4 for "sampled") read
and 2 B written for dL/du, 4 B read by the two GEMMs: ~30 B, ~9 ms at 4.3 TB/s on the shapes
above against ~26 ms of floor matmuls. Each chunk also reads and writes the fp32 dW once
(K Hs 8 B), hence chunks of several hundred rows (``SCRATCH_BYTES``).
``return_stats`` adds the teacher's own top-k and both entropies: free for ``sampled`` and, with
the gradient in the forward, for ``full`` (the same pass over the scratch carries them); + P_t
for ``topk`` (the teacher pass it otherwise skips); + P_s + P_t for the per-row ``full`` (its
pair pass does not carry the top-k; two single-model passes run beside it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from opd_kernels import reference
from opd_kernels.kernels.fused_linear_grad import fused_linear_grad_logits_kernel
from opd_kernels.kernels.fused_linear_kl import fused_linear_kl_kernel, fused_linear_kl_merge_kernel
from opd_kernels.kernels.fused_linear_lse import fused_linear_lse_kernel, fused_linear_lse_merge_kernel
from opd_kernels.kernels.fused_linear_topk import (fused_linear_gather_logits_kernel,
                                                   fused_linear_sparse_grad_kernel,
                                                   fused_linear_sparse_weight_grad_kernel)
from opd_kernels.kernels.logits_grad import reverse_kl_grad_kernel, softmax_grad_kernel
from opd_kernels.ops.triton_logits import (BACKWARD_BLOCK_V, row_pass, row_pass_stats, vocab_block,
                                          warps_for_block)
from opd_kernels.stats import STAT_FIELDS, TopKStats

# The bound on a token chunk's buffers: dL/du [rows, K] in the input dtype for the per-row
# backward; that and the fp32 logits of both models for the gradient in the forward (10 B an
# element for bf16: 700-row chunks at K = 152K). Larger chunks make bigger GEMMs and fewer
# read-modify-writes of the fp32 dW (at K = 152K, Hs = 1536 the dW GEMM of a chunk is
# memory-bound below ~700 rows); the memory is the only cost. Read at each call.
SCRATCH_BYTES = 2**30

# The largest k the running top-k keeps on-chip (the public layer checks it).
MAX_K = 64


@dataclass(frozen=True)
class _Tiles:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int


def _tiles(hidden: torch.Tensor, topk: bool = False, pair: bool = False) -> _Tiles:
    """Hopper-sized tiles on a GPU (bf16/fp16: 128x128 logits, K-blocks of 64, so tl.dot maps to
    HGMMA); fp32 halves the row block. Two live logits tiles (``pair``) or a running top-k beside
    one take 64-wide vocabulary tiles, which keeps them within 255 registers without spills.
    The CPU interpreter has no tensor cores, takes any tile size and pays per operation, so it
    gets no padding rows and wide vocabulary tiles, except where a running top-k is kept: its
    in-kernel sort costs the interpreter per element."""
    rows, width = hidden.shape
    if hidden.is_cuda:
        narrow = topk or pair
        if hidden.dtype == torch.float32:
            return _Tiles(64, 64 if narrow else 128, 32, 8)
        return _Tiles(128, 64 if narrow else 128, 64, 8)
    return _Tiles(min(64, triton.next_power_of_2(max(rows, 1))), 128 if topk else 512,
                  min(128, triton.next_power_of_2(width)), 4)


def _vocab_splits(row_blocks: int, vocab_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split): enough programs to fill the GPU twice when rows are few."""
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    wanted = min(vocab_tiles, max(1, triton.cdiv(2 * units, max(row_blocks, 1))))
    per_split = triton.cdiv(vocab_tiles, wanted)
    return triton.cdiv(vocab_tiles, per_split), per_split


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _k_pad(k: int, block_v: int) -> int:
    k_pad = max(2, triton.next_power_of_2(k))
    if k_pad > block_v:
        raise ValueError(f"k={k} is larger than the fused-linear top-k supports ({block_v})")
    return k_pad


@dataclass
class _RowStats:
    lse: torch.Tensor
    mean_logit: Optional[torch.Tensor] = None   # sum_v p_v z_v (entropy = lse - mean_logit)
    target_logit: Optional[torch.Tensor] = None  # z_y
    topk_ids: Optional[torch.Tensor] = None      # [N, k] int64, descending
    topk_logits: Optional[torch.Tensor] = None   # [N, k] fp32 z at those ids (exact)

    @property
    def entropy(self) -> torch.Tensor:
        return self.lse - self.mean_logit


def _row_stats(hidden, weight, vocab_size, temperature, target=None, entropy=False, k=0,
               splits=None) -> _RowStats:
    """One model's per-row statistics in one pass over its logits tiles (fused_linear_lse.py)."""
    hidden, weight = _rows(hidden), _rows(weight)
    n, width = hidden.shape
    t = _tiles(hidden, topk=k > 0)
    row_blocks, vocab_tiles = triton.cdiv(n, t.block_n), triton.cdiv(vocab_size, t.block_v)
    n_splits, per_split = _vocab_splits(row_blocks, vocab_tiles, hidden.device)
    if splits is not None:  # tests pin the split count to exercise the merge
        per_split = triton.cdiv(vocab_tiles, splits)
        n_splits = triton.cdiv(vocab_tiles, per_split)
    k_pad = _k_pad(k, t.block_v) if k else 1
    part = lambda: torch.empty(n_splits, n, dtype=torch.float32, device=hidden.device)
    part_max, part_sum = part(), part()
    part_zsum = part() if entropy else None
    part_target = part() if target is not None else None
    part_keys = (torch.empty(n_splits, n, k_pad, dtype=torch.int64, device=hidden.device)
                 if k else None)
    fused_linear_lse_kernel[(row_blocks, n_splits)](
        hidden, weight, target, part_max, part_sum, part_zsum, part_target, part_keys,
        n, vocab_size, width, hidden.stride(0), weight.stride(0), 1.0 / temperature, per_split,
        BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h, K_PAD=k_pad,
        num_warps=t.num_warps)
    row = lambda: torch.empty(n, dtype=torch.float32, device=hidden.device)
    out = _RowStats(lse=row(), mean_logit=row() if entropy else None,
                    target_logit=row() if target is not None else None)
    if k:
        out.topk_ids = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
        out.topk_logits = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    merge_rows = 64
    fused_linear_lse_merge_kernel[(triton.cdiv(n, merge_rows),)](
        part_max, part_sum, part_zsum, part_target, part_keys,
        out.lse, out.mean_logit, out.target_logit, out.topk_ids, out.topk_logits,
        n, n_splits, k, BLOCK_N=merge_rows, K_PAD=k_pad)
    return out


def _pair_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, vocab_size,
             temperature, splits=None):
    """(lse_s, lse_t, KL) per row in one pass over both models' tiles (fused_linear_kl.py)."""
    hs, ws, ht, wt = map(_rows, (student_hidden, student_weight, teacher_hidden, teacher_weight))
    n = hs.shape[0]
    t = _tiles(hs if hs.shape[1] >= ht.shape[1] else ht, pair=True)
    row_blocks, vocab_tiles = triton.cdiv(n, t.block_n), triton.cdiv(vocab_size, t.block_v)
    n_splits, per_split = _vocab_splits(row_blocks, vocab_tiles, hs.device)
    if splits is not None:
        per_split = triton.cdiv(vocab_tiles, splits)
        n_splits = triton.cdiv(vocab_tiles, per_split)
    parts = [torch.empty(n_splits, n, dtype=torch.float32, device=hs.device) for _ in range(5)]
    fused_linear_kl_kernel[(row_blocks, n_splits)](
        hs, ws, ht, wt, *parts, n, vocab_size, hs.shape[1], ht.shape[1],
        hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0), 1.0 / temperature, per_split,
        BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h, num_warps=t.num_warps)
    lse_s, lse_t, kl = (torch.empty(n, dtype=torch.float32, device=hs.device) for _ in range(3))
    merge_rows = 128
    fused_linear_kl_merge_kernel[(triton.cdiv(n, merge_rows),)](
        *parts, lse_s, lse_t, kl, n, n_splits, BLOCK_N=merge_rows)
    return lse_s, lse_t, kl


def _gather_logits(hidden, weight, ids, temperature) -> torch.Tensor:
    """z[n, j] = h[n] . W[ids[n, j]] / tau, fp32 [N, k] (fused_linear_topk.py)."""
    hidden, weight = _rows(hidden), _rows(weight)
    n, k = ids.shape
    out = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    if n:
        fused_linear_gather_logits_kernel[(n,)](
            hidden, weight, ids, out, k, hidden.shape[1], hidden.stride(0), weight.stride(0),
            1.0 / temperature, K_PAD=max(2, triton.next_power_of_2(k)),
            BLOCK_H=min(128, triton.next_power_of_2(hidden.shape[1])))
    return out


# ----------------------------------------------------------------------------- backward plans

@dataclass
class _DensePlan:
    """dL/du_v = p_v (alpha + gamma (z^s_v - z^t_v)) + beta [v == y] (see fused_linear_grad.py)."""
    vocab_size: int
    temperature: float
    lse: torch.Tensor
    alpha: torch.Tensor
    beta: Optional[torch.Tensor] = None
    target: Optional[torch.Tensor] = None
    gamma: Optional[torch.Tensor] = None
    teacher_hidden: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    weight_grad_dtype: torch.dtype = torch.float32

    def backward(self, hidden, weight, grad, need_hidden, need_weight):
        hidden, weight = _rows(hidden), _rows(weight)
        n, width = hidden.shape
        k = self.vocab_size
        scale = lambda c: None if c is None else (c * grad).contiguous()
        alpha, beta, gamma = scale(self.alpha), scale(self.beta), scale(self.gamma)
        t = _tiles(hidden)
        chunk_bytes = SCRATCH_BYTES // (k * hidden.element_size())
        chunk = max(t.block_n, chunk_bytes // t.block_n * t.block_n)
        chunk = min(chunk, max(n, 1))
        grad_logits = torch.empty(chunk, k, dtype=hidden.dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = (torch.zeros(weight.shape, dtype=self.weight_grad_dtype, device=weight.device)
                       if need_weight else None)
        th, tw = self.teacher_hidden, self.teacher_weight
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            rows = slice(c0, c1)
            g = grad_logits[: c1 - c0]
            at = lambda x: None if x is None else x[rows]
            fused_linear_grad_logits_kernel[(triton.cdiv(c1 - c0, t.block_n), triton.cdiv(k, t.block_v))](
                hidden[rows], weight, at(th), tw, at(self.target),
                self.lse[rows], alpha[rows], at(beta), at(gamma), g,
                c1 - c0, k, width, 0 if th is None else th.shape[1],
                hidden.stride(0), weight.stride(0), 0 if th is None else th.stride(0),
                0 if tw is None else tw.stride(0), g.stride(0), 1.0 / self.temperature,
                BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h, num_warps=t.num_warps)
            if need_hidden:
                torch.mm(g, weight[:k], out=grad_hidden[rows])
            if need_weight:
                _accumulate_weight_grad(grad_weight[:k], g, hidden[rows])
        grad_logits = g = None  # the chunk scratch is freed before the cast allocates dW's copy
        return grad_hidden, _finish_weight_grad(grad_weight, weight)


# GEMMs with an fp32 output (and, for addmm, an fp32 accumulator) for bf16/fp16 inputs: PyTorch
# 2.11 takes them on CUDA; older releases lack the overloads or reject an fp32 addmm input, and
# take the upcasting path.
_MIXED_GEMM = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 11)


def _logits_into(out, hidden, weight):
    """out = hidden @ weight^T with one rounding, into the (fp32) scratch ``out``."""
    if hidden.dtype == out.dtype:
        torch.mm(hidden, weight.t(), out=out)
    elif hidden.is_cuda and _MIXED_GEMM:  # cuBLAS writes the bf16/fp16 GEMM's fp32 accumulator directly
        torch.mm(hidden, weight.t(), out_dtype=out.dtype, out=out)
    else:  # no mixed-dtype GEMM on the CPU
        torch.mm(hidden.to(out.dtype), weight.t().to(out.dtype), out=out)


def _accumulate_weight_grad(grad_weight, grad_logits, hidden):
    """grad_weight[:K] += grad_logits^T hidden in place, the product rounded once at most."""
    lhs = grad_logits.t()
    if lhs.dtype == grad_weight.dtype:
        grad_weight.addmm_(lhs, hidden)
    elif lhs.is_cuda and _MIXED_GEMM and grad_weight.dtype == torch.float32:
        # cuBLAS accumulates the bf16/fp16 GEMM into the fp32 buffer (beta = 1): no temporary
        torch.addmm(grad_weight, lhs, hidden, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight.addmm_(lhs.to(grad_weight.dtype), hidden.to(grad_weight.dtype))


def _finish_weight_grad(grad_weight, weight):
    """The accumulator of the first K rows (or of all) in the weight's dtype and shape."""
    if grad_weight is None:
        return None
    if grad_weight.shape[0] == weight.shape[0]:
        return grad_weight.to(weight.dtype)
    out = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    out[: grad_weight.shape[0]] = grad_weight
    return out


@dataclass
class _SparsePlan:
    """dL/du nonzero only at ids [N, k]: grad_logits [N, k] fp32 (1/tau folded in). Each row of
    dW is summed once, in fp32 and in a fixed order (deterministic), so ``weight_grad_dtype``
    (the dtype of sums across chunks) has nothing to do here."""
    ids: torch.Tensor
    grad_logits: torch.Tensor

    def backward(self, hidden, weight, grad, need_hidden, need_weight):
        hidden, weight = _rows(hidden), _rows(weight)
        n, width = hidden.shape
        k = self.ids.shape[1]
        g = (self.grad_logits * grad[:, None]).contiguous()
        block_h = min(128, triton.next_power_of_2(width))
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        if n and need_hidden:
            fused_linear_sparse_grad_kernel[(n, triton.cdiv(width, block_h))](
                weight, self.ids, g, grad_hidden, k, width, weight.stride(0), width,
                K_PAD=max(2, triton.next_power_of_2(k)), BLOCK_H=block_h)
        grad_weight = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            sorted_ids, order = torch.sort(self.ids.reshape(-1), stable=True)
            if n:
                fused_linear_sparse_weight_grad_kernel[(n * k, triton.cdiv(width, block_h))](
                    hidden, sorted_ids, order // k, g.reshape(-1)[order], grad_weight, n * k,
                    width, hidden.stride(0), width, BLOCK_E=32, BLOCK_H=block_h)
        return grad_hidden, _finish_weight_grad(grad_weight, weight)


class _FromPlan(torch.autograd.Function):
    """Attaches a backward plan to per-row values computed without autograd."""

    @staticmethod
    def forward(ctx, hidden, weight, values, plan):
        ctx.save_for_backward(hidden, weight)
        ctx.plan = plan
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        grad_hidden, grad_weight = ctx.plan.backward(
            hidden, weight, grad.float(), ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_hidden, grad_weight, None, None


def _attach(hidden, weight, values, plan):
    if not (hidden.requires_grad or weight.requires_grad) or not torch.is_grad_enabled():
        return values
    return _FromPlan.apply(hidden, weight, values, plan)


def _masked(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return values if mask is None else torch.where(mask, values, torch.zeros_like(values))


def _same_dtype(hidden, weight):
    return hidden if hidden.dtype == weight.dtype else hidden.to(weight.dtype)


# ----------------------------------------------------------------------------- backend interface

def fused_linear_logsumexp(hidden, weight, temperature, vocab_size, weight_grad_dtype=torch.float32):
    hidden = _same_dtype(hidden, weight)
    with torch.no_grad():
        st = _row_stats(hidden.detach(), weight.detach(), vocab_size, temperature)
    alpha = torch.full_like(st.lse, 1.0 / temperature)
    plan = _DensePlan(vocab_size, temperature, st.lse, alpha, weight_grad_dtype=weight_grad_dtype)
    return _attach(hidden, weight, st.lse, plan)


def fused_linear_token_logprobs(hidden, weight, tokens, temperature, vocab_size,
                                weight_grad_dtype=torch.float32):
    hidden = _same_dtype(hidden, weight)
    tokens = tokens.contiguous()
    with torch.no_grad():
        st = _row_stats(hidden.detach(), weight.detach(), vocab_size, temperature, target=tokens)
    alpha = torch.full_like(st.lse, -1.0 / temperature)
    plan = _DensePlan(vocab_size, temperature, st.lse, alpha, beta=-alpha, target=tokens,
                      weight_grad_dtype=weight_grad_dtype)
    return _attach(hidden, weight, st.target_logit - st.lse, plan)


def fused_linear_reverse_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                            temperature, vocab_size, weight_grad_dtype=torch.float32):
    return fused_linear_opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                 "full", None, 1, mask, temperature, False, vocab_size,
                                 weight_grad_dtype)[0]


def _overlap_stats(student: _RowStats, teacher: _RowStats, teacher_at_student_topk: torch.Tensor,
                   k: int, mask: Optional[torch.Tensor]) -> TopKStats:
    """The TopKStats fields from both passes' top-k, lse and entropy, and z_t at S: every sum
    over S ∩ T runs over the student's k ids, so nothing else of either vocabulary is needed."""
    shared = (student.topk_ids[:, :, None] == teacher.topk_ids[:, None, :]).any(-1)
    n_shared = shared.sum(-1)
    zero = torch.zeros_like(teacher_at_student_topk)
    log_p = student.topk_logits - student.lse[:, None]
    log_q = teacher_at_student_topk - teacher.lse[:, None]
    student_mass = torch.where(shared, log_p.exp(), zero).sum(-1)
    teacher_mass = torch.where(shared, log_q.exp(), zero).sum(-1)
    log_p_bar = log_p - student_mass.log()[:, None]
    log_q_bar = log_q - teacher_mass.log()[:, None]
    terms = torch.where(shared, log_p_bar.exp() * (log_q_bar - log_p_bar), zero).sum(-1)
    nan = torch.full_like(terms, float("nan"))
    advantage = torch.where(n_shared > 0, terms / n_shared.clamp(min=1), nan)
    h_p, h_q = student.entropy, teacher.entropy
    fields = dict(overlap=n_shared.float() / k, student_mass=student_mass,
                  teacher_mass=teacher_mass, overlap_advantage=advantage, student_entropy=h_p,
                  teacher_entropy=h_q, entropy_gap=(h_q - h_p).abs())
    if mask is not None:
        fields = {name: torch.where(mask, v, nan) for name, v in fields.items()}
    return TopKStats(**fields, mask=mask)


def fused_linear_topk_overlap(student_hidden, student_weight, teacher_hidden, teacher_weight, k,
                              mask, temperature, vocab_size):
    with torch.no_grad():
        hs, ht = _same_dtype(student_hidden, student_weight), _same_dtype(teacher_hidden, teacher_weight)
        student = _row_stats(hs, student_weight, vocab_size, temperature, entropy=True, k=k)
        teacher = _row_stats(ht, teacher_weight, vocab_size, temperature, entropy=True, k=k)
        at_s = _gather_logits(ht, teacher_weight, student.topk_ids, temperature)
        return _overlap_stats(student, teacher, at_s, k, mask)


def fused_linear_opd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, objective,
                          tokens, k, mask, temperature, return_stats, vocab_size,
                          weight_grad_dtype=torch.float32):
    hs = _same_dtype(student_hidden, student_weight)
    ht = _rows(_same_dtype(teacher_hidden.detach(), teacher_weight))
    wt = _rows(teacher_weight.detach())
    hs_, ws_ = hs.detach(), student_weight.detach()
    stats = None
    with torch.no_grad():
        if objective == "topk":
            student = _row_stats(hs_, ws_, vocab_size, temperature, entropy=return_stats, k=k)
            teacher_at_s = _gather_logits(ht, wt, student.topk_ids, temperature)
            # KL(p̄ || q̄) over S: both lse cancel in the renormalization (reference.renormalized_kl)
            log_p_bar = torch.log_softmax(student.topk_logits, dim=-1)
            log_q_bar = torch.log_softmax(teacher_at_s, dim=-1)
            p_bar = log_p_bar.exp()
            values = (p_bar * (log_p_bar - log_q_bar)).sum(-1)
            grad_logits = p_bar * (log_p_bar - log_q_bar - values[:, None]) / temperature
            if mask is not None:
                grad_logits = torch.where(mask[:, None], grad_logits, torch.zeros_like(grad_logits))
            plan = _SparsePlan(student.topk_ids, grad_logits)
            if return_stats:
                teacher = _row_stats(ht, wt, vocab_size, temperature, entropy=True, k=k)
                stats = _overlap_stats(student, teacher, teacher_at_s, k, mask)
        elif objective == "sampled":
            tokens = tokens.contiguous()
            stat_k = k if return_stats else 0
            student = _row_stats(hs_, ws_, vocab_size, temperature, target=tokens,
                                 entropy=return_stats, k=stat_k)
            teacher = _row_stats(ht, wt, vocab_size, temperature, target=tokens,
                                 entropy=return_stats, k=stat_k)
            log_p_y = student.target_logit - student.lse
            reward = _masked(teacher.target_logit - teacher.lse - log_p_y, mask)
            values = -reward * log_p_y
            plan = _DensePlan(vocab_size, temperature, student.lse, reward / temperature,
                              beta=-reward / temperature, target=tokens,
                              weight_grad_dtype=weight_grad_dtype)
            if return_stats:
                teacher_at_s = _gather_logits(ht, wt, student.topk_ids, temperature)
                stats = _overlap_stats(student, teacher, teacher_at_s, k, mask)
        elif objective == "full":
            lse_s, lse_t, values = _pair_kl(hs_, ws_, ht, wt, vocab_size, temperature)
            gamma = _masked(torch.full_like(values, 1.0 / temperature), mask)
            alpha = gamma * (lse_t - lse_s - values)
            plan = _DensePlan(vocab_size, temperature, lse_s, alpha, gamma=gamma, teacher_hidden=ht,
                              teacher_weight=wt, weight_grad_dtype=weight_grad_dtype)
            if return_stats:
                stats = fused_linear_topk_overlap(hs_, ws_, ht, wt, k, mask, temperature, vocab_size)
        else:
            raise ValueError(f"objective must be 'full', 'sampled' or 'topk', got {objective!r}")
        values = _masked(values, mask)
    return _attach(hs, student_weight, values, plan), stats


# ----------------------------------------------------------------------------- gradient in the forward

class _GradInForward(torch.autograd.Function):
    """A scalar loss whose student gradients were computed in its forward for an upstream 1:
    the backward only scales them by the upstream scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        scaled = lambda t: None if t is None else t * grad.to(t.dtype)
        grad_hidden, grad_weight = ctx.saved_tensors
        return scaled(grad_hidden), scaled(grad_weight), None, None, None


def _row_weight(mask, n, reduction, device) -> torch.Tensor:
    """dLoss/dL_r on counted rows, a device scalar: 1 for 'sum', 1 / max(count, 1) for 'mean'
    (the count stays on the device: no host sync). Uncounted rows get 0 from the kernels' mask."""
    one = torch.ones((), dtype=torch.float32, device=device)
    if reduction == "sum":
        return one
    count = one * n if mask is None else mask.sum().float()
    return one / count.clamp(min=1)


def _dense_loss_and_grads(hs, ws, ht, wt, objective, tokens, k, mask, temperature, return_stats,
                          vocab_size, weight_grad_dtype, reduction, need_hidden, need_weight):
    """The 'full' and 'sampled' losses reduced to a scalar, with dLoss/dh_s and dLoss/dW_s for an
    upstream gradient of 1, one token chunk at a time (see fused_linear_opd_loss_reduced)."""
    n, width = hs.shape
    device = hs.device
    ws, wt = ws[:vocab_size], wt[:vocab_size]
    scratch_dtype = torch.promote_types(hs.dtype, torch.float32)
    row_bytes = vocab_size * (2 * scratch_dtype.itemsize + hs.element_size())
    chunk = min(n, max(1, SCRATCH_BYTES // row_bytes))
    student_logits = torch.empty(chunk, vocab_size, dtype=scratch_dtype, device=device)
    teacher_logits = torch.empty_like(student_logits)
    grad_logits = torch.empty(chunk, vocab_size, dtype=hs.dtype, device=device)
    grad_hidden = torch.empty_like(hs) if need_hidden else None
    grad_weight = (torch.zeros(vocab_size, width, dtype=weight_grad_dtype, device=device)
                   if need_weight else None)
    row_weight = _row_weight(mask, n, reduction, device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    stats = []
    inv_tau = 1.0 / temperature
    block_v = vocab_block(vocab_size, BACKWARD_BLOCK_V)
    for c0 in range(0, n, chunk):
        rows = slice(c0, min(n, c0 + chunk))
        m = rows.stop - c0
        z_s, z_t, g = student_logits[:m], teacher_logits[:m], grad_logits[:m]
        chunk_mask = None if mask is None else mask[rows]
        chunk_tokens = tokens[rows] if objective == "sampled" else None
        # each lm_head product once: the logits stay in the scratch for the statistics and dL/du
        _logits_into(z_s, hs[rows], ws)
        _logits_into(z_t, ht[rows], wt)
        rp = row_pass(z_s, z_t, chunk_tokens, chunk_mask, k if return_stats else 0, temperature)
        grid = (m, triton.cdiv(vocab_size, block_v))
        if objective == "full":
            # dKL/du_v = (1/tau) p_v (log p_v - log q_v - KL), times the row weight
            total += rp.field("kl").sum()
            coef = (row_weight * inv_tau).expand(m).contiguous()
            reverse_kl_grad_kernel[grid](
                z_s, z_t, g, rp.field("max_s"), rp.field("logsum_s"), rp.field("max_t"),
                rp.field("logsum_t"), rp.field("kl"), coef, chunk_mask, vocab_size,
                z_s.stride(0), z_t.stride(0), g.stride(0), inv_tau, BLOCK_V=block_v,
                num_warps=warps_for_block(block_v))
        else:
            # L = -r log p(y), r detached: dL/du = -(r/tau)(onehot(y) - p), times the row weight
            log_p_y = rp.field("student_logprob")
            reward = rp.field("teacher_logprob") - log_p_y  # 0 at uncounted rows
            total += (-reward * log_p_y).sum()
            coef_y = (-reward * row_weight * inv_tau).contiguous()
            softmax_grad_kernel[grid](
                z_s, g, rp.field("max_s"), rp.field("logsum_s"), -coef_y, coef_y, chunk_tokens,
                chunk_mask, vocab_size, z_s.stride(0), g.stride(0), inv_tau, BLOCK_V=block_v,
                num_warps=warps_for_block(block_v))
        if need_hidden:
            torch.mm(g, ws, out=grad_hidden[rows])
        if need_weight:
            _accumulate_weight_grad(grad_weight, g, hs[rows])
        if return_stats:
            stats.append(row_pass_stats(rp))
    del student_logits, teacher_logits, grad_logits
    stats = (TopKStats(**{name: torch.cat([s.tensors()[name] for s in stats])
                          for name in STAT_FIELDS}) if return_stats else None)
    return total * row_weight, grad_hidden, grad_weight, stats


def fused_linear_opd_loss_reduced(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                  objective, tokens, k, mask, temperature, return_stats, vocab_size,
                                  weight_grad_dtype, reduction):
    """fused_linear_opd_loss reduced to a scalar ('mean' or 'sum'), its gradient computed in the
    forward.

    With L = sum_r w_r L_r (w_r = 1 for 'sum', 1/count for 'mean', 0 on uncounted rows) the
    upstream gradient of row r is g w_r, g the one upstream scalar. So the forward computes
    dL/du for g = 1, turns it into dh and dW at once, and the backward scales them by g: exact
    for any g, and the logits are never recomputed. Per token chunk, over a scratch of fp32
    [chunk, K] logits of each model and dL/du in the input dtype (``SCRATCH_BYTES`` in all):
      1. z_s = h_s W_s^T and z_t = h_t W_t^T by cuBLAS, once each, fp32 output (no rounding of
         the logits; "sampled" needs z_t only for lse_t and z_t[y], but the product is the cost);
      2. one Triton pass over both (row_stats, as for the logits form): lse, KL or the token
         log-probs, and the top-k statistics when asked (free: the same read);
      3. one Triton pass writing dL/du (logits_grad, the logits form's backward kernels, with
         the row weights folded into their per-row coefficients);
      4. dh[chunk] = dL/du W_s and dW += dL/du^T h_s (fp32 accumulator, cast at the end).
    "topk" keeps the per-row path (its backward is k-sparse, already cheap; no teacher product
    to save): the autograd Function of fused_linear_opd_loss, then the reduction. Without a
    student that needs a gradient, or without rows, this is that path for every objective.
    """
    wants_grad = torch.is_grad_enabled() and (student_hidden.requires_grad
                                              or student_weight.requires_grad)
    if objective == "topk" or not wants_grad or student_hidden.shape[0] == 0:
        per_row, stats = fused_linear_opd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, objective, tokens, k,
            mask, temperature, return_stats, vocab_size, weight_grad_dtype)
        return reference.reduce(per_row, mask, reduction), stats
    hs = _same_dtype(student_hidden, student_weight)
    ht = _rows(_same_dtype(teacher_hidden.detach(), teacher_weight))
    with torch.no_grad():
        loss, grad_hidden, grad_weight, stats = _dense_loss_and_grads(
            _rows(hs.detach()), _rows(student_weight.detach()), ht, _rows(teacher_weight.detach()),
            objective, None if tokens is None else tokens.contiguous(),
            k, None if mask is None else mask.contiguous(), temperature, return_stats, vocab_size,
            weight_grad_dtype, reduction, hs.requires_grad, student_weight.requires_grad)
        # the accumulator (fp32 by default) is cast now and freed before the backward
        grad_weight = _finish_weight_grad(grad_weight, student_weight)
    return _GradInForward.apply(hs, student_weight, loss, grad_hidden, grad_weight), stats
