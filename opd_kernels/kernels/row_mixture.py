"""The generalized JSD's second pass over logits rows: the two mixture divergences.

With the row's final normalizers known from the first pass (row_stats.py), p = softmax(x_s),
q = softmax(x_t) and m = beta q + (1 - beta) p (0 < beta < 1):

    J_p = KL(p || m) = sum_v p_v (log p_v - log m_v),   J_q = KL(q || m) = sum_v q_v (log q_v - log m_v)

log m needs both normalizers, so no online form exists: this is a plain sum, split over the
vocabulary like the first pass when rows are few. Each (row, split) program writes its two
partial sums, which the launcher adds in a fixed order (deterministic). Terms where the
weight (p_v or q_v) is 0 add nothing. Rows with mask False are not read and sum to 0.
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec
from opd_kernels.kernels.online_softmax import log_mixture, softcapped


@triton.heuristics({"HAS_MASK": lambda args: args["mask_ptr"] is not None})
@triton.jit
def mixture_kernel(
    student_ptr, teacher_ptr, mask_ptr, max_s_ptr, logsum_s_ptr, max_t_ptr, logsum_t_ptr,
    partial_ptr, n_rows, n_vocab, stride_s, stride_t, blocks_per_split, inv_tau, cap_s, cap_t,
    log_beta, log_1m_beta, BLOCK_V: tl.constexpr, HAS_MASK: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    block_begin = split * blocks_per_split
    block_end = tl.minimum(block_begin + blocks_per_split, tl.cdiv(n_vocab, BLOCK_V))
    if HAS_MASK:  # an uncounted row runs no iteration
        block_end = tl.where(tl.load(mask_ptr + row) != 0, block_end, block_begin)
    # log p = (x - max) - logsum from the split lse: an fp32 lse near |x| = 1e4 is off by ~1e-3
    max_s, logsum_s = tl.load(max_s_ptr + row), tl.load(logsum_s_ptr + row)
    max_t, logsum_t = tl.load(max_t_ptr + row), tl.load(logsum_t_ptr + row)
    j_p = tl.zeros([BLOCK_V], tl.float32)
    j_q = tl.zeros([BLOCK_V], tl.float32)
    for block in range(block_begin, block_end):
        offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
        in_vocab = offs < n_vocab
        z_s = softcapped(tl.load(student_ptr + row.to(tl.int64) * stride_s + offs, mask=in_vocab,
                                 other=0.0).to(tl.float32), cap_s)
        z_t = softcapped(tl.load(teacher_ptr + row.to(tl.int64) * stride_t + offs, mask=in_vocab,
                                 other=0.0).to(tl.float32), cap_t)
        log_p = tl.where(in_vocab, (z_s * inv_tau - max_s) - logsum_s, float("-inf"))
        log_q = tl.where(in_vocab, (z_t * inv_tau - max_t) - logsum_t, float("-inf"))
        log_m = log_mixture(log_p, log_q, log_beta, log_1m_beta)
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        j_p += tl.where(p > 0, p * (log_p - log_m), 0.0)
        j_q += tl.where(q > 0, q * (log_q - log_m), 0.0)
    out = partial_ptr + (split.to(tl.int64) * n_rows + row) * 2
    tl.store(out, tl.sum(j_p, axis=0))
    tl.store(out + 1, tl.sum(j_q, axis=0))


def _spec(dtype, label, mask=False, block_v=2048, num_warps=8):
    ptr = f"*{dtype}"
    signature = {"student_ptr": ptr, "teacher_ptr": ptr, "mask_ptr": "*i1" if mask else "constexpr",
                 **dict.fromkeys(["max_s_ptr", "logsum_s_ptr", "max_t_ptr", "logsum_t_ptr",
                                  "partial_ptr"], "*fp32"),
                 **dict.fromkeys(["n_rows", "n_vocab", "stride_s", "stride_t", "blocks_per_split"],
                                 "i32"),
                 **dict.fromkeys(["inv_tau", "cap_s", "cap_t", "log_beta", "log_1m_beta"], "fp32"),
                 "BLOCK_V": "constexpr", "HAS_MASK": "constexpr"}
    constexprs = {"BLOCK_V": block_v, "HAS_MASK": mask}
    if not mask:
        constexprs["mask_ptr"] = None
    return AOTSpec(mixture_kernel.fn, signature, constexprs, num_warps=num_warps, num_stages=2,
                   label=label)


AOT_SPECS = [_spec("bf16", "bf16,mask", mask=True), _spec("fp16", "fp16"), _spec("fp32", "fp32")]
