"""The PyTorch backend: the float64-capable reference math run over chunks of positions.

Each chunk's logits (materialized in fp32, or fp64 for fp64 input) are freed before the next chunk
starts, and under autograd each chunk is checkpointed, so the backward recomputes one chunk at a
time: extra memory stays about one chunk's worth of logits whatever N is. A chunk holds as many
rows as fit ``CHUNK_BYTES`` of fp32 logits; one row of even a 262K vocabulary is 1 MB, so chunking
the rows bounds the memory without also splitting the vocabulary.

Dense objectives run their own ``reference`` (autograd gives the gradient): this backend is the
oracle's runner. An objective that needs the teacher only at the student's top-k (``topk``) runs
k-sparse instead: S from a no-grad pass, both models evaluated at S alone, and the objective's
``from_passes`` gradient attached there, so neither model's full logits are kept for the backward
(``return_stats`` adds one pass over both without autograd, nothing recomputed).

Mixed precision (bf16/fp16 hidden states, fp32 weight) is computed as autocast does: the weight
rounded to the activations' dtype for the product, fp32 accumulation, the weight's gradient in
fp32 (the rounding is passed straight through, so the gradient is not rounded with it).
"""
from __future__ import annotations

import ctypes
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from .. import reference, served
from ..objectives import Need, PassResults, reads_full_teacher, topk_ids
from ..stats import STAT_FIELDS, TopKStats
from .base import Backend, Capabilities, LossCall, LossResult, Model

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
    run = _returning_freed_memory(fn)
    parts = []
    for chunk in zip(*columns):
        args = [*chunk, *shared]
        if differentiable:
            # the chunk's backward ends where the gradient of its first input arrives
            first = next(i for i, t in enumerate(args) if t is not None and t.requires_grad)
            args[first] = _TrimInBackward.apply(args[first])
            parts.append(checkpoint(run, *args, use_reentrant=False))
        else:
            parts.append(run(*args))
    return [torch.cat(column) for column in zip(*parts)]


def _glibc_trim() -> Optional[Callable]:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to work around
        return None


_MALLOC_TRIM = _glibc_trim()


def _trim() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _TrimInBackward(torch.autograd.Function):
    """The identity, with malloc_trim once the gradient has flowed through (see below)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        _trim()
        return grad


def _returning_freed_memory(fn: Callable) -> Callable:
    """``fn`` followed by glibc's malloc_trim. A chunk's temporaries are a few MiB each: after
    the first is freed glibc raises its mmap threshold above that size, so the next ones come
    from the heap, and the small results kept between chunks pin it: the freed blocks stay
    resident, and the process grows by about a chunk's temporaries a chunk (1.7 GiB for a 512 MiB
    [N, V] problem). Trimming after each chunk (in the forward, in the checkpoint's
    recomputation, and after the chunk's backward: _TrimInBackward) hands them back, so the
    resident size follows the live tensors (115 MiB on that problem). Its price is the page
    faults of memory taken back (a fused fwd+bwd there: 5.7 s -> 9.7 s for the whole process),
    as with an mmap threshold forced low."""

    def run(*args):
        out = fn(*args)
        _trim()
        return out

    return run


class _Source:
    """How one model's logits are made for a chunk of its rows: ``rows`` is what gets split,
    ``shared`` what every chunk reads whole (the weight and bias), ``logits(row_chunk, *shared)``
    the soft-capped logits in the compute dtype over the first ``vocab`` ids."""

    def __init__(self, model: Model, vocab: int, weight_grad_dtype: torch.dtype, detach=False):
        self.softcap, self.vocab = model.softcap, vocab
        if model.logits is not None:
            self.rows, self.shared = model.logits, []
        else:
            self.rows = model.hidden
            self.shared = [_autocast_weight(t, model.hidden.dtype, weight_grad_dtype)
                           for t in (model.weight, model.bias) if t is not None]
        if detach:
            self.rows, self.shared = self.rows.detach(), [t.detach() for t in self.shared]
        self.cd = _compute_dtype(self.rows.dtype)

    def logits(self, rows: torch.Tensor, *shared: torch.Tensor) -> torch.Tensor:
        if not shared:
            z = rows.to(self.cd)
        else:
            weight, bias = shared[0], (shared[1] if len(shared) > 1 else None)
            z = reference.linear_logits(rows.to(self.cd), weight.to(self.cd), self.vocab,
                                        None if bias is None else bias.to(self.cd))
        return reference.softcapped(z, self.softcap)

    def at_ids(self, rows: torch.Tensor, ids: torch.Tensor, *shared: torch.Tensor) -> torch.Tensor:
        """The soft-capped logits at ``ids`` [n, k] only (k dot products a row in the fused form)."""
        if not shared:
            z = rows.gather(-1, ids).to(self.cd)
        else:
            z = torch.einsum("nkh,nh->nk", shared[0].to(self.cd)[ids], rows.to(self.cd))
            if len(shared) > 1:
                z = z + shared[1].to(self.cd)[ids]
        return reference.softcapped(z, self.softcap)

    @property
    def width(self) -> int:
        return self.vocab


def _autocast_weight(t: torch.Tensor, activation_dtype: torch.dtype, weight_grad_dtype) -> torch.Tensor:
    """The weight (or bias) as the chunks see it. Its per-chunk gradients are summed by autograd
    in this tensor's dtype, so a bf16 weight is upcast once to keep that sum in fp32 (cast back at
    the end); a weight wider than the activations is rounded to their dtype with the rounding
    passed straight through (autocast's product, the gradient kept in the weight's dtype)."""
    if t.dtype.itemsize > activation_dtype.itemsize:
        t = t + (t.to(activation_dtype).to(t.dtype) - t).detach()
    return t.to(torch.promote_types(t.dtype, weight_grad_dtype))


class _WithGrad(torch.autograd.Function):
    """Per-row values computed without autograd, whose gradient w.r.t. ``x`` is the given
    ``grad`` (an objective's GradForm, for an upstream gradient of 1) times the upstream."""

    @staticmethod
    def forward(ctx, x, values, grad):
        ctx.save_for_backward(grad)
        return values.clone()

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return upstream[:, None].to(grad.dtype) * grad, None, None


def _blank_uncounted(mask: Optional[torch.Tensor], *logits: torch.Tensor):
    """Zero logits at uncounted rows so no inf or NaN there can reach a value or a gradient."""
    if mask is None:
        return logits
    return tuple(torch.where(mask[:, None], z, torch.zeros_like(z)) for z in logits)


def _masked(values: torch.Tensor, mask: Optional[torch.Tensor], fill: float) -> torch.Tensor:
    return values if mask is None else torch.where(mask, values, torch.full_like(values, fill))


def _stats_rows(student, teacher, k, mask, temperature, tokens) -> tuple:
    stats = reference.topk_overlap(student, teacher, k, temperature, tokens=tokens)
    return tuple(_masked(v.float(), mask, float("nan")) for v in stats.tensors().values())


def _stats_from_columns(columns: list, with_tokens: bool) -> TopKStats:
    """The columns of _stats_rows (reference.topk_overlap's fields, in its order) as TopKStats."""
    names = [*STAT_FIELDS, "reverse_kl", *(("student_logprob", "teacher_logprob") if with_tokens else ())]
    return TopKStats(**dict(zip(names, columns, strict=True)))


class _Pair:
    """Both models' sources for one call, routed through _over_chunks as one flat argument list."""

    def __init__(self, call: LossCall):
        self.call = call
        self.student = _Source(call.student, call.vocab_size, call.weight_grad_dtype)
        self.teacher = _Source(call.teacher, call.vocab_size, call.weight_grad_dtype, detach=True)

    def run(self, fn: Callable, width: int, extra_rows: list) -> list:
        """fn(student_rows, teacher_rows, *extra_row_chunks, student_shared, teacher_shared)."""
        n_s = len(self.student.shared)

        def chunk(s_rows, t_rows, *rest):
            extra, shared = rest[: len(extra_rows)], rest[len(extra_rows):]
            return fn(s_rows, t_rows, *extra, shared[:n_s], shared[n_s:])

        return _over_chunks(chunk, width, [self.student.rows, self.teacher.rows, *extra_rows],
                            [*self.student.shared, *self.teacher.shared])


class TorchBackend(Backend):
    name = "torch"
    capabilities = Capabilities(
        forms=frozenset({"logits", "fused_linear"}), devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16}),
        served_teacher=True)

    def logsumexp(self, model, temperature, vocab_size):
        src = _Source(model, vocab_size, torch.float32)
        fn = lambda z, *shared: (reference.logsumexp(src.logits(z, *shared), temperature),)
        return _over_chunks(fn, src.width, [src.rows], src.shared)[0]

    def token_logprobs(self, model, tokens, temperature, vocab_size):
        src = _Source(model, vocab_size, torch.float32)
        fn = lambda z, y, *shared: (reference.token_logprobs(src.logits(z, *shared), y, temperature),)
        return _over_chunks(fn, src.width, [src.rows, tokens], src.shared)[0]

    def statistics(self, call):
        pair, k, tau = _Pair(call), call.k, call.temperature
        tokens = call.tokens

        def fn(s, t, y, m, shared_s, shared_t):
            z_s, z_t = _blank_uncounted(m, pair.student.logits(s, *shared_s),
                                        pair.teacher.logits(t, *shared_t))
            return _stats_rows(z_s, z_t, k, m, tau, y)

        with torch.no_grad():
            columns = pair.run(fn, pair.student.width, [tokens, call.mask])
        return _stats_from_columns(columns, tokens is not None)

    def loss(self, call):
        if not reads_full_teacher(call.objective.needs(call.params)):
            # the loss reads the teacher at the student's top-k only: k-sparse, with the
            # statistics (which read both in full) from a pass without autograd, if asked
            stats = self.statistics(call) if call.return_stats else None
            return LossResult(self._sparse_loss(call), stats=stats)
        pair, objective, tau = _Pair(call), call.objective, call.temperature
        tokens = call.tokens
        with_tokens = tokens is not None

        def fn(s, t, y, m, shared_s, shared_t):
            z_s, z_t = _blank_uncounted(m, pair.student.logits(s, *shared_s),
                                        pair.teacher.logits(t, *shared_t))
            loss = objective.reference(z_s, z_t, tokens=y, k=call.k, temperature=tau, **call.params)
            stats = _stats_rows(z_s, z_t, call.k, m, tau, y) if call.return_stats else ()
            return (_masked(loss, m, 0.0), *stats)

        columns = pair.run(fn, pair.student.width, [tokens, call.mask])
        stats = _stats_from_columns(columns[1:], with_tokens) if call.return_stats else None
        return LossResult(columns[0], stats=stats)

    def _sparse_loss(self, call) -> torch.Tensor:
        """An objective that reads the teacher only at the student's top-k: S from a no-grad pass,
        both models at S alone, and the gradient of ``from_passes`` attached to the student's
        logits at S (so autograd's memory stays [N, k], nothing of [N, V] is recomputed)."""
        pair, k, tau, mask = _Pair(call), call.k, call.temperature, call.mask
        src_s, src_t = pair.student, pair.teacher

        def select(s, m, *shared):
            (z_s,) = _blank_uncounted(m, src_s.logits(s, *shared))
            return (topk_ids(z_s, k),)

        with torch.no_grad():
            support = _over_chunks(select, src_s.width, [src_s.rows.detach(), mask],
                                   [t.detach() for t in src_s.shared])[0]
        hidden = max(t.shape[-1] for t in (src_s.rows, src_t.rows)) if src_s.shared else 1

        def at_support(s, t, ids, m, shared_s, shared_t):
            x_s, x_t = _blank_uncounted(m, src_s.at_ids(s, ids, *shared_s) / tau,
                                        src_t.at_ids(t, ids, *shared_t) / tau)
            with torch.no_grad():
                r = PassResults(lse_s=None, support=ids, student_at_support=x_s.detach(),
                                teacher_at_support=x_t, tokens=None)
                value, form = call.objective.from_passes(r, **call.params)
                if form.dense:
                    raise ValueError(f"objective {call.objective.name!r} has a dense gradient but "
                                     f"declares no full pass: add Need.TEACHER_FULL to its needs")
                grad = _masked(form.sparse_values, None if m is None else m[:, None], 0.0)
            return (_WithGrad.apply(x_s, _masked(value, m, 0.0), grad),)

        return pair.run(at_support, k * hidden, [support, mask])[0]

    # ---- a served teacher (opd_kernels.served)

    def served_loss(self, call):
        columns = _served_columns(call, _served_chunk, call.vocab_size)
        stats = None
        if call.return_stats:
            names = [*STAT_FIELDS, *(["student_logprob"] if call.tokens is not None else []),
                     *(["teacher_logprob"] if call.teacher.token_logprob is not None else [])]
            stats = TopKStats(**dict(zip(names, columns[1:], strict=True)), teacher_entropy_is_bound=True)
        return LossResult(columns[0], stats=stats)

    def student_topk(self, model, k, vocab_size):
        src = _Source(model, vocab_size, torch.float32, detach=True)
        fn = lambda z, *shared: (topk_ids(src.logits(z, *shared), k),)
        with torch.no_grad():
            return _over_chunks(fn, src.width, [src.rows], src.shared)[0]


# ---- a served teacher --------------------------------------------------------------------------

def _served_chunk(call: LossCall, src: _Source, s, ids, logprobs, token_logprob, logprobs_at, y, m,
                  shared):
    """One chunk of rows against the served answer: the student's logits materialized, its
    PassResults completed from the answer (opd_kernels.served), and the objective's GradForm
    attached to the logits (value forward, GradForm.materialize backward)."""
    tau = call.temperature
    (z,) = _blank_uncounted(m, src.logits(s, *shared))
    x = z / tau
    teacher = served.ServedTeacher(ids, logprobs, token_logprob, logprobs_at)
    with torch.no_grad():
        xd = x.detach()
        r = PassResults(lse_s=torch.logsumexp(xd, -1), tokens=y)
        if y is not None:
            r.student_logprob = xd.gather(-1, y[:, None])[:, 0] - r.lse_s
        support_needed = Need.SUPPORT in call.needs or call.return_stats
        if support_needed:
            r.support = topk_ids(xd, call.k)
            r.student_at_support = xd.gather(-1, r.support)
        served.complete(r, teacher, xd.gather(-1, ids))
        value, form = call.objective.from_passes(r, **call.params)
        grad = _masked(form.materialize(xd, None), None if m is None else m[:, None], 0.0)
    out = (_WithGrad.apply(x, _masked(value, m, 0.0), grad),)
    if call.return_stats:
        stats = served.statistics(teacher, call.k, r.support, r.student_at_support - r.lse_s[:, None],
                                  reference.entropy(xd), r.student_logprob, m)
        out += tuple(stats.tensors().values())
    return out


def _served_columns(call: LossCall, fn, width: int):
    src = _Source(call.student, call.vocab_size, call.weight_grad_dtype)
    t = call.teacher
    rows = [src.rows, t.ids, t.logprobs, t.token_logprob, t.logprobs_at, call.tokens, call.mask]
    n_rows = len(rows)
    chunk = lambda *a: fn(call, src, *a[:n_rows], a[n_rows:])
    return _over_chunks(chunk, width, rows, src.shared)


BACKEND = TorchBackend()
