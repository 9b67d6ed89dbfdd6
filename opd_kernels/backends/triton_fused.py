"""The Triton backend of the fused-linear form: OPD losses and statistics from hidden states, the
logits z = softcap(h W^T + b) never in memory.

The passes (forward, no autograd) each produce per-row quantities of objectives.PassResults,
in x = z / tau units, and run only where the call's needs ask for them:
    the pair pass (fused_linear_kl.py)       lse_s, lse_t, KL(p || q), KL(q || p)     reads_full_teacher
    the mixture pass (fused_linear_mixture)  KL(p || m), KL(q || m) after the pair    Need.MIXTURE
    a single-model pass (fused_linear_lse)   lse, the top-k (and entropy for stats)   Need.SUPPORT,
                                             or lse_s alone where no pair pass runs   statistics
    gathers (fused_linear_topk.py)           x at k ids a row: the teacher at S, both models at
                                             the tokens                               Need.SUPPORT, TOKENS
The objective turns them into its values and GradForm; the student's gradients come from
triton_fused_grad.py, recomputed in the backward or, for a reduced loss, inside the forward.

FLOPs per call, with P_s = 2 N K Hs and P_t = 2 N K Ht one lm_head product of each model; the
floor counts what no implementation can avoid (the forward products the loss needs, plus the
dense backward's two GEMMs, 2 P_s, where the gradient is dense):
    objective            path               forward           backward                     floor
    full, forward_kl     per-row            P_s + P_t         P_s + P_t (recompute) + 2 P_s  3 P_s + P_t
    sampled              per-row            P_s + P_t         P_s (recompute) + 2 P_s        3 P_s + P_t
    jsd (0 < beta < 1)   per-row            2 (P_s + P_t)     P_s + P_t + 2 P_s              3 P_s + P_t
    topk_pg              per-row            2 P_s + P_t       P_s + 2 P_s (+ k-sparse)       3 P_s + P_t
    dense objectives     grad in forward    P_s + P_t + 2 P_s (a scale)                      3 P_s + P_t
    topk                 (both)             P_s + 2 N k Ht    4 N k Hs (k-sparse)            P_s
    logsumexp, token log-probs: P_s forward, P_s + 2 P_s backward                           3 P_s
Qwen2.5 1.5B <- 7B, N = 8192: P_s = 3.8 TFLOP, P_t = 8.9 TFLOP, so "full" does 33.1 TFLOP on
the per-row path and the 20.4 TFLOP floor with the gradient in the forward; "topk" ~3.8 TFLOP,
no teacher lm_head product at all. The gradient-in-forward path pays memory passes instead, per
element of the [N, K] logits: 8 B written by the two products (fp32), 8 B read by the passes,
8 B (4 for "sampled") read and 2 B written for dL/du, 4 B read by the two GEMMs: ~30 B, ~9 ms
at 4.3 TB/s on the shapes above against ~26 ms of floor matmuls.
``return_stats`` adds both models' top-k and entropies, and the full reverse KL: free with the
gradient in the forward (the same pass over the scratch carries them); P_s + P_t on the per-row
path (two single-model passes beside the objective's pair pass); 2 P_t + P_s for "topk" (the
teacher's single pass and the pair pass for the KL; the student's pass carries its top-k), and
likewise for the statistics alone (``fused_linear_topk_overlap``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..kernels.fused_linear_kl import PARTS, fused_linear_kl_kernel, fused_linear_kl_merge_kernel
from ..kernels.fused_linear_lse import fused_linear_lse_kernel, fused_linear_lse_merge_kernel
from ..kernels.fused_linear_mixture import fused_linear_mixture_kernel
from ..kernels.fused_linear_topk import fused_linear_gather_logits_kernel
from .. import served
from ..objectives import GradForm, Need, PassResults, reads_full_teacher
from ..stats import TopKStats
from . import _interpreter_compat  # noqa: F401  (before any launch under TRITON_INTERPRET=1)
from . import triton_fused_grad as fused_grad
from . import triton_logits
from .base import Backend, Capabilities, LossCall, LossResult, Model
from .triton_fused_grad import Backward, Side, tiles

# The bound on a token chunk's buffers: dL/du [rows, K] in the activations' dtype for the per-row
# backward; that and the fp32 logits of both models for the gradient in the forward (10 B an
# element for bf16: 700-row chunks at K = 152K). Larger chunks make bigger GEMMs and fewer
# read-modify-writes of the fp32 dW (at K = 152K, Hs = 1536 the dW GEMM of a chunk is
# memory-bound below ~700 rows); the memory is the only cost. Read at each call.
SCRATCH_BYTES = 2**30

# The largest k the running top-k keeps on-chip (the registry checks it).
MAX_K = 64


def _splits(row_blocks: int, vocab_tiles: int, device: torch.device, splits=None) -> tuple:
    """(splits, tiles per split): enough programs to fill the GPU twice when rows are few
    (``splits``: the tests pin the count to exercise the merge)."""
    if splits is None:
        units = (torch.cuda.get_device_properties(device).multi_processor_count
                 if device.type == "cuda" else 2)
        splits = min(vocab_tiles, max(1, triton.cdiv(2 * units, max(row_blocks, 1))))
    per_split = triton.cdiv(vocab_tiles, max(splits, 1))
    return triton.cdiv(vocab_tiles, per_split), per_split


def _k_pad(k: int, block_v: int) -> int:
    k_pad = max(2, triton.next_power_of_2(k))
    if k_pad > block_v:
        raise ValueError(f"k={k} is larger than the fused-linear top-k supports ({block_v})")
    return k_pad


@dataclass
class _RowStats:
    lse: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None      # [N, k] int64, descending
    topk_logits: Optional[torch.Tensor] = None   # [N, k] fp32 x at those ids (exact)


def _row_stats(side: Side, vocab: int, temperature: float, entropy=False, k=0,
               splits=None) -> _RowStats:
    """One model's per-row statistics in one pass over its logits tiles (fused_linear_lse.py)."""
    hidden, weight = side.hidden, side.weight
    n, width = hidden.shape
    device = hidden.device
    t = tiles(hidden, topk=k > 0)
    row_blocks, vocab_tiles = triton.cdiv(n, t.block_n), triton.cdiv(vocab, t.block_v)
    n_splits, per_split = _splits(row_blocks, vocab_tiles, device, splits)
    k_pad = _k_pad(k, t.block_v) if k else 1
    part = lambda: torch.empty(n_splits, n, dtype=torch.float32, device=device)
    part_max, part_sum, part_c = part(), part(), part() if entropy else None
    part_keys = torch.empty(n_splits, n, k_pad, dtype=torch.int64, device=device) if k else None
    row = lambda: torch.empty(n, dtype=torch.float32, device=device)
    out = _RowStats(lse=row(), entropy=row() if entropy else None)
    if k:
        out.topk_ids = torch.empty(n, k, dtype=torch.int64, device=device)
        out.topk_logits = torch.empty(n, k, dtype=torch.float32, device=device)
    if n == 0:
        return out
    fused_linear_lse_kernel[(row_blocks, n_splits)](
        hidden, weight, side.bias, part_max, part_sum, part_c, part_keys,
        n, vocab, width, hidden.stride(0), weight.stride(0), 1.0 / temperature, side.cap, per_split,
        BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_H=t.block_h, K_PAD=k_pad,
        num_warps=t.num_warps)
    merge_rows = 64
    fused_linear_lse_merge_kernel[(triton.cdiv(n, merge_rows),)](
        part_max, part_sum, part_c, part_keys, out.lse, out.entropy, out.topk_ids,
        out.topk_logits, n, n_splits, k, BLOCK_N=merge_rows, K_PAD=k_pad)
    return out


def _pair_tiles(s: Side, t: Side):
    return tiles(s.hidden if s.hidden.shape[1] >= t.hidden.shape[1] else t.hidden, pair=True)


def _pair_args(s: Side, t: Side) -> tuple:
    """The pointer, size and stride arguments the two-model kernels share."""
    return (s.hidden, s.weight, s.bias, t.hidden, t.weight, t.bias)


def _pair_sizes(s: Side, t: Side) -> tuple:
    return (s.hidden.shape[1], t.hidden.shape[1], s.hidden.stride(0), s.weight.stride(0),
            t.hidden.stride(0), t.weight.stride(0))


def _pair_pass(s: Side, t: Side, vocab: int, temperature: float, splits=None) -> tuple:
    """(lse_s, lse_t, KL(p || q), KL(q || p)) per row in one pass over both models' tiles."""
    n, device = s.hidden.shape[0], s.hidden.device
    tl_ = _pair_tiles(s, t)
    row_blocks, vocab_tiles = triton.cdiv(n, tl_.block_n), triton.cdiv(vocab, tl_.block_v)
    n_splits, per_split = _splits(row_blocks, vocab_tiles, device, splits)
    outs = tuple(torch.empty(n, dtype=torch.float32, device=device) for _ in range(4))
    if n == 0:
        return outs
    parts = torch.empty(n_splits, PARTS.value, n, dtype=torch.float32, device=device)
    fused_linear_kl_kernel[(row_blocks, n_splits)](
        *_pair_args(s, t), parts, n, vocab, *_pair_sizes(s, t), 1.0 / temperature, s.cap, t.cap,
        per_split, BLOCK_N=tl_.block_n, BLOCK_V=tl_.block_v, BLOCK_H=tl_.block_h,
        num_warps=tl_.num_warps)
    merge_rows = 128
    fused_linear_kl_merge_kernel[(triton.cdiv(n, merge_rows),)](
        parts, *outs, n, n_splits, BLOCK_N=merge_rows)
    return outs


def _mixture_pass(s: Side, t: Side, lse_s, lse_t, vocab: int, temperature: float, beta: float,
                  splits=None) -> tuple:
    """(KL(p || m), KL(q || m)) per row, m = beta q + (1 - beta) p (fused_linear_mixture.py)."""
    n, device = s.hidden.shape[0], s.hidden.device
    tl_ = _pair_tiles(s, t)
    row_blocks, vocab_tiles = triton.cdiv(n, tl_.block_n), triton.cdiv(vocab, tl_.block_v)
    n_splits, per_split = _splits(row_blocks, vocab_tiles, device, splits)
    parts = torch.zeros(n_splits, 2, n, dtype=torch.float32, device=device)
    if n:
        fused_linear_mixture_kernel[(row_blocks, n_splits)](
            *_pair_args(s, t), lse_s, lse_t, parts, n, vocab, *_pair_sizes(s, t),
            1.0 / temperature, s.cap, t.cap, math.log(beta), math.log1p(-beta), per_split,
            BLOCK_N=tl_.block_n, BLOCK_V=tl_.block_v, BLOCK_H=tl_.block_h, num_warps=tl_.num_warps)
    total = parts.sum(0)  # the splits in a fixed order
    return total[0], total[1]


def _gather(side: Side, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """x[n, j] = softcap(h[n] . W[ids[n, j]] + b[ids[n, j]]) / tau, fp32 [N, k]."""
    hidden = side.hidden
    n, k = ids.shape
    out = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    if n:
        fused_linear_gather_logits_kernel[(n,)](
            hidden, side.weight, side.bias, ids.contiguous(), out, k, hidden.shape[1],
            hidden.stride(0), side.weight.stride(0), 1.0 / temperature, side.cap,
            K_PAD=max(2, triton.next_power_of_2(k)),
            BLOCK_H=min(128, triton.next_power_of_2(hidden.shape[1])))
    return out


@dataclass
class _Passes:
    results: PassResults
    student: Optional[_RowStats] = None   # the single-model passes, where they ran
    teacher: Optional[_RowStats] = None


@torch.no_grad()
def _passes(call: LossCall, s: Side, t: Side, needs: frozenset, with_stats: bool) -> _Passes:
    """Every quantity ``needs`` asks for, each pass run once (see the module docstring)."""
    vocab, tau = call.vocab_size, call.temperature
    # the statistics carry the full reverse KL, which only the pair pass computes
    pair = reads_full_teacher(needs) or with_stats
    k = call.k if Need.SUPPORT in needs or with_stats else 0
    out = _Passes(PassResults(lse_s=None))
    r = out.results
    if not pair or k:
        out.student = _row_stats(s, vocab, tau, entropy=with_stats, k=k)
        r.lse_s = out.student.lse
    if pair:
        r.lse_s, r.lse_t, r.reverse_kl, r.forward_kl = _pair_pass(s, t, vocab, tau)
    if with_stats:
        out.teacher = _row_stats(t, vocab, tau, entropy=True, k=k)
    if Need.MIXTURE in needs:
        r.mixture_student, r.mixture_teacher = _mixture_pass(
            s, t, r.lse_s, r.lse_t, vocab, tau, call.params.get("beta", 0.5))
    if k:
        r.support, r.student_at_support = out.student.topk_ids, out.student.topk_logits
        r.teacher_at_support = _gather(t, r.support, tau)
    tokens = call.tokens
    if tokens is not None and (Need.TOKENS in needs or with_stats):
        r.tokens = tokens
        ids = tokens[:, None]
        r.student_logprob = _gather(s, ids, tau)[:, 0] - r.lse_s
        lse_t = r.lse_t if r.lse_t is not None else out.teacher.lse if out.teacher else None
        if lse_t is not None:
            r.teacher_logprob = _gather(t, ids, tau)[:, 0] - lse_t
    return out


def _overlap_stats(p: _Passes, k: int, mask: Optional[torch.Tensor]) -> TopKStats:
    """The statistics from both single passes' top-k, lse and entropy and x_t at S; the reverse
    KL from the pair pass, the log-probs where tokens were given."""
    student, teacher, r = p.student, p.teacher, p.results
    return TopKStats.from_support(
        k, student.topk_ids, teacher.topk_ids, student.topk_logits - student.lse[:, None],
        r.teacher_at_support - teacher.lse[:, None], student.entropy, teacher.entropy, mask,
        reverse_kl=r.reverse_kl, student_logprob=r.student_logprob,
        teacher_logprob=r.teacher_logprob)


def _sparse_du(s: Side, form: GradForm, temperature: float) -> Optional[torch.Tensor]:
    """The form's sparse values as dL/du at their ids: times softcap'(z) / tau, z gathered there."""
    if form.sparse_ids is None:
        return None
    du = form.sparse_values.float() / temperature
    if s.cap:
        z = _gather(s, form.sparse_ids, temperature) * temperature
        du = du * (1 - (z / s.cap) ** 2)
    return du


def _masked(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return values if mask is None else torch.where(mask, values, torch.zeros_like(values))


class TritonFusedBackend(Backend):
    name = "triton"
    capabilities = Capabilities(
        forms=frozenset({"fused_linear"}), devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        max_k=MAX_K, needs_interpreter_off_gpu=True, served_teacher=True)

    def _single(self, model: Model, temperature, vocab_size, form_of, tokens=None):
        """A one-model value from its lse pass (and the logits at ``tokens``), with the backward
        of the GradForm ``form_of(lse)`` gives."""
        s = Side.of(model)
        with torch.no_grad():
            lse = _row_stats(s, vocab_size, temperature).lse
            value = lse if tokens is None else _gather(s, tokens[:, None], temperature)[:, 0] - lse
        form = form_of(lse)
        plan = Backward(s, None, vocab_size, temperature, form, lse, SCRATCH_BYTES,
                        sparse_du=_sparse_du(s, form, temperature))
        return fused_grad.attach(model, value, plan)

    def logsumexp(self, model, temperature, vocab_size):
        return self._single(model, temperature, vocab_size,
                            lambda lse: GradForm(shift=torch.ones_like(lse)))

    def token_logprobs(self, model, tokens, temperature, vocab_size):
        tokens = tokens.contiguous()
        # d log p(y)/dx_v = onehot(y)_v - p_v
        form_of = lambda lse: GradForm(shift=-torch.ones_like(lse), sparse_ids=tokens[:, None],
                                       sparse_values=torch.ones_like(lse)[:, None])
        return self._single(model, temperature, vocab_size, form_of, tokens)

    def statistics(self, call):
        s, t = Side.of(call.student), Side.of(call.teacher)
        p = _passes(call, s, t, frozenset({Need.SUPPORT}), with_stats=True)
        return _overlap_stats(p, call.k, call.mask)

    def loss(self, call):
        s, t = Side.of(call.student), Side.of(call.teacher)
        objective_needs = call.objective.needs(call.params)
        if (call.grad_in_forward and call.reduction in ("mean", "sum") and s.hidden.shape[0] > 0
                and fused_grad.wants_grad(call.student) and reads_full_teacher(objective_needs)):
            # the teacher's full product is paid anyway: the gradient rides the forward's scratch
            value, stats = fused_grad.reduced_loss(call, s, t, call.needs, call.tokens,
                                                   call.return_stats, SCRATCH_BYTES,
                                                   triton_logits.KERNELS)
            return LossResult(value, reduced=True, stats=stats)
        p = _passes(call, s, t, objective_needs, call.return_stats)
        with torch.no_grad():
            values, form = call.objective.from_passes(p.results, **call.params)
            values = _masked(values.float(), call.mask)
            sparse_du = _sparse_du(s, form, call.temperature)
        r = p.results
        plan = Backward(s, t if form.dense else None, call.vocab_size, call.temperature, form,
                        r.lse_s, SCRATCH_BYTES, r.lse_t, call.mask, sparse_du, call.weight_grad_dtype)
        stats = _overlap_stats(p, call.k, call.mask) if call.return_stats else None
        return LossResult(fused_grad.attach(call.student, values, plan), stats=stats)


    def served_loss(self, call):
        """Against a served teacher: one pass over the student's lm_head tiles (its lse, top-k
        and entropy where asked), gathers at the served ids (k dot products a row), and
        opd_kernels.served for the rest; the backward is the student's alone."""
        s, teacher, tau = Side.of(call.student), call.teacher, call.temperature
        support = Need.SUPPORT in call.needs or call.return_stats
        with torch.no_grad():
            st = _row_stats(s, call.vocab_size, tau, entropy=call.return_stats,
                            k=call.k if support else 0)
            r = PassResults(lse_s=st.lse, support=st.topk_ids, student_at_support=st.topk_logits)
            tokens = call.tokens
            if tokens is not None:
                r.tokens = tokens
                r.student_logprob = _gather(s, tokens[:, None], tau)[:, 0] - st.lse
            served.complete(r, teacher, _gather(s, teacher.ids, tau))
            values, form = call.objective.from_passes(r, **call.params)
            values = _masked(values.float(), call.mask)
            sparse_du = _sparse_du(s, form, tau)
        plan = Backward(s, None, call.vocab_size, tau, form, st.lse, SCRATCH_BYTES, None,
                        call.mask, sparse_du, call.weight_grad_dtype)
        stats = None
        if call.return_stats:
            stats = served.statistics(teacher, call.k, st.topk_ids, st.topk_logits - st.lse[:, None],
                                      st.entropy, r.student_logprob, call.mask)
        return LossResult(fused_grad.attach(call.student, values, plan), stats=stats)

    def student_topk(self, model, k, vocab_size):
        with torch.no_grad():
            return _row_stats(Side.of(model), vocab_size, 1.0, k=k).topk_ids


BACKEND = TritonFusedBackend()
