"""The Triton backend of the logits form: OPD losses and statistics from [N, V] logits.

Every call makes one forward pass over the logits (``row_stats``: a partial kernel over (rows,
vocabulary splits) and a small finalize kernel that merges the splits in a fixed order), plus
the mixture pass of kernels/row_mixture.py when the objective needs it (the generalized JSD);
nothing of size [N, V] is written in the forward. The objective turns those per-row results
into its values and its GradForm (objectives/base.py); the autograd Function here holds them
and writes the gradient in one more pass over the logits (``row_grad``, then the sparse part
at k ids a row), so any upstream gradient works (reduction 'none', per-position weights), and
a forward-only call costs one read.

Bytes per element of the logits (bf16, 2 B an element of each model):
    full, forward_kl, topk_pg  forward 4 (both read once)   backward 6 (both read, gradient written)
    jsd (0 < beta < 1)         forward 8 (two reads)        backward 6
    sampled                    forward 4                    backward 4 (student read, gradient written)
    topk                       forward 2 (student read)     backward 2 (zeros + k values a row written)
``return_stats`` rides the same forward pass (the top-k of both models and their entropies are
kept while the blocks stream by); for ``topk`` it adds the teacher's read (4 B in all).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton

from .. import served
from ..kernels import row_stats
from ..kernels.row_grad import dense_grad_kernel
from ..kernels.row_mixture import mixture_kernel
from ..kernels.row_stats import row_stats_finalize_kernel, row_stats_partial_kernel
from ..objectives import GradForm, Need, PassResults, reads_full_teacher
from ..stats import TopKStats
from . import _interpreter_compat  # noqa: F401  (before any launch under TRITON_INTERPRET=1)
from .base import Backend, Capabilities, LossCall, LossResult, Model

# Vocabulary block widths, for 8 warps. Forward: every lane keeps its own running state
# (6 fp32 values for a pair, 8 with statistics), so 2048 lanes, 8 a thread, keep the KL pass
# within registers on sm_90 (see bench/results/hopper_report.md). Backward: no state, one block
# a program, 4096 elements (8 KB of bf16 a model) for enough bytes in flight.
_FORWARD_BLOCK_V = 2048
BACKWARD_BLOCK_V = 4096

# The largest k the running top-k keeps on-chip.
MAX_K = 64


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Any row stride works; the vocabulary axis must be contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _cap(softcap: Optional[float]) -> float:
    return 0.0 if softcap is None else softcap


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


def _split_plan(n: int, vocab: int, block_v: int, device) -> tuple:
    n_blocks = triton.cdiv(vocab, block_v)
    blocks_per_split = triton.cdiv(n_blocks, vocab_splits(n, n_blocks, device))
    return triton.cdiv(n_blocks, blocks_per_split), blocks_per_split


@torch.no_grad()
def row_pass(student: torch.Tensor, teacher: Optional[torch.Tensor] = None,
             tokens: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
             k: int = 0, temperature: float = 1.0, student_softcap: Optional[float] = None,
             teacher_softcap: Optional[float] = None) -> RowPass:
    """One read of the logits: lse (both models), both KLs, token logits, entropies, top-k
    statistics (teacher and k > 0), student top-k ids (k > 0), as ``row_stats`` describes."""
    n, vocab = student.shape
    device = student.device
    fields = torch.empty(row_stats.NUM_FIELDS.value, n, dtype=torch.float32, device=device)
    top_ids = torch.empty(n, k, dtype=torch.int64, device=device) if k else None
    if n == 0:
        return RowPass(fields, top_ids)
    k_pad = triton.next_power_of_2(k) if k else 0
    block_v = vocab_block(vocab, _FORWARD_BLOCK_V, k_pad)
    splits, blocks_per_split = _split_plan(n, vocab, block_v, device)
    state = torch.empty(n, splits, row_stats.NUM_STATE.value, dtype=torch.float32, device=device)
    keys = torch.empty(n, splits, 2, k_pad, dtype=torch.int64, device=device) if k else None
    inv_tau, caps = 1.0 / temperature, (_cap(student_softcap), _cap(teacher_softcap))
    stride_t = teacher.stride(0) if teacher is not None else 0
    row_stats_partial_kernel[(n, splits)](
        student, teacher, mask, state, keys, vocab, student.stride(0), stride_t, blocks_per_split,
        inv_tau, *caps, BLOCK_V=block_v, K_PAD=max(k_pad, 1), num_warps=warps_for_block(block_v))
    row_stats_finalize_kernel[(n,)](
        state, keys, student, teacher, tokens, mask, fields, top_ids, n, splits,
        student.stride(0), stride_t, inv_tau, *caps, k, SPLITS_PAD=triton.next_power_of_2(splits),
        K_PAD=max(k_pad, 1), num_warps=4)
    return RowPass(fields, top_ids)


@torch.no_grad()
def _mixture(student, teacher, rp: RowPass, mask, temperature, caps, beta) -> tuple:
    """(KL(p || m), KL(q || m)) per row, m = beta q + (1 - beta) p (row_mixture.py)."""
    n, vocab = student.shape
    block_v = vocab_block(vocab, _FORWARD_BLOCK_V)
    splits, blocks_per_split = _split_plan(n, vocab, block_v, student.device)
    partial = torch.empty(splits, n, 2, dtype=torch.float32, device=student.device)
    if n:
        mixture_kernel[(n, splits)](
            student, teacher, mask, rp.field("max_s"), rp.field("logsum_s"), rp.field("max_t"),
            rp.field("logsum_t"), partial, n, vocab, student.stride(0), teacher.stride(0),
            blocks_per_split, 1.0 / temperature, *caps, math.log(beta), math.log1p(-beta),
            BLOCK_V=block_v, num_warps=warps_for_block(block_v))
    total = partial.sum(0)  # splits in a fixed order
    return total[:, 0], total[:, 1]


def _capped(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@torch.no_grad()
def passes(student: torch.Tensor, teacher: Optional[torch.Tensor], *, needs: frozenset,
           tokens: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, k: int = 0,
           temperature: float = 1.0, student_softcap: Optional[float] = None,
           teacher_softcap: Optional[float] = None, beta: float = 0.5) -> tuple:
    """Every per-row quantity ``needs`` asks for (objectives.Need), as (PassResults, RowPass).
    The teacher is read in full only where ``reads_full_teacher(needs)``; with Need.SUPPORT alone it is
    gathered at the student's k ids. Uncounted rows hold finite stand-ins."""
    full_teacher = reads_full_teacher(needs)
    support = Need.SUPPORT in needs
    rp = row_pass(student, teacher if full_teacher else None, tokens, mask, k if support else 0,
                  temperature, student_softcap, teacher_softcap)
    f = rp.field
    # lse and x at the support centered on the row's max (PassResults allows the shared offset)
    r = PassResults(lse_s=f("logsum_s"), tokens=tokens)
    if tokens is not None:
        r.student_logprob = f("student_logprob")
    if full_teacher:
        r.lse_t, r.reverse_kl, r.forward_kl = f("logsum_t"), f("kl"), f("forward_kl")
        if tokens is not None:
            r.teacher_logprob = f("teacher_logprob")
    if support:
        r.support = rp.top_ids
        at = lambda z, cap, center: (_capped(z.gather(1, rp.top_ids).float(), cap) / temperature
                                     - center[:, None])
        r.student_at_support = at(student, student_softcap, f("max_s"))
        r.teacher_at_support = at(teacher, teacher_softcap,
                                  f("max_t") if full_teacher else torch.zeros_like(f("max_s")))
        if mask is not None:  # finite stand-ins at uncounted rows (their ids are 0)
            blank = lambda x: torch.where(mask[:, None], x, torch.zeros_like(x))
            r.student_at_support, r.teacher_at_support = map(blank, (r.student_at_support,
                                                                     r.teacher_at_support))
    if Need.MIXTURE in needs:
        caps = (_cap(student_softcap), _cap(teacher_softcap))
        r.mixture_student, r.mixture_teacher = _mixture(student, teacher, rp, mask, temperature,
                                                        caps, beta)
    return r, rp


def gradient(student: torch.Tensor, teacher: Optional[torch.Tensor], rp: RowPass, form: GradForm,
             scale: torch.Tensor, *, mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
             student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dL/dz (z the raw student logits) of ``form`` for the per-row upstream gradient ``scale``
    (fp32 [N]): the dense pass of row_grad.py, then the sparse part at k ids a row. The 1/tau and
    the soft-capping's derivative are applied here. ``out``: a buffer to write into (its dtype
    is the gradient's)."""
    n, vocab = student.shape
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if out is None else out
    inv_tau = 1.0 / temperature
    counted = None if mask is None else mask[:, None]
    if n and form.dense:
        needs_teacher = bool(form.reverse or form.forward or form.mixture)
        shift = form.shift.float() if mask is None else torch.where(mask, form.shift.float(), 0.0)
        beta = form.beta if form.mixture else 0.5
        block_v = vocab_block(vocab, BACKWARD_BLOCK_V)
        dense_grad_kernel[(n, triton.cdiv(vocab, block_v))](
            student, teacher if needs_teacher else None, grad, rp.field("max_s"),
            rp.field("logsum_s"), rp.field("max_t"), rp.field("logsum_t"), shift.contiguous(),
            (scale * inv_tau).contiguous(), mask, vocab, student.stride(0),
            teacher.stride(0) if needs_teacher else 0, grad.stride(0), inv_tau,
            _cap(student_softcap), _cap(teacher_softcap), form.reverse, form.forward, form.mixture,
            math.log(beta), math.log1p(-beta), BLOCK_V=block_v, HAS_MIXTURE=bool(form.mixture),
            num_warps=warps_for_block(block_v))
    elif n:
        grad.zero_()
    if n and form.sparse_ids is not None:
        ids = form.sparse_ids
        values = form.sparse_values.float() * (scale * inv_tau)[:, None]
        if student_softcap is not None:
            capped = _capped(student.gather(1, ids).float(), student_softcap)
            values = values * (1 - (capped / student_softcap) ** 2)
        if counted is not None:
            values = torch.where(counted, values, torch.zeros_like(values))
        grad.scatter_add_(1, ids, values.to(grad.dtype))
    return grad


def stats(rp: RowPass, r: PassResults) -> TopKStats:
    """The TopKStats of a row pass that read both models with k > 0."""
    f = rp.field
    return TopKStats(overlap=f("overlap"), student_mass=f("student_mass"),
                     teacher_mass=f("teacher_mass"), overlap_advantage=f("overlap_advantage"),
                     student_entropy=f("student_entropy"), teacher_entropy=f("teacher_entropy"),
                     entropy_gap=(f("teacher_entropy") - f("student_entropy")).abs(),
                     reverse_kl=_nan_uncounted(f("kl"), f("overlap")),
                     student_logprob=_nan_uncounted(r.student_logprob, f("overlap")),
                     teacher_logprob=_nan_uncounted(r.teacher_logprob, f("overlap")))


def _nan_uncounted(values: Optional[torch.Tensor], overlap: torch.Tensor) -> Optional[torch.Tensor]:
    """Loss fields hold 0 at uncounted rows; as statistics they are NaN there (overlap is)."""
    return None if values is None else torch.where(torch.isnan(overlap), overlap, values)


class _Attached(torch.autograd.Function):
    """Per-row values computed without autograd, with the backward of their GradForm."""

    @staticmethod
    def forward(ctx, student, values, teacher, rp, form, mask, settings):
        ctx.save_for_backward(student, teacher, mask)
        ctx.rp, ctx.form, ctx.settings = rp, form, settings
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        student, teacher, mask = ctx.saved_tensors
        grad_student = gradient(student, teacher, ctx.rp, ctx.form, grad.float(), mask=mask,
                                **ctx.settings)
        return grad_student, None, None, None, None, None, None


def _attach(student, values, teacher, rp, form, mask, temperature, softcaps):
    settings = dict(temperature=temperature, student_softcap=softcaps[0],
                    teacher_softcap=softcaps[1])
    return _Attached.apply(student, values, teacher, rp, form, mask, settings)


class TritonLogitsBackend(Backend):
    name = "triton"
    capabilities = Capabilities(
        forms=frozenset({"logits"}), devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        max_k=MAX_K, needs_interpreter_off_gpu=True, served_teacher=True)

    def logsumexp(self, model: Model, temperature, vocab_size):
        logits = _rows(model.logits)
        _, rp = passes(logits, None, needs=frozenset(), temperature=temperature,
                       student_softcap=model.softcap)
        lse = rp.field("lse_s")
        return _attach(logits, lse, None, rp, GradForm(shift=torch.ones_like(lse)), None,
                       temperature, (model.softcap, None))

    def token_logprobs(self, model: Model, tokens, temperature, vocab_size):
        logits, tokens = _rows(model.logits), tokens.contiguous()
        r, rp = passes(logits, None, needs=frozenset(), tokens=tokens, temperature=temperature,
                       student_softcap=model.softcap)
        # d log p(y)/dx_v = onehot(y)_v - p_v
        form = GradForm(shift=-torch.ones_like(r.lse_s), sparse_ids=tokens[:, None],
                        sparse_values=torch.ones_like(r.lse_s)[:, None])
        return _attach(logits, r.student_logprob, None, rp, form, None, temperature,
                       (model.softcap, None))

    def _passes(self, call: LossCall):
        student, teacher = _rows(call.student.logits), _rows(call.teacher.logits.detach())
        mask = None if call.mask is None else call.mask.contiguous()
        tokens = None if call.tokens is None else call.tokens.contiguous()
        softcaps = (call.student.softcap, call.teacher.softcap)
        r, rp = passes(student, teacher, needs=call.needs, tokens=tokens, mask=mask, k=call.k,
                       temperature=call.temperature, student_softcap=softcaps[0],
                       teacher_softcap=softcaps[1], beta=call.params.get("beta", 0.5))
        return student, teacher, mask, softcaps, r, rp

    def loss(self, call: LossCall) -> LossResult:
        student, teacher, mask, softcaps, r, rp = self._passes(call)
        with torch.no_grad():
            values, form = call.objective.from_passes(r, **call.params)
            if mask is not None:
                values = torch.where(mask, values, torch.zeros_like(values))
        loss = _attach(student, values.float(), teacher, rp, form, mask, call.temperature, softcaps)
        return LossResult(loss, stats=stats(rp, r) if call.return_stats else None)

    def statistics(self, call: LossCall) -> TopKStats:
        *_, r, rp = self._passes(call)
        return stats(rp, r)

    def served_loss(self, call: LossCall) -> LossResult:
        """Against a served teacher: one read of the student's logits (its lse, top-k and
        entropy where asked), gathers at the served ids, opd_kernels.served for the rest."""
        student, cap = _rows(call.student.logits), call.student.softcap
        mask = None if call.mask is None else call.mask.contiguous()
        tokens = None if call.tokens is None else call.tokens.contiguous()
        teacher = call.teacher
        support = Need.SUPPORT in call.needs or call.return_stats
        # the student's one pass: its lse, the token log-probs, its top-k (and entropy) if asked
        rp = row_pass(student, None, tokens, mask, call.k if support else 0, call.temperature, cap)
        r = PassResults(lse_s=rp.field("logsum_s"), tokens=tokens)
        if tokens is not None:
            r.student_logprob = rp.field("student_logprob")
        if support:
            r.support = rp.top_ids
            r.student_at_support = self._at(student, rp, rp.top_ids, call.temperature, cap)
        with torch.no_grad():
            served.complete(r, teacher, self._at(student, rp, teacher.ids, call.temperature, cap))
            values, form = call.objective.from_passes(r, **call.params)
            if mask is not None:
                values = torch.where(mask, values, torch.zeros_like(values))
        loss = _attach(student, values.float(), None, rp, form, mask, call.temperature, (cap, None))
        result_stats = None
        if call.return_stats:
            result_stats = served.statistics(
                teacher, call.k, r.support, r.student_at_support - r.lse_s[:, None],
                rp.field("student_entropy"), r.student_logprob, mask)
        return LossResult(loss, stats=result_stats)

    @staticmethod
    def _at(student, rp: RowPass, ids, temperature, cap) -> torch.Tensor:
        """x_s at ``ids``, centered on the row's max as PassResults' lse_s (logsum_s) is."""
        return _capped(student.gather(1, ids).float(), cap) / temperature - rp.field("max_s")[:, None]

    def student_topk(self, model: Model, k, vocab_size):
        return row_pass(_rows(model.logits), k=k, student_softcap=model.softcap).top_ids


BACKEND = TritonLogitsBackend()
