"""The logits form of a backend, whatever its kernels: OPD losses and statistics from [N, V]
logits out of three kernels, given as :class:`Kernels` (the Triton ones, triton_logits.py; the
native CPU ones, cpp_logits.py).

    row_pass    one read of the logits: the per-row ``FIELDS`` (lse of both models and its parts,
                both KLs, token log-probs, entropies, top-k statistics) and the student's top-k ids
    mixture     the generalized JSD's second read: KL(p || m), KL(q || m) per row
    dense_grad  the backward's read: dL/dz of a GradForm's dense part, written once
    row_pass_grad  (optional) both of a row at once, for an objective's RowGradForm: the
                gradient in the forward with the row's second read from cache (one_read_form)

Everything else is here and shared: ``passes`` turns the needs of an objective into kernel calls
and PassResults, the objective's ``from_passes`` gives its values and GradForm, and the autograd
Function ``_Attached`` holds them and writes the gradient in one more read (``gradient``: the
dense kernel, then the sparse part at k ids a row), so any upstream gradient works (reduction
'none', per-position weights) and a forward-only call costs one read.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch

from .. import served
from ..kernels.row_fields import FIELDS
from ..objectives import GradForm, Need, PassResults, RowGradForm, reads_full_teacher
from ..stats import TopKStats
from .base import Backend, Capabilities, LossCall, LossResult, Model


class RowPass(NamedTuple):
    fields: torch.Tensor                 # [len(FIELDS), N] fp32, rows named by FIELDS
    top_ids: Optional[torch.Tensor]      # [N, k] int64 student top-k ids (descending), or None
    mixture: Optional[torch.Tensor] = None  # [2, N] fp32 KL(p || m), KL(q || m) (row_pass_grad)

    def field(self, name: str) -> torch.Tensor:
        return self.fields[FIELDS.index(name)]

    @staticmethod
    def cat(parts: list) -> "RowPass":
        """The row passes of consecutive chunks of rows as one."""
        cat = lambda name, dim: (None if getattr(parts[0], name) is None
                                 else torch.cat([getattr(p, name) for p in parts], dim))
        return RowPass(cat("fields", 1), cat("top_ids", 0), cat("mixture", 1))


class Kernels(NamedTuple):
    """A backend's logits kernels (see the module docstring for what each computes).

    row_pass(student, teacher, tokens, mask, k, temperature, student_softcap, teacher_softcap)
        -> RowPass
    mixture(student, teacher, rp, mask, temperature, caps, beta) -> (KL(p || m), KL(q || m))
    dense_grad(student, teacher, out, rp, form, shift, scale, mask, temperature, caps) writes
        dL/dz of ``form``'s dense part into ``out``; ``teacher`` is None when the form has no
        term in q, ``shift`` is 0 and ``scale`` (the upstream gradient times 1/tau) holds the
        row's factor, both fp32 [N]; ``caps`` = (student, teacher) soft-caps, 0 for none.
    row_pass_grad(student, teacher, tokens, mask, k, temperature, caps, form, scale, out)
        -> RowPass: the row pass of both models (and the mixture sums for a form with a
        mixture term) and, row by row, the dense gradient of ``form`` (a RowGradForm) into
        ``out``; None where a backend has no such kernel.
    """

    row_pass: Callable
    mixture: Callable
    dense_grad: Callable
    row_pass_grad: Optional[Callable] = None


def rows(t: torch.Tensor) -> torch.Tensor:
    """Any row stride works; the vocabulary axis must be contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cap(softcap: Optional[float]) -> float:
    return 0.0 if softcap is None else softcap


def capped(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@torch.no_grad()
def passes(kernels: Kernels, student: torch.Tensor, teacher: Optional[torch.Tensor], *,
           needs: frozenset, tokens: Optional[torch.Tensor] = None,
           mask: Optional[torch.Tensor] = None, k: int = 0, temperature: float = 1.0,
           student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
           beta: float = 0.5, teacher_at: Optional[Callable] = None) -> tuple:
    """Every per-row quantity ``needs`` asks for (objectives.Need), as (PassResults, RowPass).
    The teacher is read in full only where ``reads_full_teacher(needs)``; with Need.SUPPORT alone
    it is gathered at the student's k ids (``teacher_at(ids)``: its raw logits there, where the
    caller has no teacher logits to gather from). Uncounted rows hold finite stand-ins."""
    full_teacher = reads_full_teacher(needs)
    support = Need.SUPPORT in needs
    rp = kernels.row_pass(student, teacher if full_teacher else None, tokens, mask,
                          k if support else 0, temperature, student_softcap, teacher_softcap)
    f = rp.field
    r = results(rp, tokens, full_teacher)
    if support:
        r.support = rp.top_ids
        at = lambda z, softcap, center: (capped(z.float(), softcap) / temperature - center[:, None])
        r.student_at_support = at(student.gather(1, rp.top_ids), student_softcap, f("max_s"))
        teacher_z = teacher.gather(1, rp.top_ids) if teacher_at is None else teacher_at(rp.top_ids)
        r.teacher_at_support = at(teacher_z, teacher_softcap,
                                  f("max_t") if full_teacher else torch.zeros_like(f("max_s")))
        if mask is not None:  # finite stand-ins at uncounted rows (their ids are 0)
            blank = lambda x: torch.where(mask[:, None], x, torch.zeros_like(x))
            r.student_at_support, r.teacher_at_support = map(blank, (r.student_at_support,
                                                                     r.teacher_at_support))
    if Need.MIXTURE in needs:
        caps = (cap(student_softcap), cap(teacher_softcap))
        r.mixture_student, r.mixture_teacher = kernels.mixture(student, teacher, rp, mask,
                                                               temperature, caps, beta)
    return r, rp


def results(rp: RowPass, tokens: Optional[torch.Tensor], full_teacher: bool) -> PassResults:
    """PassResults of a row pass's fields (the support's fields are the caller's)."""
    f = rp.field
    # lse (and x at the support) centered on the row's max: PassResults allows the shared offset
    r = PassResults(lse_s=f("logsum_s"), tokens=tokens)
    if tokens is not None:
        r.student_logprob = f("student_logprob")
    if full_teacher:
        r.lse_t, r.reverse_kl, r.forward_kl = f("logsum_t"), f("kl"), f("forward_kl")
        if tokens is not None:
            r.teacher_logprob = f("teacher_logprob")
    if rp.mixture is not None:
        r.mixture_student, r.mixture_teacher = rp.mixture[0], rp.mixture[1]
    return r


# where each PassResults field a RowGradForm's terms may name sits in the kernels' coefficients:
# the row pass's fields, then the two mixture sums
_COEFFICIENT = {**{name: FIELDS.index({"reverse_kl": "kl"}.get(name, name))
                   for name in RowGradForm.FIELDS if not name.startswith("mixture_")},
                "mixture_student": len(FIELDS), "mixture_teacher": len(FIELDS) + 1}


@functools.cache  # the kernels only read it
def shift_coefficients(form) -> torch.Tensor:
    """A RowGradForm's shift as fp32 [len(FIELDS) + 3]: a coefficient per row-pass field, one
    per mixture sum (KL(p || m), KL(q || m)), then the constant."""
    coefficients = torch.zeros(len(FIELDS) + 3)
    for name, coefficient in form.terms:
        coefficients[_COEFFICIENT[name]] += coefficient
    coefficients[-1] = form.constant
    return coefficients


def one_read_form(kernels: Kernels, objective, params: dict) -> Optional[RowGradForm]:
    """The objective's RowGradForm where ``kernels`` can write each row's gradient right after
    its passes (row_pass_grad, the later reads from cache): an objective that needs no support
    (whose gathers would read the teacher's logits after the gradient went over them); else
    None, and the passes, then ``gradient``."""
    if kernels.row_pass_grad is None or Need.SUPPORT in objective.needs(params):
        return None
    return objective.row_grad_form(params)


def gradient(kernels: Kernels, student: torch.Tensor, teacher: Optional[torch.Tensor],
             rp: RowPass, form: GradForm, scale: torch.Tensor, *,
             mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
             student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dL/dz (z the raw student logits) of ``form`` for the per-row upstream gradient ``scale``
    (fp32 [N]): the dense kernel, then the sparse part at k ids a row. The 1/tau and the
    soft-capping's derivative are applied here. ``out``: a buffer to write into (its dtype is
    the gradient's)."""
    n = student.shape[0]
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if out is None else out
    inv_tau = 1.0 / temperature
    if n and form.dense:
        needs_teacher = bool(form.reverse or form.forward or form.mixture)
        shift = form.shift.float() if mask is None else torch.where(mask, form.shift.float(), 0.0)
        kernels.dense_grad(student, teacher if needs_teacher else None, grad, rp, form,
                           shift.contiguous(), (scale * inv_tau).contiguous(), mask, temperature,
                           (cap(student_softcap), cap(teacher_softcap)))
    elif n:
        grad.zero_()
    if n and form.sparse_ids is not None:
        values = sparse_grad(student, form, scale, mask, temperature, student_softcap)
        grad.scatter_add_(1, form.sparse_ids, values.to(grad.dtype))
    return grad


def sparse_grad(student: torch.Tensor, form: GradForm, scale: torch.Tensor,
                mask: Optional[torch.Tensor], temperature: float,
                student_softcap: Optional[float]) -> torch.Tensor:
    """dL/dz (z the raw student logits ``student``) at the form's sparse ids [N, k], fp32, for the
    per-row upstream gradient ``scale``: 1/tau and the soft-cap's derivative applied, 0 at
    uncounted rows."""
    ids = form.sparse_ids
    values = form.sparse_values.float() * (scale * (1.0 / temperature))[:, None]
    if student_softcap is not None:
        z = capped(student.gather(1, ids).float(), student_softcap)
        values = values * (1 - (z / student_softcap) ** 2)
    if mask is not None:
        values = torch.where(mask[:, None], values, torch.zeros_like(values))
    return values


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


def served_rows(kernels: Kernels, call: LossCall, student: torch.Tensor,
                teacher: served.ServedTeacher, tokens, mask) -> tuple:
    """Rows of ``student`` logits against a served teacher (its rows alike): one read of the
    student (its lse, the token log-probs, its top-k and entropy where asked), gathers at the
    served ids, opd_kernels.served for the rest. (values, GradForm, RowPass, TopKStats or None)."""
    tau, softcap = call.temperature, call.student.softcap
    support = Need.SUPPORT in call.needs or call.return_stats
    rp = kernels.row_pass(student, None, tokens, mask, call.k if support else 0, tau, softcap, None)
    # x_s at ids, centered on the row's max as PassResults' lse_s (logsum_s) is
    at = lambda ids: capped(student.gather(1, ids).float(), softcap) / tau - rp.field("max_s")[:, None]
    r = PassResults(lse_s=rp.field("logsum_s"), tokens=tokens)
    if tokens is not None:
        r.student_logprob = rp.field("student_logprob")
    if support:
        r.support = rp.top_ids
        r.student_at_support = at(rp.top_ids)
    with torch.no_grad():
        served.complete(r, teacher, at(teacher.ids))
        values, form = call.objective.from_passes(r, **call.params)
        if mask is not None:
            values = torch.where(mask, values, torch.zeros_like(values))
    result_stats = None
    if call.return_stats:
        result_stats = served.statistics(
            teacher, call.k, r.support, r.student_at_support - r.lse_s[:, None],
            rp.field("student_entropy"), r.student_logprob, mask)
    return values.float(), form, rp, result_stats


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
        kernels, settings = ctx.settings
        grad_student = gradient(kernels, student, teacher, ctx.rp, ctx.form, grad.float(),
                                mask=mask, **settings)
        return grad_student, None, None, None, None, None, None


class LogitsFormBackend(Backend):
    """A logits-form backend over ``kernels``, by ``name`` with ``capabilities``."""

    def __init__(self, name: str, capabilities: Capabilities, kernels: Kernels):
        self.name, self.capabilities, self.kernels = name, capabilities, kernels

    def _attach(self, student, values, teacher, rp, form, mask, temperature, softcaps):
        settings = dict(temperature=temperature, student_softcap=softcaps[0],
                        teacher_softcap=softcaps[1])
        return _Attached.apply(student, values, teacher, rp, form, mask, (self.kernels, settings))

    def logsumexp(self, model: Model, temperature, vocab_size):
        logits = rows(model.logits)
        _, rp = passes(self.kernels, logits, None, needs=frozenset(), temperature=temperature,
                       student_softcap=model.softcap)
        lse = rp.field("lse_s")
        return self._attach(logits, lse, None, rp, GradForm(shift=torch.ones_like(lse)), None,
                            temperature, (model.softcap, None))

    def token_logprobs(self, model: Model, tokens, temperature, vocab_size):
        logits, tokens = rows(model.logits), tokens.contiguous()
        r, rp = passes(self.kernels, logits, None, needs=frozenset(), tokens=tokens,
                       temperature=temperature, student_softcap=model.softcap)
        # d log p(y)/dx_v = onehot(y)_v - p_v
        form = GradForm(shift=-torch.ones_like(r.lse_s), sparse_ids=tokens[:, None],
                        sparse_values=torch.ones_like(r.lse_s)[:, None])
        return self._attach(logits, r.student_logprob, None, rp, form, None, temperature,
                            (model.softcap, None))

    def _passes(self, call: LossCall):
        student, teacher = rows(call.student.logits), rows(call.teacher.logits.detach())
        mask = None if call.mask is None else call.mask.contiguous()
        tokens = None if call.tokens is None else call.tokens.contiguous()
        softcaps = (call.student.softcap, call.teacher.softcap)
        r, rp = passes(self.kernels, student, teacher, needs=call.needs, tokens=tokens, mask=mask,
                       k=call.k, temperature=call.temperature, student_softcap=softcaps[0],
                       teacher_softcap=softcaps[1], beta=call.params.get("beta", 0.5))
        return student, teacher, mask, softcaps, r, rp

    def loss(self, call: LossCall) -> LossResult:
        student, teacher, mask, softcaps, r, rp = self._passes(call)
        with torch.no_grad():
            values, form = call.objective.from_passes(r, **call.params)
            if mask is not None:
                values = torch.where(mask, values, torch.zeros_like(values))
        loss = self._attach(student, values.float(), teacher, rp, form, mask, call.temperature,
                            softcaps)
        return LossResult(loss, stats=stats(rp, r) if call.return_stats else None)

    def statistics(self, call: LossCall) -> TopKStats:
        *_, r, rp = self._passes(call)
        return stats(rp, r)

    def served_loss(self, call: LossCall) -> LossResult:
        student = rows(call.student.logits)
        mask = None if call.mask is None else call.mask.contiguous()
        tokens = None if call.tokens is None else call.tokens.contiguous()
        values, form, rp, result_stats = served_rows(self.kernels, call, student, call.teacher,
                                                     tokens, mask)
        loss = self._attach(student, values, None, rp, form, mask, call.temperature,
                            (call.student.softcap, None))
        return LossResult(loss, stats=result_stats)

    def student_topk(self, model: Model, k, vocab_size):
        return self.kernels.row_pass(rows(model.logits), None, None, None, k, 1.0, model.softcap,
                                     None).top_ids
