"""The native CPU backend of the fused-linear form: a chunk of rows at a time, both models'
logits z = h W^T (+ b) by BLAS (torch.mm, ATen's threads) into buffers bounded in bytes
(``SCRATCH_BYTES`` in all), the native logits kernels (cpp_logits.py) over the chunk, and the
buffers reused by the next chunk: nothing of size [N, V] exists, and the process's resident size
grows by the buffers, not by N.

- A scalar loss ('mean' / 'sum') whose objective reads the teacher in full, with a student that
  needs gradients: the gradient in the forward (triton_fused_grad.reduced_loss, over these
  kernels): per chunk the two lm_head products, the passes, dL/dz written over the teacher's
  logits (for an objective with a RowGradForm, csrc/row_pass_grad.cpp: each row's gradient
  right after its pass, from cache), then dh = g W and dW += g^T h (addmm_ in place): four
  lm_head products in all, the floor.
- Otherwise (reduction 'none', ``topk``, no gradient needed): the forward keeps the per-row
  results of each chunk (the row pass's fields, the objective's GradForm); the backward
  recomputes the chunk's logits (the teacher's only for a form with a term in q) for a dense form,
  or applies a sparse form (``topk``: k ids a row) by k dot products a row, with no lm_head
  product. ``topk`` reads the teacher at the student's k ids only, by k dot products a row.
bf16 (or fp16) hidden states and weights are converted to fp32 once (exact), and a weight wider
than the activations rounded to their dtype first, as autocast's product does; the products and
everything after them run in fp32, and the gradients are cast back by autograd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import served
from ..objectives import GradForm, Need, reads_full_teacher
from ..stats import TopKStats
from . import cpp_logits, logits_form
from . import triton_fused_grad as fused_grad
from .base import Backend, Capabilities, LossCall, LossResult, Model
from .triton_fused_grad import Side

# Every buffer of a chunk together (two [rows, V] fp32: both models' logits, dL/dz written over
# the teacher's): at V = 65536, 48 rows a chunk. Larger chunks make larger GEMMs and fewer
# read-modify-writes of dW, at the price of memory. Read at each call.
SCRATCH_BYTES = 24 << 20
KERNELS = cpp_logits.KERNELS


def _side(model: Model) -> Side:
    """The model as fp32 rows (exact for bf16), the weight rounded to the activations' dtype."""
    hidden = model.hidden.detach()
    fp32 = lambda t: None if t is None else logits_form.rows(t.detach().to(hidden.dtype).float())
    return Side(logits_form.rows(hidden.float()), fp32(model.weight), fp32(model.bias),
                model.softcap or 0.0)


def _logits(out: torch.Tensor, side: Side, rows: slice, vocab: int) -> torch.Tensor:
    fused_grad.logits_into(out, side.hidden[rows], side.weight[:vocab])
    if side.bias is not None:
        out += side.bias[:vocab]
    return out


def _at_ids(side: Side, rows: slice, ids: torch.Tensor) -> torch.Tensor:
    """The raw logits at ``ids`` [m, k] of the rows ``rows``: k dot products a row."""
    z = torch.einsum("nkh,nh->nk", side.weight[ids], side.hidden[rows])
    return z if side.bias is None else z + side.bias[ids]


@dataclass
class _Chunk:
    """What the backward of one chunk needs: its row pass and GradForm, and the sparse-only
    form's dL/du at its ids for an upstream gradient of 1 (softcap'(z) / tau applied)."""

    rows: slice
    rp: logits_form.RowPass
    form: GradForm
    sparse_du: Optional[torch.Tensor] = None


@dataclass
class _Plan:
    """The per-row path: the student and teacher, the call's settings and every chunk."""

    student: Side
    teacher: Side
    vocab: int
    temperature: float
    mask: Optional[torch.Tensor]
    chunks: list

    def __call__(self, grad, need_hidden, need_weight, need_bias):
        s, vocab = self.student, self.vocab
        n, width = s.hidden.shape
        grad_hidden = torch.zeros(n, width) if need_hidden else None
        grad_weight = torch.zeros(vocab, width) if need_weight else None
        grad_bias = torch.zeros(vocab) if need_bias else None
        grads = (grad_hidden, grad_weight, grad_bias)
        dense = [c for c in self.chunks if c.form.dense]
        # the student's logits and dL/dz, written over the teacher's where the form reads q
        buffers = None
        if dense:
            size = max(c.rows.stop - c.rows.start for c in dense)
            buffers = [torch.empty(size, vocab) for _ in range(2)]
        settings = dict(temperature=self.temperature, student_softcap=s.softcap,
                        teacher_softcap=self.teacher.softcap)
        for c in self.chunks:
            mask = None if self.mask is None else self.mask[c.rows]
            scale = grad[c.rows] if mask is None else torch.where(mask, grad[c.rows], 0.0)
            if c.form.dense:
                m = c.rows.stop - c.rows.start
                z_s, g = _logits(buffers[0][:m], s, c.rows, vocab), buffers[1][:m]
                reads_q = bool(c.form.reverse or c.form.forward or c.form.mixture)
                z_t = _logits(g, self.teacher, c.rows, vocab) if reads_q else None
                logits_form.gradient(KERNELS, z_s, z_t, c.rp, c.form, scale.contiguous(),
                                     mask=mask, out=g, **settings)
                fused_grad.accumulate(g, s, c.rows, *grads)
            else:
                _sparse_backward(s, c.rows, c.form.sparse_ids, c.sparse_du * scale[:, None], grads)
        return grads


def _sparse_backward(side: Side, rows: slice, ids, du, grads) -> None:
    """dL/du non-zero at ``ids`` [m, k] only, into dh[rows], dW and db: no lm_head product."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        grad_hidden[rows] += torch.einsum("nk,nkh->nh", du, side.weight[ids])
    flat = ids.reshape(-1)
    if grad_weight is not None:
        outer = du[:, :, None] * side.hidden[rows][:, None, :]
        grad_weight.index_add_(0, flat, outer.flatten(0, 1))
    if grad_bias is not None:
        grad_bias.index_add_(0, flat, du.reshape(-1))


def _sparse_du(form: GradForm, z_s: torch.Tensor, s: Side, temperature: float):
    """A sparse-only form's dL/du at its ids for an upstream gradient of 1 (softcap'(z) / tau
    applied, z from the chunk's logits), for the backward to apply without the chunk's logits;
    None for a dense form."""
    if form.dense:
        return None
    ones = torch.ones(z_s.shape[0])
    return logits_form.sparse_grad(z_s, form, ones, None, temperature, s.softcap)


def _gathered(parts: list, with_stats: bool) -> tuple:
    """The chunks' (values, stats, _Chunk) as (values or None, TopKStats or None, chunks)."""
    values = None if parts and parts[0][0] is None else torch.cat([p[0] for p in parts])
    stats = TopKStats.cat([p[1] for p in parts]) if with_stats else None
    return values, stats, [p[2] for p in parts]


def _over_chunks(s: Side, t: Optional[Side], vocab: int, full_teacher: bool, fn: Callable):
    """fn(rows, z_s, z_t) for every chunk of rows, z_t None unless ``full_teacher``."""
    n = s.hidden.shape[0]
    # the backward's two buffers of these rows fit the bound; no rows: one empty chunk below
    chunk = max(1, fused_grad.scratch_rows(n, vocab, SCRATCH_BYTES, torch.float32))
    student_logits = torch.empty(chunk, vocab)
    teacher_logits = torch.empty(chunk, vocab) if full_teacher else None
    out = []
    for c0 in range(0, max(n, 1), chunk):  # no rows: one empty chunk, for the outputs' shapes
        rows = slice(c0, min(n, c0 + chunk))
        m = rows.stop - c0
        z_s = _logits(student_logits[:m], s, rows, vocab)
        z_t = _logits(teacher_logits[:m], t, rows, vocab) if full_teacher else None
        out.append(fn(rows, z_s, z_t))
    return out


class CppFusedBackend(Backend):
    name = "cpp"
    capabilities = Capabilities(forms=frozenset({"fused_linear"}), devices=frozenset({"cpu"}),
                                # the kernels see fp32 logits whatever the inputs' dtype
                                dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
                                served_teacher=True)

    def _per_row(self, call: LossCall, s: Side, t: Side, needs: frozenset,
                 value_and_form: Optional[Callable], with_stats: bool):
        """The per-row path's forward: (values, the chunks' statistics, _Plan chunks)."""
        tau, vocab, mask, tokens = call.temperature, call.vocab_size, call.mask, call.tokens
        full_teacher = reads_full_teacher(needs)
        softcaps = (s.softcap, t.softcap)

        def chunk(rows, z_s, z_t):
            m = None if mask is None else mask[rows]
            r, rp = logits_form.passes(
                KERNELS, z_s, z_t, needs=needs, tokens=None if tokens is None else tokens[rows],
                mask=m, k=call.k, temperature=tau, student_softcap=softcaps[0],
                teacher_softcap=softcaps[1], beta=call.params.get("beta", 0.5),
                teacher_at=None if full_teacher else lambda ids: _at_ids(t, rows, ids))
            stats = logits_form.stats(rp, r) if with_stats else None
            if value_and_form is None:
                return None, stats, None
            values, form = value_and_form(r, rp)
            if m is not None:
                values = torch.where(m, values, torch.zeros_like(values))
            return values.float(), stats, _Chunk(rows, rp, form, _sparse_du(form, z_s, s, tau))

        with torch.no_grad():
            parts = _over_chunks(s, t, vocab, full_teacher, chunk)
        return _gathered(parts, with_stats)

    def _attach(self, model, values, s, t, call_like, chunks):
        plan = _Plan(s, t, call_like.vocab_size, call_like.temperature, call_like.mask, chunks)
        return fused_grad.attach(model, values, plan)

    def _single(self, model: Model, temperature, vocab_size, tokens, value_and_form):
        s = _side(model)
        call = LossCall(student=model, teacher=model, objective=None, tokens=tokens,
                        temperature=temperature, vocab_size=vocab_size)
        needs = frozenset({Need.TOKENS}) if tokens is not None else frozenset()
        values, _, chunks = self._per_row(call, s, s, needs, value_and_form, False)
        return self._attach(model, values, s, s, call, chunks)

    def logsumexp(self, model, temperature, vocab_size):
        return self._single(model, temperature, vocab_size, None, lambda r, rp: (
            rp.field("lse_s"), GradForm(shift=torch.ones_like(rp.field("lse_s")))))

    def token_logprobs(self, model, tokens, temperature, vocab_size):
        tokens = tokens.contiguous()

        def value_and_form(r, rp):  # d log p(y)/dx_v = onehot(y)_v - p_v
            ones = torch.ones_like(r.lse_s)
            return r.student_logprob, GradForm(shift=-ones, sparse_ids=r.tokens[:, None],
                                               sparse_values=ones[:, None])

        return self._single(model, temperature, vocab_size, tokens, value_and_form)

    def statistics(self, call):
        _, stats, _ = self._per_row(call, _side(call.student), _side(call.teacher), call.needs,
                                    None, True)
        return stats

    def loss(self, call):
        s, t = _side(call.student), _side(call.teacher)
        if (call.grad_in_forward and call.reduction in ("mean", "sum") and s.hidden.shape[0] > 0
                and fused_grad.wants_grad(call.student)
                and reads_full_teacher(call.objective.needs(call.params))):
            value, stats = fused_grad.reduced_loss(call, s, t, call.needs, call.tokens,
                                                   call.return_stats, SCRATCH_BYTES, KERNELS)
            return LossResult(value, reduced=True, stats=stats)
        values, stats, chunks = self._per_row(
            call, s, t, call.needs, lambda r, rp: call.objective.from_passes(r, **call.params),
            call.return_stats)
        return LossResult(self._attach(call.student, values, s, t, call, chunks), stats=stats)

    def served_loss(self, call):
        """Against a served teacher: the student's chunks alone (logits_form.served_rows over
        each), the backward as the per-row path's."""
        s, teacher, mask, tokens = _side(call.student), call.teacher, call.mask, call.tokens
        cut = lambda t, rows: None if t is None else t[rows]

        def chunk(rows, z_s, _):
            part = served.ServedTeacher(*(cut(t, rows) for t in (
                teacher.ids, teacher.logprobs, teacher.token_logprob, teacher.logprobs_at)))
            values, form, rp, stats = logits_form.served_rows(
                KERNELS, call, z_s, part, cut(tokens, rows), cut(mask, rows))
            return values, stats, _Chunk(rows, rp, form, _sparse_du(form, z_s, s, call.temperature))

        with torch.no_grad():
            parts = _over_chunks(s, None, call.vocab_size, False, chunk)
        values, stats, chunks = _gathered(parts, call.return_stats)
        return LossResult(self._attach(call.student, values, s, s, call, chunks), stats=stats)

    def student_topk(self, model, k, vocab_size):
        s = _side(model)
        with torch.no_grad():
            parts = _over_chunks(s, None, vocab_size, False,
                                 lambda rows, z_s, _: KERNELS.row_pass(
                                     z_s, k=k, student_softcap=s.softcap).top_ids)
        return torch.cat(parts)


BACKEND = CppFusedBackend()
