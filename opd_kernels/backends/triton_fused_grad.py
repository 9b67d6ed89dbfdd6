"""The student's gradients of the fused-linear backend (backends/triton_fused.py): dh, dW and db
from an objective's GradForm, by recomputation in the backward or inside the forward.

- Per-row values (``attach``): the backward recomputes the student's logits tiles (and the
  teacher's where the form has a reverse, forward or mixture term), writes one token chunk of
  dL/du (u = h W^T + b) at a time with fused_linear_grad.py, and turns it into dh = dU W,
  dW += dU^T h and db += sum_rows dU; the sparse part of the form (k ids a row) goes through
  fused_linear_topk.py's kernels and adds to the same buffers (k-sparse: nothing of size V).
  Any upstream gradient works.
- Gradient in the forward (``dense_loss_and_grads``): per token chunk both lm_head products once
  by cuBLAS into an fp32 scratch (the bias added in place), a logits backend's passes and
  gradient over it (logits_form.py, with the kernels it is given: the Triton ones here, the
  native ones for backends/cpp_fused.py), then the same GEMMs; the backward only scales dh, dW
  and db by the upstream scalar.
dW and db are accumulated in place (dW in ``weight_grad_dtype``, fp32 by default; db in fp32),
then cast to the parameter's dtype: an fp32 master weight beside bf16 activations gets its
gradient in fp32 with no bf16 rounding of the sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..kernels.fused_linear_grad import fused_linear_grad_logits_kernel
from ..kernels.fused_linear_topk import (fused_linear_sparse_grad_kernel,
                                         fused_linear_sparse_weight_grad_kernel)
from ..objectives import GradForm, Need
from ..stats import TopKStats
from . import logits_form


@dataclass(frozen=True)
class Side:
    """One model as the kernels read it: rows with a contiguous last axis, the weight and bias
    detached and in the activations' dtype (an fp32 master weight beside bf16 activations is
    cast once, as autocast does), ``cap`` the soft-cap (0 = none)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    cap: float

    @classmethod
    def of(cls, model) -> "Side":
        hidden = _rows(model.hidden.detach())
        as_hidden = lambda t: None if t is None else _rows(t.detach().to(hidden.dtype))
        return cls(hidden, as_hidden(model.weight), as_hidden(model.bias), model.softcap or 0.0)

    @property
    def softcap(self) -> Optional[float]:
        return self.cap or None


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass(frozen=True)
class Tiles:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int


def tiles(hidden: torch.Tensor, topk: bool = False, pair: bool = False) -> Tiles:
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
            return Tiles(64, 64 if narrow else 128, 32, 8)
        return Tiles(128, 64 if narrow else 128, 64, 8)
    return Tiles(min(64, triton.next_power_of_2(max(rows, 1))), 128 if topk else 512,
                 min(128, triton.next_power_of_2(width)), 4)


@dataclass
class Backward:
    """How to turn per-row upstream gradients into the student's dh, dW, db: the GradForm (for an
    upstream gradient of 1, in x units) with the normalizers it is relative to. ``sparse_du``:
    the form's sparse values already times dx/du = softcap'(z) / tau at their ids."""

    student: Side
    teacher: Optional[Side]
    vocab_size: int
    temperature: float
    form: GradForm
    lse_s: torch.Tensor
    scratch_bytes: int  # the bound on a chunk's dL/du (triton_fused.SCRATCH_BYTES)
    lse_t: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    sparse_du: Optional[torch.Tensor] = None
    weight_grad_dtype: torch.dtype = torch.float32

    def __call__(self, grad: torch.Tensor, need_hidden: bool, need_weight: bool, need_bias: bool):
        """(dh, dW [K, H], db [K]) for the per-row upstream gradient ``grad`` (fp32 [N])."""
        scale = grad if self.mask is None else torch.where(self.mask, grad, torch.zeros_like(grad))
        s, k = self.student, self.vocab_size
        n, width = s.hidden.shape
        dense, device = self.form.dense, s.hidden.device
        weight_dtype = self.weight_grad_dtype if dense else torch.float32
        new = torch.empty if dense else torch.zeros  # a sparse-only gradient adds to zeros
        grad_hidden = new(n, width, dtype=s.hidden.dtype, device=device) if need_hidden else None
        grad_weight = torch.zeros(k, width, dtype=weight_dtype, device=device) if need_weight else None
        grad_bias = torch.zeros(k, dtype=torch.float32, device=device) if need_bias else None
        if dense:
            self._dense(scale.contiguous(), grad_hidden, grad_weight, grad_bias)
        if self.sparse_du is not None:
            sparse_backward(s, self.form.sparse_ids, self.sparse_du * scale[:, None], grad_hidden,
                            grad_weight, grad_bias)
        return grad_hidden, grad_weight, grad_bias

    def _dense(self, scale, grad_hidden, grad_weight, grad_bias):
        s, form, k = self.student, self.form, self.vocab_size
        n, width = s.hidden.shape
        # the teacher's tile is recomputed only for the terms that read q
        t = self.teacher if (form.reverse or form.forward or form.mixture) else None
        tl_ = tiles(s.hidden, pair=t is not None)
        chunk = self.scratch_bytes // (k * s.hidden.element_size()) // tl_.block_n * tl_.block_n
        chunk = min(max(tl_.block_n, chunk), max(n, 1))
        grad_logits = torch.empty(chunk, k, dtype=s.hidden.dtype, device=s.hidden.device)
        shift = form.shift.float().contiguous()
        beta = form.beta if form.mixture else 0.5
        for c0 in range(0, n, chunk):
            rows = slice(c0, min(n, c0 + chunk))
            m = rows.stop - c0
            g = grad_logits[:m]
            if t is None:
                teacher = (None, None, None, None, 0, 0, 0, 0.0)
            else:
                teacher = (t.hidden[rows], t.weight, t.bias, self.lse_t[rows], t.hidden.shape[1],
                           t.hidden.stride(0), t.weight.stride(0), t.cap)
            th, tw, tb, lse_t, t_width, t_stride_h, t_stride_w, cap_t = teacher
            fused_linear_grad_logits_kernel[(triton.cdiv(m, tl_.block_n), triton.cdiv(k, tl_.block_v))](
                s.hidden[rows], s.weight, s.bias, th, tw, tb, self.lse_s[rows], lse_t, shift[rows],
                scale[rows], g, m, k, width, t_width, s.hidden.stride(0), s.weight.stride(0),
                t_stride_h, t_stride_w, g.stride(0), 1.0 / self.temperature, s.cap, cap_t,
                form.reverse, form.forward, form.mixture, math.log(beta), math.log1p(-beta),
                BLOCK_N=tl_.block_n, BLOCK_V=tl_.block_v, BLOCK_H=tl_.block_h,
                num_warps=tl_.num_warps)
            accumulate(g, s, rows, grad_hidden, grad_weight, grad_bias)


def accumulate(g, side: Side, rows: slice, grad_hidden, grad_weight, grad_bias):
    """One token chunk's dL/du [rows, K] into dh[rows] = g W, dW += g^T h, db += sum_rows g."""
    k = g.shape[1]
    if grad_hidden is not None:
        torch.mm(g, side.weight[:k], out=grad_hidden[rows])
    if grad_weight is not None:
        _accumulate_weight_grad(grad_weight, g, side.hidden[rows])
    if grad_bias is not None:
        grad_bias += g.sum(0, dtype=torch.float32)


def sparse_backward(side: Side, ids, grad_logits, grad_hidden, grad_weight, grad_bias):
    """Add the gradient that is non-zero at ``ids`` [N, k] only (``grad_logits`` fp32 [N, k], dL/du
    there) to dh, dW and db (fused_linear_topk.py: no atomics, deterministic)."""
    n, k = ids.shape
    width = side.hidden.shape[1]
    if n == 0:
        return
    g = grad_logits.float().contiguous()
    ids = ids.contiguous()
    block_h = min(128, triton.next_power_of_2(width))
    k_pad = max(2, triton.next_power_of_2(k))
    if grad_hidden is not None:
        fused_linear_sparse_grad_kernel[(n, triton.cdiv(width, block_h))](
            side.weight, ids, g, grad_hidden, k, width, side.weight.stride(0),
            grad_hidden.stride(0), K_PAD=k_pad, BLOCK_H=block_h)
    if grad_weight is not None or grad_bias is not None:
        sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)
        # without a dW to fill, a one-column scratch carries the run sums to db alone
        out = grad_weight if grad_weight is not None else torch.zeros(
            grad_bias.shape[0], 1, dtype=torch.float32, device=g.device)
        fused_linear_sparse_weight_grad_kernel[(n * k, triton.cdiv(out.shape[1], block_h))](
            side.hidden, sorted_ids, order // k, g.reshape(-1)[order], out, grad_bias, n * k,
            out.shape[1], side.hidden.stride(0), out.stride(0), BLOCK_E=32, BLOCK_H=block_h)


# GEMMs with an fp32 output (and, for addmm, an fp32 accumulator) for bf16/fp16 inputs: PyTorch
# 2.11 takes them on CUDA; older releases lack the overloads or reject an fp32 addmm input, and
# take the upcasting path.
_MIXED_GEMM = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 11)


def logits_into(out, hidden, weight):
    """out = hidden @ weight^T with one rounding, into the (fp32) scratch ``out``."""
    if hidden.dtype == out.dtype:
        torch.mm(hidden, weight.t(), out=out)
    elif hidden.is_cuda and _MIXED_GEMM:  # cuBLAS writes the bf16/fp16 GEMM's fp32 accumulator directly
        torch.mm(hidden, weight.t(), out_dtype=out.dtype, out=out)
    else:  # no mixed-dtype GEMM on the CPU
        torch.mm(hidden.to(out.dtype), weight.t().to(out.dtype), out=out)


def _accumulate_weight_grad(grad_weight, grad_logits, hidden):
    """grad_weight += grad_logits^T hidden in place, the product rounded once at most."""
    lhs = grad_logits.t()
    if lhs.dtype == grad_weight.dtype:
        grad_weight.addmm_(lhs, hidden)
    elif lhs.is_cuda and _MIXED_GEMM and grad_weight.dtype == torch.float32:
        # cuBLAS accumulates the bf16/fp16 GEMM into the fp32 buffer (beta = 1): no temporary
        torch.addmm(grad_weight, lhs, hidden, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight.addmm_(lhs.to(grad_weight.dtype), hidden.to(grad_weight.dtype))


def finish(grad: Optional[torch.Tensor], like) -> Optional[torch.Tensor]:
    """An accumulator of the first K rows as the gradient of a parameter of ``like``'s
    (shape, dtype)."""
    if grad is None:
        return None
    shape, dtype = like
    if grad.shape[0] == shape[0]:
        return grad.to(dtype)
    out = torch.zeros(shape, dtype=dtype, device=grad.device)
    out[: grad.shape[0]] = grad
    return out


def _like(param: Optional[torch.Tensor]):
    return None if param is None else (param.shape, param.dtype)


class _FromPlan(torch.autograd.Function):
    """Attaches a Backward to per-row values computed without autograd."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, values, plan):
        ctx.plan = plan
        ctx.likes = (_like(weight), _like(bias))
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh, dw, db = ctx.plan(grad.float(), need_h, need_w, need_b)
        # the chunk scratch is gone by now: the casts below do not add to the backward's peak
        return dh, finish(dw, ctx.likes[0]), finish(db, ctx.likes[1]), None, None


def wants_grad(model) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (model.hidden, model.weight, model.bias))


def attach(model, values: torch.Tensor, plan: Backward) -> torch.Tensor:
    if not wants_grad(model):
        return values
    return _FromPlan.apply(model.hidden, model.weight, model.bias, values, plan)


# ----------------------------------------------------------------------------- gradient in the forward

class _GradInForward(torch.autograd.Function):
    """A scalar loss whose student gradients were computed in its forward for an upstream 1:
    the backward only scales them by the upstream scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, grads):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        scaled = lambda t: None if t is None else t * grad.to(t.dtype)
        return (*(scaled(t) for t in ctx.grads), None, None)


def _row_weight(mask, n, reduction, device) -> torch.Tensor:
    """dLoss/dL_r on counted rows, a device scalar: 1 for 'sum', 1 / max(count, 1) for 'mean'
    (the count stays on the device: no host sync)."""
    one = torch.ones((), dtype=torch.float32, device=device)
    if reduction == "sum":
        return one
    count = one * n if mask is None else mask.sum().float()
    return one / count.clamp(min=1)


def reduced_loss(call, s: Side, t: Side, needs: frozenset, tokens, with_stats: bool,
                 scratch_bytes: int, kernels: logits_form.Kernels):
    """The loss reduced to a scalar ('mean' or 'sum') with dLoss/dh_s, dW_s, db_s computed in the
    forward, and the chunks' TopKStats ``with_stats`` (``needs`` then holds the statistics' too).

    With L = sum_r w_r L_r (w_r = 1 for 'sum', 1/count for 'mean', 0 on uncounted rows) the
    upstream gradient of row r is g w_r, g the one upstream scalar. So the forward computes
    dL/du for g = 1, turns it into dh, dW and db at once, and the backward scales them by g:
    exact for any g, and the logits are never recomputed. Per token chunk, over a scratch of
    fp32 [chunk, K] logits of each model and dL/du in the activations' dtype (``scratch_bytes``;
    dL/du of fp32 activations over the teacher's logits, see ``scratch_rows``):
      1. u_s = h_s W_s^T (+ b_s) and u_t likewise by cuBLAS, once each, fp32 output (no rounding
         of the logits);
      2. the logits-form passes (``kernels``) over both (lse, both KLs, token log-probs, mixture
         sums, top-k statistics as asked: one read), then the objective's from_passes;
      3. its gradient pass writing dL/du (the row weights in its per-row scale; 1/tau and the
         soft-cap's derivative inside); steps 2 and 3 a row at a time, the row's second read
         from cache, where the kernels and the objective allow (logits_form.one_read_form);
      4. dh[chunk] = dL/du W_s, dW += dL/du^T h_s, db += sum_rows dL/du (fp32 accumulators).
    """
    student = call.student
    n, width = s.hidden.shape
    device, k = s.hidden.device, call.vocab_size
    need = [t is not None and t.requires_grad for t in (student.hidden, student.weight, student.bias)]
    grad_hidden = torch.empty_like(s.hidden) if need[0] else None
    grad_weight = torch.zeros(k, width, dtype=call.weight_grad_dtype, device=device) if need[1] else None
    grad_bias = torch.zeros(k, dtype=torch.float32, device=device) if need[2] else None
    mask = None if call.mask is None else call.mask.contiguous()
    row_weight = _row_weight(mask, n, call.reduction, device)
    total, stats = _chunks(call, s, t, needs, tokens, mask, row_weight, with_stats,
                           (grad_hidden, grad_weight, grad_bias), scratch_bytes, kernels)
    with torch.no_grad():
        # the scratch is freed (_chunks returned): the accumulators are cast (fp32 by default)
        # and freed before the backward
        grads = (grad_hidden, finish(grad_weight, _like(student.weight)),
                 finish(grad_bias, _like(student.bias)))
    loss = _GradInForward.apply(student.hidden, student.weight, student.bias, total * row_weight, grads)
    return loss, (TopKStats.cat(stats) if with_stats else None)


def _scratch_dtype(hidden_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(hidden_dtype, torch.float32)


def scratch_rows(n: int, vocab: int, scratch_bytes: int, hidden_dtype: torch.dtype) -> int:
    """The rows of one chunk of ``reduced_loss``: both models' fp32 logits and dL/du (in the
    activations' dtype) within ``scratch_bytes``. dL/du of fp32 activations is written over the
    teacher's logits, which its pass reads element by element before: two buffers, not three,
    and a smaller footprint in the caches the GEMMs that follow read."""
    scratch = _scratch_dtype(hidden_dtype).itemsize
    grad_bytes = 0 if scratch == hidden_dtype.itemsize else hidden_dtype.itemsize
    row_bytes = vocab * (2 * scratch + grad_bytes)
    return min(n, max(1, scratch_bytes // row_bytes))


def _chunks(call, s: Side, t: Side, needs, tokens, mask, row_weight, with_stats, grads,
            scratch_bytes, kernels) -> tuple:
    """Steps 1-4 of ``reduced_loss`` over every token chunk: (sum of the counted rows' values,
    the chunks' TopKStats); the gradients go into ``grads`` (dh, dW, db accumulators or None)."""
    n, k, device = s.hidden.shape[0], call.vocab_size, s.hidden.device
    chunk = scratch_rows(n, k, scratch_bytes, s.hidden.dtype)
    student_logits = torch.empty(chunk, k, dtype=_scratch_dtype(s.hidden.dtype), device=device)
    teacher_logits = torch.empty_like(student_logits)
    grad_logits = (teacher_logits if teacher_logits.dtype == s.hidden.dtype
                   else torch.empty(chunk, k, dtype=s.hidden.dtype, device=device))
    settings = dict(temperature=call.temperature, student_softcap=s.softcap,
                    teacher_softcap=t.softcap)
    row_form = logits_form.one_read_form(kernels, call.objective, call.params)
    # every row's dLoss/dL_r, 0 on uncounted rows
    row_scale = (row_weight.expand(n) if mask is None else torch.where(mask, row_weight, 0.0)).float()
    if row_form is not None:  # its scale is that of dL/dx: 1/tau in it, once for all chunks
        caps = (logits_form.cap(s.softcap), logits_form.cap(t.softcap))
        x_scale = row_scale * (1.0 / call.temperature)
    parts = []  # a chunk's (values, PassResults, RowPass), or the one-read kernel's RowPass
    for c0 in range(0, n, chunk):
        rows = slice(c0, min(n, c0 + chunk))
        m = rows.stop - c0
        z_s, z_t, g = student_logits[:m], teacher_logits[:m], grad_logits[:m]
        chunk_mask = None if mask is None else mask[rows]
        chunk_tokens = None if tokens is None else tokens[rows]
        # each lm_head product once: the logits stay in the scratch for the passes and dL/du
        for z, side in ((z_s, s), (z_t, t)):
            logits_into(z, side.hidden[rows], side.weight[:k])
            if side.bias is not None:
                z += side.bias[:k]
        if row_form is not None:
            parts.append(kernels.row_pass_grad(
                z_s, z_t, chunk_tokens, chunk_mask, call.k if Need.SUPPORT in needs else 0,
                call.temperature, caps, row_form, x_scale[rows], g))
        else:
            r, rp = logits_form.passes(kernels, z_s, z_t, needs=needs, tokens=chunk_tokens,
                                       mask=chunk_mask, k=call.k,
                                       beta=call.params.get("beta", 0.5), **settings)
            values, form = call.objective.from_passes(r, **call.params)
            logits_form.gradient(kernels, z_s, z_t, rp, form, row_scale[rows], mask=chunk_mask,
                                 out=g, **settings)
            parts.append((values, r, rp))
        accumulate(g, s, rows, *grads)
    if row_form is not None:  # every row's values and statistics at once, from its fields
        rp = logits_form.RowPass.cat(parts)
        r = logits_form.results(rp, tokens, full_teacher=True)
        parts = [(call.objective.from_passes(r, **call.params)[0], r, rp)]
    values = torch.cat([v for v, _, _ in parts]).float()
    total = (values if mask is None else torch.where(mask, values, 0.0)).sum()
    stats = [logits_form.stats(rp, r) for _, r, rp in parts] if with_stats else []
    return total, stats
