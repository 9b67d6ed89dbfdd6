"""The generalized JSD's mixture sums per row, a second pass over both models' tiles.

With m = beta q + (1 - beta) p (0 < beta < 1), the JSD needs per row
    J_p = KL(p || m) = sum_v p_v (log p_v - log m_v),   J_q = KL(q || m) = sum_v q_v (log q_v - log m_v)
and log m_v needs both final normalizers: log p_v = x^s_v - lse_s, log q_v = x^t_v - lse_t with
lse_s, lse_t from the pair pass (fused_linear_kl.py). With the normalizers known nothing is
rescaled: every term is final, p, q <= 1, and each program sums its run of vocabulary tiles.

``fused_linear_mixture_kernel``, grid (row blocks, vocabulary splits), writes fp32
[splits, 2, N] partial sums (J_p, J_q); the launcher adds the splits in a fixed order.
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec
from opd_kernels.kernels.fused_linear_tile import dot_precision, has, logits_tile
from opd_kernels.kernels.online_softmax import log_mixture


@triton.heuristics({
    "HAS_BIAS_S": has("student_bias_ptr"),
    "HAS_BIAS_T": has("teacher_bias_ptr"),
    "DOT_PRECISION": dot_precision("student_hidden_ptr", "teacher_hidden_ptr"),
})
@triton.jit
def fused_linear_mixture_kernel(
    student_hidden_ptr, student_weight_ptr, student_bias_ptr,
    teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr, lse_s_ptr, lse_t_ptr, part_ptr,
    n_rows, n_vocab, student_hidden_size, teacher_hidden_size,
    stride_shn, stride_swv, stride_thn, stride_twv, inv_tau, cap_s, cap_t,
    log_beta, log_1m_beta, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    lse_s = tl.load(lse_s_ptr + offs_n, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + offs_n, mask=row_ok, other=0.0)
    j_p = tl.zeros((BLOCK_N,), tl.float32)
    j_q = tl.zeros((BLOCK_N,), tl.float32)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, tl.cdiv(n_vocab, BLOCK_V))
    for tile in range(tile_begin, tile_end):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = offs_v < n_vocab
        x_s = logits_tile(student_hidden_ptr, student_weight_ptr, student_bias_ptr, offs_n, offs_v,
                          n_rows, n_vocab, student_hidden_size, stride_shn, stride_swv, cap_s,
                          BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS_S, DOT_PRECISION) * inv_tau
        x_t = logits_tile(teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr, offs_n, offs_v,
                          n_rows, n_vocab, teacher_hidden_size, stride_thn, stride_twv, cap_t,
                          BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS_T, DOT_PRECISION) * inv_tau
        log_p = x_s - lse_s[:, None]
        log_q = x_t - lse_t[:, None]
        log_m = log_mixture(log_p, log_q, log_beta, log_1m_beta)
        # lanes off the vocabulary hold finite zeros: dropped here, not by an exp of -inf
        j_p += tl.sum(tl.where(col_ok[None, :], tl.exp(log_p) * (log_p - log_m), 0.0), axis=1)
        j_q += tl.sum(tl.where(col_ok[None, :], tl.exp(log_q) * (log_q - log_m), 0.0), axis=1)
    out = part_ptr + (split * 2) * n_rows + offs_n
    tl.store(out, j_p, mask=row_ok)
    tl.store(out + n_rows, j_q, mask=row_ok)


def _spec(dtype: str, label: str, has_bias=False, block_n=128, block_v=64, block_h=64, num_warps=8):
    ptr = f"*{dtype}"
    bias = ptr if has_bias else "constexpr"
    signature = {
        "student_hidden_ptr": ptr, "student_weight_ptr": ptr, "student_bias_ptr": bias,
        "teacher_hidden_ptr": ptr, "teacher_weight_ptr": ptr, "teacher_bias_ptr": bias,
        "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32", "part_ptr": "*fp32",
        **dict.fromkeys(["n_rows", "n_vocab", "student_hidden_size", "teacher_hidden_size",
                         "stride_shn", "stride_swv", "stride_thn", "stride_twv"], "i32"),
        **dict.fromkeys(["inv_tau", "cap_s", "cap_t", "log_beta", "log_1m_beta"], "fp32"),
        "tiles_per_split": "i32",
        "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr",
        "HAS_BIAS_S": "constexpr", "HAS_BIAS_T": "constexpr", "DOT_PRECISION": "constexpr",
    }
    constexprs = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h,
                  "HAS_BIAS_S": has_bias, "HAS_BIAS_T": has_bias,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    if not has_bias:
        constexprs.update(student_bias_ptr=None, teacher_bias_ptr=None)
    return AOTSpec(fused_linear_mixture_kernel.fn, signature, constexprs, num_warps=num_warps,
                   num_stages=3, label=label)


AOT_SPECS = [
    _spec("bf16", "bf16"),
    _spec("bf16", "bf16,bias", has_bias=True),
    _spec("fp16", "fp16"),
    _spec("fp32", "fp32", block_n=64, block_h=32),
]
