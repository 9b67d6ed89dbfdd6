"""The one forward pass over logits rows: every per-row quantity an OPD loss or statistic needs.

Notation (opd-math.md): x = z / tau for the student (s) and teacher (t) logits z of one row,
p = softmax(x_s), q = softmax(x_t).

``row_stats_partial_kernel``, grid (rows, vocabulary splits): each program reads its run of
vocabulary blocks of one row once (both models when a teacher is given) and keeps, per model,

    m = max_v x_v                        s = sum_v e^{x_v - m}              (lse = m + log s)
    c = sum_v e^{x_v - m} (x_v - m)        (the student's with WITH_TOPK, the teacher's WITH_STATS)
and, with a teacher,
    a = sum_v e^{xs_v - m_s} ((xs_v - m_s) - (xt_v - m_t))
    b = sum_v e^{xt_v - m_t} ((xt_v - m_t) - (xs_v - m_s))
plus the running top-K_PAD packed keys of the raw logits z (WITH_TOPK; ``insert_topk`` of
topk_select: a block costs one max and one min reduction unless some of its keys enter, and a
tie goes to the lower id, as in the reference's stable sort).
Then
    H(p)       = -sum p log p = log s - c / s
    KL(p || q) = sum p (log p - log q) = a / s_s - log s_s + log s_t
    KL(q || p) = b / s_t - log s_t + log s_s
(log p_v = x_v - m_s - log s_s, log q_v = xt_v - m_t - log s_t). The terms are centered on the
running maxima, so rows of logits near +-1e4 lose nothing to cancellation (the uncentered
sum p x would be ~1e4 and H or KL its small difference with lse).

When a max moves from m to m', every old term e^{x - m} d picks up the factor
alpha = e^{m - m'} and its centered value shifts by the constant m - m':
    s <- alpha s,   c <- alpha (c + s (m - m')),
    a <- alpha_s (a + s_s ((m_s - m_s') - (m_t - m_t'))),  b likewise with s and t swapped
(``moved`` of online_softmax.py). Each lane of the block keeps its own state over the loop
(``lane_step``: one new value a step, so alpha and e^{x - m'} come from the one exp
e^{-|x - m|}), and no
reduction runs inside the loop: the lanes are folded once at the end (``_reduce_state``), and
the splits' states are folded the same way in ``row_stats_finalize_kernel`` (deterministic:
no atomics, no locks).

Every 0 * inf is guarded: lanes with e^{x - m} = 0 (z = -inf, or outside the vocabulary) add
nothing; a max still at -inf is replaced by 0 as the reference so no -inf - (-inf) appears.
A teacher -inf where the student has mass makes a = +inf, hence KL = +inf (as the math says);
likewise b for the forward KL. Soft-capped models (cap > 0, a runtime scalar) are capped on
load, so everything above, the top-k keys included, sees the capped logits.

``row_stats_finalize_kernel``, grid (rows,): merges the splits and writes, field-major into
out[FIELD, row]: lse (and its parts m, log s) of both models, both KLs, the token log-probs
x_y - lse (HAS_TOKENS), the student's entropy and its top-k ids (WITH_TOPK, sorted: the splits'
lists are inserted into the first), the teacher's entropy and the top-k statistics
(WITH_STATS). Statistics from the
packed keys (exact fp32 logits with their ids), S = student top k, T = teacher top k:
    overlap = |S ∩ T| / k, m_p = sum_{S∩T} p, m_q = sum_{S∩T} q,
    A = (1/|S∩T|) sum_{S∩T} p̄ (log q̄ - log p̄), log p̄ = log p - log m_p (NaN if S∩T empty),
where q at an id of S ∩ T is read from T's key with the same id. Rows with mask False are not
read at all: the loss fields hold 0, the statistics NaN, the top-k ids 0.
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec
from opd_kernels.kernels.row_fields import FIELDS
from opd_kernels.kernels.online_softmax import fold_max, lane_step, moved, softcapped
from opd_kernels.kernels.topk_select import (MIN_KEY, insert_topk, no_keys, pack_keys, unpack_ids,
                                             unpack_values)

# Rows of the finalize kernel's [NUM_FIELDS, N] fp32 output (row_fields.py).
NUM_FIELDS = tl.constexpr(len(FIELDS))
(_LSE_S, _LSE_T, _MAX_S, _MAX_T, _LOGSUM_S, _LOGSUM_T, _KL, _FORWARD_KL, _LOGPROB_S, _LOGPROB_T,
 _H_S, _H_T, _OVERLAP, _MASS_S, _MASS_T, _ADVANTAGE) = (tl.constexpr(i) for i in range(len(FIELDS)))
# Per (row, split) partial state: m_s, s_s, c_s, m_t, s_t, c_t, a, b.
NUM_STATE = tl.constexpr(8)


@triton.jit
def _reduce_state(m_s, s_s, c_s, m_t, s_t, c_t, a, b, WITH_TOPK: tl.constexpr,
                  WITH_STATS: tl.constexpr, HAS_TEACHER: tl.constexpr):
    """Partial states held along axis 0 (lanes of a block, or splits of a row) -> one state."""
    max_s, alpha_s, shift_s = fold_max(m_s)
    if WITH_TOPK:
        c_s = tl.sum(moved(c_s, alpha_s, s_s, shift_s), axis=0)
    if HAS_TEACHER:
        max_t, alpha_t, shift_t = fold_max(m_t)
        a = tl.sum(moved(a, alpha_s, s_s, shift_s - shift_t), axis=0)
        b = tl.sum(moved(b, alpha_t, s_t, shift_t - shift_s), axis=0)
        if WITH_STATS:
            c_t = tl.sum(moved(c_t, alpha_t, s_t, shift_t), axis=0)
        s_t = tl.sum(s_t * alpha_t, axis=0)
        m_t = max_t
    s_s = tl.sum(s_s * alpha_s, axis=0)
    return max_s, s_s, c_s, m_t, s_t, c_t, a, b


@triton.heuristics({
    "HAS_TEACHER": lambda args: args["teacher_ptr"] is not None,
    "HAS_MASK": lambda args: args["mask_ptr"] is not None,
    "WITH_TOPK": lambda args: args["keys_ptr"] is not None,
    "WITH_STATS": lambda args: args["teacher_ptr"] is not None and args["keys_ptr"] is not None,
})
@triton.jit
def row_stats_partial_kernel(
    student_ptr, teacher_ptr, mask_ptr, state_ptr, keys_ptr,
    n_vocab, stride_s, stride_t, blocks_per_split, inv_tau, cap_s, cap_t,
    BLOCK_V: tl.constexpr, K_PAD: tl.constexpr,
    HAS_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr, WITH_TOPK: tl.constexpr,
    WITH_STATS: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    slot = row.to(tl.int64) * tl.num_programs(1) + split
    block_begin = split * blocks_per_split
    block_end = tl.minimum(block_begin + blocks_per_split, tl.cdiv(n_vocab, BLOCK_V))
    if HAS_MASK:  # an uncounted row runs no iteration: its logits are never read
        block_end = tl.where(tl.load(mask_ptr + row) != 0, block_end, block_begin)
    student_row = student_ptr + row.to(tl.int64) * stride_s

    # Per-lane running states: no reduction inside the loop, one exp an element and model.
    m_s = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_s = tl.zeros([BLOCK_V], tl.float32)
    c_s = tl.zeros([BLOCK_V], tl.float32)
    m_t = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_t = tl.zeros([BLOCK_V], tl.float32)
    c_t = tl.zeros([BLOCK_V], tl.float32)
    a = tl.zeros([BLOCK_V], tl.float32)
    b = tl.zeros([BLOCK_V], tl.float32)
    keys_s = no_keys(K_PAD)
    keys_t = no_keys(K_PAD)
    for block in range(block_begin, block_end):
        offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
        in_vocab = offs < n_vocab
        z_s = tl.load(student_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
        z_s = tl.where(in_vocab, softcapped(z_s, cap_s), float("-inf"))
        m_s_new, alpha_s, e_s, shift_s, d_s = lane_step(z_s * inv_tau, m_s)
        if WITH_TOPK:  # the student's entropy rides every pass that keeps its top-k
            c_s = moved(c_s, alpha_s, s_s, shift_s) + tl.where(e_s > 0, e_s * d_s, 0.0)
        if HAS_TEACHER:
            z_t = tl.load(teacher_ptr + row.to(tl.int64) * stride_t + offs, mask=in_vocab,
                          other=float("-inf")).to(tl.float32)
            z_t = tl.where(in_vocab, softcapped(z_t, cap_t), float("-inf"))
            m_t, alpha_t, e_t, shift_t, d_t = lane_step(z_t * inv_tau, m_t)
            a = (moved(a, alpha_s, s_s, shift_s - shift_t)
                 + tl.where(e_s > 0, e_s * (d_s - d_t), 0.0))
            b = (moved(b, alpha_t, s_t, shift_t - shift_s)
                 + tl.where(e_t > 0, e_t * (d_t - d_s), 0.0))
            if WITH_STATS:
                c_t = moved(c_t, alpha_t, s_t, shift_t) + tl.where(e_t > 0, e_t * d_t, 0.0)
            s_t = s_t * alpha_t + e_t
        s_s = s_s * alpha_s + e_s
        m_s = m_s_new
        if WITH_TOPK:
            # Only keys that enter the running top-k cost work: for a peaked row a few in the
            # first blocks, then one max and one min reduction a block.
            keys_s = insert_topk(keys_s, tl.where(in_vocab, pack_keys(z_s, offs), MIN_KEY))
            if WITH_STATS:
                keys_t = insert_topk(keys_t, tl.where(in_vocab, pack_keys(z_t, offs), MIN_KEY))

    m_s, s_s, c_s, m_t, s_t, c_t, a, b = _reduce_state(m_s, s_s, c_s, m_t, s_t, c_t, a, b,
                                                        WITH_TOPK, WITH_STATS, HAS_TEACHER)
    # Fields a pass does not compute stay unwritten; the finalize kernel does not read them.
    state = state_ptr + slot * NUM_STATE
    tl.store(state + 0, m_s)
    tl.store(state + 1, s_s)
    if WITH_TOPK:
        tl.store(state + 2, c_s)
    if WITH_STATS:
        tl.store(state + 5, c_t)
    if HAS_TEACHER:
        tl.store(state + 3, m_t)
        tl.store(state + 4, s_t)
        tl.store(state + 6, a)
        tl.store(state + 7, b)
    if WITH_TOPK:
        offs_k = tl.arange(0, K_PAD)
        tl.store(keys_ptr + (slot * 2) * K_PAD + offs_k, keys_s)
        if WITH_STATS:
            tl.store(keys_ptr + (slot * 2 + 1) * K_PAD + offs_k, keys_t)


@triton.jit
def _real_keys(keys, K_PAD: tl.constexpr):
    """A split's list with its empty lanes (no_keys) set to MIN_KEY, which never enters."""
    return tl.where(keys < MIN_KEY + K_PAD, MIN_KEY, keys)


@triton.jit
def _sorted_descending(keys, K_PAD: tl.constexpr):
    if K_PAD > 1:
        keys = tl.sort(keys, descending=True)
    return keys


@triton.jit
def _overlap_stats(keys_s, keys_t, m_s, log_s_s, m_t, log_s_t, k, inv_tau, K_PAD: tl.constexpr):
    """overlap, m_p, m_q, A of one row from the two sorted top-K_PAD key lists (first k used)."""
    offs_k = tl.arange(0, K_PAD)
    ids_s = tl.where(offs_k < k, unpack_ids(keys_s), -1)
    ids_t = tl.where(offs_k < k, unpack_ids(keys_t), -2)
    same = ids_s[:, None] == ids_t[None, :]                    # [i in S, j in T]
    shared = tl.max(same.to(tl.int32), axis=1) > 0             # S_i is also in T
    n_shared = tl.sum(shared.to(tl.int32), axis=0)
    log_p = (unpack_values(keys_s) * inv_tau - m_s) - log_s_s
    x_t_at_s = tl.sum(tl.where(same, (unpack_values(keys_t) * inv_tau)[None, :], 0.0), axis=1)
    log_q = (x_t_at_s - m_t) - log_s_t
    p = tl.where(shared, tl.exp(log_p), 0.0)
    q = tl.where(shared, tl.exp(log_q), 0.0)
    mass_p = tl.sum(p, axis=0)
    mass_q = tl.sum(q, axis=0)
    log_p_bar = log_p - tl.log(mass_p)
    log_q_bar = log_q - tl.log(mass_q)
    p_bar = p / mass_p
    terms = tl.where(p > 0, p_bar * (log_q_bar - log_p_bar), 0.0)
    advantage = tl.where(n_shared > 0, tl.sum(terms, axis=0) / n_shared, float("nan"))
    return n_shared.to(tl.float32) / k, mass_p, mass_q, advantage


@triton.heuristics({
    "HAS_TEACHER": lambda args: args["teacher_ptr"] is not None,
    "HAS_MASK": lambda args: args["mask_ptr"] is not None,
    "HAS_TOKENS": lambda args: args["tokens_ptr"] is not None,
    "WITH_TOPK": lambda args: args["keys_ptr"] is not None,
    "WITH_STATS": lambda args: args["teacher_ptr"] is not None and args["keys_ptr"] is not None,
})
@triton.jit
def row_stats_finalize_kernel(
    state_ptr, keys_ptr, student_ptr, teacher_ptr, tokens_ptr, mask_ptr, out_ptr, top_ids_ptr,
    n_rows, n_splits, stride_s, stride_t, inv_tau, cap_s, cap_t, k,
    SPLITS_PAD: tl.constexpr, K_PAD: tl.constexpr,
    HAS_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_TOKENS: tl.constexpr,
    WITH_TOPK: tl.constexpr, WITH_STATS: tl.constexpr,
):
    row = tl.program_id(0)
    counted = True
    if HAS_MASK:
        counted = tl.load(mask_ptr + row) != 0
    out = out_ptr + row
    offs_k = tl.arange(0, K_PAD)
    if counted:
        splits = tl.arange(0, SPLITS_PAD)
        state = state_ptr + (row.to(tl.int64) * n_splits + splits) * NUM_STATE
        real = splits < n_splits
        m_s, s_s, c_s, m_t, s_t, c_t, a, b = _reduce_state(
            tl.load(state + 0, mask=real, other=float("-inf")),
            tl.load(state + 1, mask=real, other=0.0), tl.load(state + 2, mask=real, other=0.0),
            tl.load(state + 3, mask=real, other=float("-inf")),
            tl.load(state + 4, mask=real, other=0.0), tl.load(state + 5, mask=real, other=0.0),
            tl.load(state + 6, mask=real, other=0.0), tl.load(state + 7, mask=real, other=0.0),
            WITH_TOPK, WITH_STATS, HAS_TEACHER)
        if WITH_TOPK:
            keys = keys_ptr + row.to(tl.int64) * n_splits * 2 * K_PAD
            keys_s = tl.load(keys + offs_k)
        if WITH_STATS:
            keys_t = tl.load(keys + K_PAD + offs_k)
        for split in range(1, n_splits):
            if WITH_TOPK:
                keys_s = insert_topk(keys_s, _real_keys(tl.load(keys + split * 2 * K_PAD + offs_k),
                                                        K_PAD))
            if WITH_STATS:
                keys_t = insert_topk(keys_t, _real_keys(
                    tl.load(keys + (split * 2 + 1) * K_PAD + offs_k), K_PAD))
        if WITH_TOPK:
            keys_s = _sorted_descending(keys_s, K_PAD)
        if WITH_STATS:
            keys_t = _sorted_descending(keys_t, K_PAD)
        log_s_s = tl.log(s_s)
        tl.store(out + _LSE_S * n_rows, m_s + log_s_s)
        tl.store(out + _MAX_S * n_rows, m_s)
        tl.store(out + _LOGSUM_S * n_rows, log_s_s)
        if HAS_TOKENS:
            token = tl.load(tokens_ptr + row)
            z_y = softcapped(tl.load(student_ptr + row.to(tl.int64) * stride_s + token).to(tl.float32),
                             cap_s)
            tl.store(out + _LOGPROB_S * n_rows, (z_y * inv_tau - m_s) - log_s_s)
        if HAS_TEACHER:
            log_s_t = tl.log(s_t)
            tl.store(out + _LSE_T * n_rows, m_t + log_s_t)
            tl.store(out + _MAX_T * n_rows, m_t)
            tl.store(out + _LOGSUM_T * n_rows, log_s_t)
            tl.store(out + _KL * n_rows, a / s_s - log_s_s + log_s_t)
            tl.store(out + _FORWARD_KL * n_rows, b / s_t - log_s_t + log_s_s)
            if HAS_TOKENS:
                z_y = softcapped(
                    tl.load(teacher_ptr + row.to(tl.int64) * stride_t + token).to(tl.float32), cap_t)
                tl.store(out + _LOGPROB_T * n_rows, (z_y * inv_tau - m_t) - log_s_t)
        if WITH_TOPK:
            tl.store(top_ids_ptr + row.to(tl.int64) * k + offs_k, unpack_ids(keys_s).to(tl.int64),
                     mask=offs_k < k)
            tl.store(out + _H_S * n_rows, log_s_s - c_s / s_s)
        if WITH_STATS:
            tl.store(out + _H_T * n_rows, log_s_t - c_t / s_t)
            overlap, mass_p, mass_q, advantage = _overlap_stats(
                keys_s, keys_t, m_s, log_s_s, m_t, log_s_t, k, inv_tau, K_PAD)
            tl.store(out + _OVERLAP * n_rows, overlap)
            tl.store(out + _MASS_S * n_rows, mass_p)
            tl.store(out + _MASS_T * n_rows, mass_q)
            tl.store(out + _ADVANTAGE * n_rows, advantage)
    else:
        # Not counted: loss inputs 0 (no value, no gradient), statistics NaN, top-k ids 0.
        for field in tl.static_range(_H_S):
            tl.store(out + field * n_rows, 0.0)
        for field in tl.static_range(_H_S, NUM_FIELDS):
            tl.store(out + field * n_rows, float("nan"))
        if WITH_TOPK:
            tl.store(top_ids_ptr + row.to(tl.int64) * k + offs_k, tl.zeros([K_PAD], tl.int64),
                     mask=offs_k < k)


def _partial_spec(dtype, label, teacher=True, mask=False, k_pad=0, block_v=2048, num_warps=8):
    ptr = f"*{dtype}"
    signature = {"student_ptr": ptr, "teacher_ptr": ptr if teacher else "constexpr",
                 "mask_ptr": "*i1" if mask else "constexpr", "state_ptr": "*fp32",
                 "keys_ptr": "*i64" if k_pad else "constexpr",
                 "n_vocab": "i32", "stride_s": "i32", "stride_t": "i32",
                 "blocks_per_split": "i32", "inv_tau": "fp32", "cap_s": "fp32", "cap_t": "fp32",
                 "BLOCK_V": "constexpr", "K_PAD": "constexpr", "HAS_TEACHER": "constexpr",
                 "HAS_MASK": "constexpr", "WITH_TOPK": "constexpr", "WITH_STATS": "constexpr"}
    constexprs = {"BLOCK_V": block_v, "K_PAD": max(k_pad, 1), "HAS_TEACHER": teacher,
                  "HAS_MASK": mask, "WITH_TOPK": bool(k_pad), "WITH_STATS": teacher and bool(k_pad)}
    for name, present in (("teacher_ptr", teacher), ("mask_ptr", mask), ("keys_ptr", k_pad)):
        if not present:
            constexprs[name] = None
    return AOTSpec(row_stats_partial_kernel.fn, signature, constexprs, num_warps=num_warps,
                   num_stages=2, label=label)


def _finalize_spec(dtype, label, teacher=True, mask=False, tokens=False, k_pad=0):
    ptr = f"*{dtype}"
    signature = {"state_ptr": "*fp32", "keys_ptr": "*i64" if k_pad else "constexpr",
                 "student_ptr": ptr, "teacher_ptr": ptr if teacher else "constexpr",
                 "tokens_ptr": "*i64" if tokens else "constexpr",
                 "mask_ptr": "*i1" if mask else "constexpr", "out_ptr": "*fp32",
                 "top_ids_ptr": "*i64" if k_pad else "constexpr",
                 "n_rows": "i32", "n_splits": "i32", "stride_s": "i32", "stride_t": "i32",
                 "inv_tau": "fp32", "cap_s": "fp32", "cap_t": "fp32", "k": "i32",
                 "SPLITS_PAD": "constexpr",
                 "K_PAD": "constexpr", "HAS_TEACHER": "constexpr", "HAS_MASK": "constexpr",
                 "HAS_TOKENS": "constexpr", "WITH_TOPK": "constexpr", "WITH_STATS": "constexpr"}
    constexprs = {"SPLITS_PAD": 8, "K_PAD": max(k_pad, 1), "HAS_TEACHER": teacher, "HAS_MASK": mask,
                  "HAS_TOKENS": tokens, "WITH_TOPK": bool(k_pad),
                  "WITH_STATS": teacher and bool(k_pad)}
    for name, present in (("keys_ptr", k_pad), ("teacher_ptr", teacher), ("tokens_ptr", tokens),
                          ("mask_ptr", mask), ("top_ids_ptr", k_pad)):
        if not present:
            constexprs[name] = None
    return AOTSpec(row_stats_finalize_kernel.fn, signature, constexprs, num_warps=4,
                   num_stages=1, label=label)


AOT_SPECS = [
    # logsumexp / token log-probs: student only
    *(_partial_spec(dt, f"{dt},lse", teacher=False) for dt in ("fp32", "bf16", "fp16")),
    # reverse KL (full objective), sampled objective
    *(_partial_spec(dt, f"{dt},kl", mask=True) for dt in ("fp32", "bf16", "fp16")),
    # topk objective without statistics: the student's selection only
    _partial_spec("bf16", "bf16,top16", teacher=False, mask=True, k_pad=16),
    # statistics (+ KL) from the same pass
    _partial_spec("bf16", "bf16,kl,stats,top16", mask=True, k_pad=16),
    _partial_spec("bf16", "bf16,kl,stats,top64", mask=True, k_pad=64),
    _partial_spec("fp32", "fp32,kl,stats,top1", k_pad=1),
    _finalize_spec("bf16", "bf16,lse,tokens", teacher=False, tokens=True),
    _finalize_spec("bf16", "bf16,kl,tokens,mask", mask=True, tokens=True),
    _finalize_spec("bf16", "bf16,top16,mask", teacher=False, mask=True, k_pad=16),
    _finalize_spec("bf16", "bf16,stats,top64,mask", mask=True, k_pad=64),
    _finalize_spec("fp32", "fp32,stats,top1", k_pad=1),
]
