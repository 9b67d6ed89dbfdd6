"""The vocabulary-parallel backend (opd_kernels.VocabParallel). Each rank of a process group holds
the ids [start, stop) of the global vocabulary: its shard of both models' logits, or of both lm_head weights (and biases), with the
positions (hidden states, tokens, masks, a served teacher's answer) replicated. Per call, every
rank runs the same collectives (torch.distributed on the option's group), in this order:

1. one all_gather of a few ints (the ranges, the shapes, a code of the call), checked on the host:
   ranges that do not tile [0, total), a group whose ranks do not match them, and ranks that
   disagree on the call raise on every rank alike, before anything else is exchanged;
2. per chunk of rows (the same chunks on every rank): an all_gather of both models' local max
   and lse (the global max and lse of each, and the log-mass of the other shards); an
   all-reduce (sum) of the per-row partial sums computed with the global lse's (both KLs, the
   JSD's mixture sums, the entropies, the logits at the tokens and at a served teacher's ids,
   each held by one shard); an all_gather of each rank's local top-k (values, global ids, the
   other model's logit there), re-selected with the library's rule (values descending, ties to
   the lower global id).

The objective's ``from_passes`` then gives the values and a GradForm, evaluated on each shard's
logits with the global normalizers, so any objective, a user's own included, runs sharded. The
gradient w.r.t. the shard's logits (or its lm_head rows) stays on the rank; the gradient w.r.t.
replicated hidden states is a sum over the shards, all-reduced in the backward by default
(``reduce_hidden_grad=False`` leaves it partial, for a framework that reduces it itself, as
Megatron's column-parallel linear does). Values, gradients and statistics equal the
single-process op's up to floating-point summation order.

These run on the PyTorch path (opd_kernels/backends/torch.py, its chunking and helpers) on every
rank, whatever ``backend`` says ("auto" or "torch"): the logits of one chunk of rows over the
rank's shard are materialized at a time and recomputed in the backward, as that backend does.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import served
from ..distributed import VocabParallel, checked
from ..objectives import GradForm, Need, PassResults, reads_full_teacher, topk_ids
from ..objectives.base import plogp_terms
from ..stats import TopKStats
from .base import Backend, LossCall, LossResult, Model
from .torch import _over_chunks, _Source, _WithGrad, _blank_uncounted, _masked

NO_VALUE = -1  # a field of the call's signature that this op does not have


# ---- collectives -------------------------------------------------------------------------------

def _gather(t: torch.Tensor, group) -> torch.Tensor:
    """[size, *t.shape]: every rank's ``t``, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _summed(t: torch.Tensor, group) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


class _SumGradOverGroup(torch.autograd.Function):
    """The identity whose backward all-reduces the gradient (replicated hidden states feeding
    every rank's shard of the lm_head)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return _summed(grad.clone(), ctx.group), None


# ---- the set-up check --------------------------------------------------------------------------

def _signature_code(*parts) -> int:
    """One int naming what the call computes, for the ranks to compare."""
    return zlib.crc32(repr(parts).encode())


def _check_setup(vp: VocabParallel, rows: int, widths: dict, k, vocab: int, code: int) -> None:
    """One all_gather of the call's signature, checked alike on every rank (so all raise
    together): the ranges tile [0, total), each shard's width is its range's, the padding lies
    in the last shard, and the ranks agree on the rest."""
    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel needs torch.distributed initialized "
                           "(torch.distributed.init_process_group)")
    if dist.get_rank(vp.group) < 0:
        raise ValueError(f"vocab_parallel.group does not hold this process (global rank "
                         f"{dist.get_rank()}): pass the group of the ranks that split the "
                         f"vocabulary, this one among them")
    fields = {"the vocabulary total": vp.total, "the number of positions": rows,
              "k": NO_VALUE if k is None else k, "vocab_size": vocab,
              "the call (objective, its parameters, temperature, soft-caps, needs)": code}
    local = [vp.start, vp.stop, *widths.values(), *fields.values()]
    table = _gather(torch.tensor(local, dtype=torch.int64), vp.group).tolist()
    n_widths = len(widths)
    for column, what in enumerate(fields, start=2 + n_widths):
        values = [row[column] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"vocab_parallel: the ranks disagree on {what}: {values} (rank order)")
    ranges = [(row[0], row[1]) for row in table]
    ends = 0
    for start, stop in sorted(ranges):
        if start != ends:
            break
        ends = stop
    if ends != vp.total or len(ranges) != len(set(ranges)):
        raise ValueError(f"vocab_parallel ranges {ranges} (rank order) over the group's "
                         f"{len(ranges)} ranks do not tile the vocabulary [0, {vp.total}): the "
                         f"group must be the ranks that split the vocabulary, each range once")
    for rank, row in enumerate(table):
        for j, name in enumerate(widths):
            if row[2 + j] != row[1] - row[0]:
                raise ValueError(f"{name} on rank {rank} has {row[2 + j]} vocabulary entries but "
                                 f"its vocab_parallel range [{row[0]}, {row[1]}) has "
                                 f"{row[1] - row[0]}")
    last_start = max(start for start, _ in ranges)
    if not last_start < vocab <= vp.total:
        raise ValueError(f"vocab_size={vocab} must lie in the last shard [{last_start}, "
                         f"{vp.total}): padding ids [vocab_size, total) are supported there only")


# ---- one chunk of rows: the shard's passes and their collectives -------------------------------

@dataclass
class _Chunk:
    """What the shard path knows of one chunk of rows after its collectives. PassResults' x and
    lse are centered on the row's global max of x (``center_*``), as PassResults allows: fp32
    then keeps log p = x - lse exact where p is near 1 (the lse of the shards' lse would round
    at the logits' magnitude)."""

    x_s: torch.Tensor                       # [n, w] the student's x on this shard
    x_t: Optional[torch.Tensor]             # [n, w] the teacher's (dense teacher with a full pass)
    r: PassResults
    center_s: torch.Tensor                  # [n] the row's max of x over every shard
    center_t: Optional[torch.Tensor]
    rest_s: torch.Tensor                    # [n] log of the student's mass on the other shards
    rest_t: Optional[torch.Tensor]
    student_entropy: Optional[torch.Tensor] = None
    teacher_entropy: Optional[torch.Tensor] = None
    teacher_topk: Optional[torch.Tensor] = None


def _normalizers(x: list, group) -> tuple:
    """([m, n] each) the global max of each model's x (its rows [n, w] in ``x``), lse centered
    there, and the centered log-mass of the other shards: from each rank's max and lse centered
    on it, so that no lse is ever rounded at the logits' magnitude."""
    local_max = torch.stack([t.amax(-1) for t in x])                       # [m, n]
    safe = torch.where(local_max.isfinite(), local_max, torch.zeros_like(local_max))
    local_lse = torch.stack([torch.logsumexp(t - c[:, None], -1) for t, c in zip(x, safe)])
    every = _gather(torch.stack([local_max, local_lse]), group)            # [size, 2, m, n]
    center = every[:, 0].amax(0)
    safe_center = torch.where(center.isfinite(), center, torch.zeros_like(center))
    terms = (every[:, 0] - safe_center) + every[:, 1]                      # [size, m, n]
    others = terms.clone()
    others[dist.get_rank(group)] = -math.inf
    return safe_center, torch.logsumexp(terms, 0), torch.logsumexp(others, 0)


def _owned(x: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """x at global ``ids`` where this shard holds them, 0 elsewhere (summed over the ranks: x)."""
    local = ids - start
    inside = (local >= 0) & (local < x.shape[-1])
    at = x.gather(-1, local.clamp(0, x.shape[-1] - 1))
    return torch.where(inside, at, torch.zeros_like(at))


def _reselect(ids: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions in the gathered candidates [n, c] of the k largest values, largest first, ties
    to the lower global id (candidate ids are distinct: the shards are disjoint)."""
    by_id = ids.sort(-1)
    picked = topk_ids(values.gather(-1, by_id.indices), k)
    return by_id.indices.gather(-1, picked)


def _local_topk(x: torch.Tensor, k: int, start: int, total: int) -> tuple:
    """This shard's top-min(k, w) as ([n, k] global ids, their x), padded with -inf at ids past
    the vocabulary (never selected: the shards hold at least k real ids together)."""
    kk = min(k, x.shape[-1])
    local = topk_ids(x, kk)
    ids, values = local + start, x.gather(-1, local)
    if kk < k:
        pad = k - kk
        past = total + torch.arange(pad, device=x.device).expand(ids.shape[0], pad)
        ids = torch.cat([ids, past], -1)
        values = torch.cat([values, values.new_full((x.shape[0], pad), -math.inf)], -1)
    return local, ids, values


class _ShardPath:
    """One call on this rank's shard: both models' sources over the shard's ids below
    ``vocab`` (the padding of the last shard cut off), and the per-chunk passes."""

    def __init__(self, vp: VocabParallel, vocab: int, temperature: float, student: Model,
                 teacher: Optional[Model], weight_grad_dtype=torch.float32):
        self.vp, self.group, self.tau, self.vocab = vp, vp.group, temperature, vocab
        self.width = min(vocab, vp.stop) - vp.start
        if vp.reduce_hidden_grad and student.hidden is not None:
            student = replace(student, hidden=_SumGradOverGroup.apply(student.hidden, vp.group))
        self.student = _Source(student, self.width, weight_grad_dtype)
        self.teacher = None if teacher is None else _Source(teacher, self.width, weight_grad_dtype,
                                                             detach=True)

    @property
    def rows(self) -> list:
        return [self.student.rows, None if self.teacher is None else self.teacher.rows]

    @property
    def shared(self) -> list:
        return [*self.student.shared, *([] if self.teacher is None else self.teacher.shared)]

    def split_shared(self, shared) -> tuple:
        n_s = len(self.student.shared)
        return shared[:n_s], shared[n_s:]

    def over_chunks(self, fn: Callable, extra_rows: list) -> dict:
        """fn(student_rows, teacher_rows, *extra_row_chunks, shared_s, shared_t) -> dict of
        per-row tensors, without autograd, over chunks of rows that are the same on every rank
        (sized by the global vocabulary), concatenated; None values left out."""
        names: list = []

        def chunk(s, t, *rest):
            extra, shared = rest[: len(extra_rows)], rest[len(extra_rows):]
            out = {name: v for name, v in fn(s, t, *extra, *self.split_shared(shared)).items()
                   if v is not None}
            names[:] = list(out)
            return tuple(out.values())

        with torch.no_grad():
            columns = _over_chunks(chunk, self.vocab, [*self.rows, *extra_rows], self.shared)
        return dict(zip(names, columns))

    def pass_chunk(self, s, t, y, m, shared_s, shared_t, *, needs: frozenset, k=None,
                   params: Optional[dict] = None, stats: bool = False,
                   teacher_ids: Optional[torch.Tensor] = None) -> _Chunk:
        """Every per-row quantity ``needs`` asks for (and the statistics' own) for one chunk of
        rows, with their collectives; ``teacher_ids``: a served teacher's (global) ids."""
        tau, group, start = self.tau, self.group, self.vp.start
        (x_s,) = _blank_uncounted(m, self.student.logits(s, *shared_s) / tau)
        dense_teacher = self.teacher is not None and (reads_full_teacher(needs) or stats)
        x_t = None
        if dense_teacher:
            (x_t,) = _blank_uncounted(m, self.teacher.logits(t, *shared_t) / tau)
        center, lse, rest = _normalizers([x for x in (x_s, x_t) if x is not None], group)
        r = PassResults(lse_s=lse[0], tokens=y)
        teacher_part = lambda t: t[1] if dense_teacher else None
        chunk = _Chunk(x_s, x_t, r, center[0], teacher_part(center), rest[0], teacher_part(rest))
        log_p = (x_s - chunk.center_s[:, None]) - r.lse_s[:, None]
        no_mass = torch.zeros_like(log_p)
        parts: dict = {}  # this shard's terms of per-row sums, all-reduced as one tensor
        if dense_teacher:
            r.lse_t = lse[1]
            log_q = (x_t - chunk.center_t[:, None]) - r.lse_t[:, None]
            parts["reverse_kl"] = plogp_terms(log_p, log_q).sum(-1)
            parts["forward_kl"] = plogp_terms(log_q, log_p).sum(-1)
            if Need.MIXTURE in needs:
                beta = params["beta"]
                log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
                parts["mixture_student"] = plogp_terms(log_p, log_m).sum(-1)
                parts["mixture_teacher"] = plogp_terms(log_q, log_m).sum(-1)
            if stats:
                parts["teacher_entropy"] = -plogp_terms(log_q, no_mass).sum(-1)
        if stats:
            parts["student_entropy"] = -plogp_terms(log_p, no_mass).sum(-1)
        if y is not None:
            parts["student_token_x"] = _owned(x_s, y[:, None], start)[:, 0]
            if dense_teacher:
                parts["teacher_token_x"] = _owned(x_t, y[:, None], start)[:, 0]
        columns = [v[:, None] for v in parts.values()]
        if teacher_ids is not None:
            columns.append(_owned(x_s, teacher_ids, start))
        if columns:
            summed = _summed(torch.cat(columns, -1), group)
            totals = dict(zip(parts, summed.unbind(-1)))
            for name in ("reverse_kl", "forward_kl", "mixture_student", "mixture_teacher"):
                setattr(r, name, totals.get(name))
            chunk.student_entropy = totals.get("student_entropy")
            chunk.teacher_entropy = totals.get("teacher_entropy")
            if y is not None:
                r.student_logprob = (totals["student_token_x"] - chunk.center_s) - r.lse_s
                if dense_teacher:
                    r.teacher_logprob = (totals["teacher_token_x"] - chunk.center_t) - r.lse_t
            if teacher_ids is not None:
                r.student_at_teacher_ids = summed[:, len(parts):] - chunk.center_s[:, None]
        if Need.SUPPORT in needs or stats:
            self._support(chunk, t, m, shared_t, k, dense_teacher)
        return chunk

    def _support(self, chunk: _Chunk, t, m, shared_t, k: int, dense_teacher: bool) -> None:
        """S (the student's top-k) with both models' x there, and T (the teacher's own top-k)
        where its full pass ran: each rank's local top-k, one all_gather, re-selection."""
        start, r = self.vp.start, chunk.r
        # ranked on x itself (centering could round distinct values together), centered after
        local, ids, values = _local_topk(chunk.x_s, k, start, self.vocab)
        # ids travel as floats with the values: exact below 2^24 ids (fp32)
        columns = [ids.to(values.dtype), values]
        if self.teacher is not None:
            if dense_teacher:
                x_t_at = chunk.x_t.gather(-1, local)
            else:  # the teacher at the student's candidates only (k dot products a row)
                (x_t_at,) = _blank_uncounted(m, self.teacher.at_ids(t, local, *shared_t) / self.tau)
            columns.append(torch.cat([x_t_at, x_t_at.new_zeros(x_t_at.shape[0],
                                                               k - x_t_at.shape[-1])], -1))
        if dense_teacher:
            _, t_ids, t_values = _local_topk(chunk.x_t, k, start, self.vocab)
            columns += [t_ids.to(values.dtype), t_values]
        every = _gather(torch.stack(columns), self.group)     # [size, c, n, k]
        every = every.permute(1, 2, 0, 3).flatten(2)           # [c, n, size k]
        all_ids = every[0].long()
        order = _reselect(all_ids, every[1], k)
        r.support = all_ids.gather(-1, order)
        r.student_at_support = every[1].gather(-1, order) - chunk.center_s[:, None]
        if self.teacher is not None:  # centered as lse_t where the teacher's full pass ran
            r.teacher_at_support = every[2].gather(-1, order)
            if dense_teacher:
                r.teacher_at_support = r.teacher_at_support - chunk.center_t[:, None]
        if dense_teacher:
            all_t_ids = every[3].long()
            chunk.teacher_topk = all_t_ids.gather(-1, _reselect(all_t_ids, every[4], k))

    @staticmethod
    def statistics(chunk: _Chunk, k: int, m) -> dict:
        r = chunk.r
        return _fp32(TopKStats.from_support(
            k, r.support, chunk.teacher_topk, r.student_at_support - r.lse_s[:, None],
            r.teacher_at_support - r.lse_t[:, None], chunk.student_entropy, chunk.teacher_entropy,
            m, reverse_kl=r.reverse_kl, student_logprob=r.student_logprob,
            teacher_logprob=r.teacher_logprob))

    # ---- the gradient on this shard: no collectives, so the backward recomputes it per chunk

    def with_grad(self, columns: dict, form: GradForm, mask) -> torch.Tensor:
        """The per-row values, differentiable w.r.t. the student on this shard: the objective's
        GradForm (its per-row parts in ``columns``) evaluated on the shard's logits."""
        values = columns["value"]
        if not torch.is_grad_enabled() or not any(
                t.requires_grad for t in [self.student.rows, *self.student.shared]):
            return values
        teacher_terms = bool(form.reverse or form.forward or form.mixture)
        names = [name for name in _GRAD_COLUMNS if name in columns]
        tau, width, start = self.tau, self.width, self.vp.start

        def fn(s, t, m, per_row: dict, shared_s, shared_t):
            chunk_form = replace(form, shift=per_row.get("shift"),
                                 sparse_ids=per_row.get("sparse_ids"),
                                 sparse_values=per_row.get("sparse_values"))
            rows = None if m is None else m[:, None]
            if not chunk_form.dense:  # the student at the sparse ids this shard holds only
                local = chunk_form.sparse_ids - start
                inside = (local >= 0) & (local < width)
                (x,) = _blank_uncounted(m, self.student.at_ids(s, local.clamp(0, width - 1),
                                                               *shared_s) / tau)
                grad = torch.where(inside, chunk_form.sparse_values,
                                   torch.zeros_like(chunk_form.sparse_values))
                return (_WithGrad.apply(x, per_row["value"], _masked(grad, rows, 0.0)),)
            (x_s,) = _blank_uncounted(m, self.student.logits(s, *shared_s) / tau)
            x_t = None
            if teacher_terms:
                (x_t,) = _blank_uncounted(m, self.teacher.logits(t, *shared_t) / tau)
            with torch.no_grad():
                centered = lambda x, center: None if x is None else x - center[:, None]
                grad = self.local_grad(chunk_form, centered(x_s.detach(), per_row["center_s"]),
                                       centered(x_t, per_row.get("center_t")), per_row["rest_s"],
                                       per_row.get("rest_t"))
            return (_WithGrad.apply(x_s, per_row["value"], _masked(grad, rows, 0.0)),)

        def chunk(s, t, m, *rest):
            per_row, shared = dict(zip(names, rest[: len(names)])), rest[len(names):]
            return fn(s, t, m, per_row, *self.split_shared(shared))

        t_rows = self.rows[1] if teacher_terms else None
        rows = [self.rows[0], t_rows, mask, *(columns[name] for name in names)]
        return _over_chunks(chunk, width, rows, self.shared)[0]

    def local_grad(self, form: GradForm, x_s, x_t, rest_s, rest_t) -> torch.Tensor:
        """dL/dx_s [n, w] on this shard: the GradForm over the shard's columns plus one column a
        model holding the other shards' mass, so that log_softmax there is the global log p."""
        with_rest = lambda x, rest: torch.cat([x, rest[:, None].to(x.dtype)], -1)
        local = replace(form)
        if form.sparse_ids is not None:  # ids of other shards land in the extra column, cut off
            ids = form.sparse_ids - self.vp.start
            outside = (ids < 0) | (ids >= self.width)
            local.sparse_ids = torch.where(outside, torch.full_like(ids, self.width), ids)
        teacher = None if x_t is None else with_rest(x_t, rest_t)
        return local.materialize(with_rest(x_s, rest_s), teacher)[:, : self.width]


_GRAD_COLUMNS = ("value", "center_s", "center_t", "rest_s", "rest_t", "shift", "sparse_ids",
                 "sparse_values")


def _grad_columns(value, form: GradForm, chunk: _Chunk, mask) -> dict:
    """What the backward needs of one chunk's GradForm (the form's numbers are the call's)."""
    return {"value": _masked(value, mask, 0.0), "center_s": chunk.center_s,
            "center_t": chunk.center_t, "rest_s": chunk.rest_s, "rest_t": chunk.rest_t,
            "shift": form.shift, "sparse_ids": form.sparse_ids, "sparse_values": form.sparse_values}


class VocabParallelBackend(Backend):
    """The Backend interface over a vocabulary split; one instance a call (it holds the
    option). ``unit``: the argument names the shards' widths are reported under."""

    name = "vocab_parallel"

    def __init__(self, vp: VocabParallel, form: str, what: str):
        self.vp, self.form, self.what = vp, form, what
        self.unit = "logits" if form == "logits" else "weight"

    def _width(self, model: Model) -> int:
        return model.logits.shape[-1] if model.logits is not None else model.weight.shape[0]

    def _setup(self, models: dict, k, vocab: int, *call) -> None:
        rows = next(iter(models.values())).tensors[0].shape[0]
        widths = {name: self._width(model) for name, model in models.items()}
        _check_setup(self.vp, rows, widths, k, vocab, _signature_code(self.what, *call))

    def _call_setup(self, call: LossCall, teacher: Optional[Model], *more) -> None:
        """The set-up check of a loss or statistics call (``more``: what else the ranks must
        agree on, e.g. a served answer's K)."""
        models = {f"student_{self.unit}": call.student}
        if teacher is not None:
            models[f"teacher_{self.unit}"] = teacher
        objective = None if call.objective is None else call.objective.name
        self._setup(models, call.k if Need.SUPPORT in call.needs or call.return_stats else None,
                    call.vocab_size, objective, sorted(call.params.items()), call.temperature,
                    call.student.softcap, None if teacher is None else teacher.softcap,
                    sorted(n.name for n in call.needs), call.return_stats, call.tokens is None,
                    *more)

    # ---- the single-model ops: the GradForms of lse and of a token's log-prob

    def _single(self, model: Model, tokens, temperature: float, vocab: int, value_and_form):
        self._setup({self.unit: model}, None, vocab, temperature, model.softcap, tokens is None)
        path = _ShardPath(self.vp, vocab, temperature, model, None)
        call_form = None  # the GradForm's numbers are the call's: any chunk's will do

        def fn(s, t, y, shared_s, shared_t):
            nonlocal call_form
            chunk = path.pass_chunk(s, t, y, None, shared_s, shared_t, needs=frozenset())
            value, call_form = value_and_form(chunk)
            return _grad_columns(value, call_form, chunk, None)

        columns = path.over_chunks(fn, [tokens])
        return path.with_grad(columns, call_form, None)

    def logsumexp(self, model, temperature, vocab_size):
        def lse(chunk):  # PassResults' lse is centered
            r = chunk.r
            return r.lse_s + chunk.center_s, GradForm(shift=torch.ones_like(r.lse_s))
        return self._single(model, None, temperature, vocab_size, lse)

    def token_logprobs(self, model, tokens, temperature, vocab_size):
        def logprob(chunk):  # d(x_y - lse)/dx_v = [v = y] - p_v
            r = chunk.r
            ones = torch.ones_like(r.lse_s)
            return r.student_logprob, GradForm(shift=-ones, sparse_ids=r.tokens[:, None],
                                               sparse_values=ones[:, None])
        return self._single(model, tokens, temperature, vocab_size, logprob)

    # ---- a dense teacher

    def loss(self, call):
        self._call_setup(call, call.teacher)
        path = _ShardPath(self.vp, call.vocab_size, call.temperature, call.student, call.teacher,
                          call.weight_grad_dtype)
        call_form = None  # the GradForm's numbers are the call's: any chunk's will do

        def fn(s, t, y, m, shared_s, shared_t):
            nonlocal call_form
            chunk = path.pass_chunk(s, t, y, m, shared_s, shared_t, needs=call.needs, k=call.k,
                                    params=call.params, stats=call.return_stats)
            value, call_form = call.objective.from_passes(chunk.r, **call.params)
            stats = path.statistics(chunk, call.k, m) if call.return_stats else {}
            return {**_grad_columns(value, call_form, chunk, m), **_prefixed(stats)}

        columns = path.over_chunks(fn, [call.tokens, call.mask])
        values = path.with_grad(columns, call_form, call.mask)
        return LossResult(values, stats=_unprefixed(columns) if call.return_stats else None)

    def statistics(self, call):
        self._call_setup(call, call.teacher)
        path = _ShardPath(self.vp, call.vocab_size, call.temperature, call.student, call.teacher)

        def fn(s, t, y, m, shared_s, shared_t):
            chunk = path.pass_chunk(s, t, y, m, shared_s, shared_t, needs=call.needs, k=call.k,
                                    stats=True)
            return _prefixed(path.statistics(chunk, call.k, m))

        return _unprefixed(path.over_chunks(fn, [call.tokens, call.mask]))

    # ---- a served teacher (its ids global)

    def served_loss(self, call):
        self._call_setup(call, None, tuple(t.shape[-1] for t in call.teacher.tensors))
        path = _ShardPath(self.vp, call.vocab_size, call.temperature, call.student, None,
                          call.weight_grad_dtype)
        served_rows = [call.teacher.ids, call.teacher.logprobs, call.teacher.token_logprob,
                       call.teacher.logprobs_at]
        call_form = None  # the GradForm's numbers are the call's: any chunk's will do

        def fn(s, t, *rest):
            nonlocal call_form
            answer, (y, m, shared_s, shared_t) = rest[: len(served_rows)], rest[len(served_rows):]
            teacher = served.ServedTeacher(*answer)
            chunk = path.pass_chunk(s, t, y, m, shared_s, shared_t, needs=call.needs, k=call.k,
                                    params=call.params, stats=call.return_stats,
                                    teacher_ids=teacher.ids)
            r = served.complete(chunk.r, teacher, chunk.r.student_at_teacher_ids)
            value, call_form = call.objective.from_passes(r, **call.params)
            stats = {}
            if call.return_stats:
                stats = _fp32(served.statistics(teacher, call.k, r.support,
                                                r.student_at_support - r.lse_s[:, None],
                                                chunk.student_entropy, r.student_logprob, m))
            return {**_grad_columns(value, call_form, chunk, m), **_prefixed(stats)}

        columns = path.over_chunks(fn, [*served_rows, call.tokens, call.mask])
        values = path.with_grad(columns, call_form, call.mask)
        stats = _unprefixed(columns, teacher_entropy_is_bound=True) if call.return_stats else None
        return LossResult(values, stats=stats)

    def student_topk(self, model, k, vocab_size):
        self._setup({self.unit: model}, k, vocab_size)
        path = _ShardPath(self.vp, vocab_size, 1.0, model, None)

        def fn(s, t, shared_s, shared_t):
            chunk = path.pass_chunk(s, t, None, None, shared_s, shared_t,
                                    needs=frozenset({Need.SUPPORT}), k=k)
            return {"support": chunk.r.support}

        return path.over_chunks(fn, [])["support"]


_STAT = "stat:"


def _fp32(stats: TopKStats) -> dict:
    """The statistics' fields in fp32, as documented (from fp64 input, TopKStats.from_support
    fills the uncounted rows with a NaN of the input's dtype, which would promote them)."""
    return {name: v.float() for name, v in stats.tensors().items()}


def _prefixed(stats: dict) -> dict:
    return {_STAT + name: v for name, v in stats.items()}


def _unprefixed(columns: dict, teacher_entropy_is_bound: bool = False) -> TopKStats:
    """The statistics' columns of a call (named apart from the gradient's) as TopKStats."""
    fields = {name[len(_STAT):]: v for name, v in columns.items() if name.startswith(_STAT)}
    return TopKStats(**fields, teacher_entropy_is_bound=teacher_entropy_is_bound)


def backend(vp: VocabParallel, name: str, form: str, what: str) -> VocabParallelBackend:
    """The backend of a vocabulary-parallel call (``name``: the user's ``backend`` argument)."""
    checked(vp)
    if name not in ("auto", "torch"):
        raise ValueError(f"vocab_parallel runs on the PyTorch shard path: backend must be 'auto' "
                         f"or 'torch', got {name!r}")
    return VocabParallelBackend(vp, form, what)
