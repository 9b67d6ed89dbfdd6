"""Both KL directions per row from hidden states, both models' logits computed tile by tile.

With x^s = softcap_s(h_s W_s^T + b_s) / tau and x^t likewise (hidden sizes may differ), one pass
keeps per row the online softmax state of each model (online_softmax.py) and two accumulators
centered on the running maxima:
    a = sum_v e^{x^s_v - m_s} ((x^s_v - m_s) - (x^t_v - m_t))
    b = sum_v e^{x^t_v - m_t} ((x^t_v - m_t) - (x^s_v - m_s))
With log p_v = x^s_v - m_s - log s_s and log q_v = x^t_v - m_t - log s_t,
    KL(p || q) = a / s_s - log s_s + log s_t,     KL(q || p) = b / s_t - log s_t + log s_s.
Accumulating the centered differences (rather than sum p x^s and sum p x^t apart) avoids
cancellation when p ~ q or when the logits are large. When the maxima move by d_s = m_s - m_s'
and d_t = m_t - m_t', every old term of a shifts by d_s - d_t (``moved``), those of b by d_t - d_s.

``fused_linear_kl_kernel``, grid (row blocks, vocabulary splits), writes the six per split;
``fused_linear_kl_merge_kernel`` folds the splits in a fixed order (deterministic) into
lse_s, lse_t, KL(p || q) and KL(q || p). The backward lives in fused_linear_grad.py.
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec
from opd_kernels.kernels.fused_linear_tile import dot_precision, has, logits_tile
from opd_kernels.kernels.online_softmax import max_shift, merge, moved, reference_max, tile_step

PARTS = tl.constexpr(6)  # per split and row, fp32 [splits, PARTS, N]: m_s, s_s, m_t, s_t, a, b


@triton.heuristics({
    "HAS_BIAS_S": has("student_bias_ptr"),
    "HAS_BIAS_T": has("teacher_bias_ptr"),
    "DOT_PRECISION": dot_precision("student_hidden_ptr", "teacher_hidden_ptr"),
})
@triton.jit
def fused_linear_kl_kernel(
    student_hidden_ptr, student_weight_ptr, student_bias_ptr,
    teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr, part_ptr,
    n_rows, n_vocab, student_hidden_size, teacher_hidden_size,
    stride_shn, stride_swv, stride_thn, stride_twv, inv_tau, cap_s, cap_t, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_s = tl.zeros((BLOCK_N,), tl.float32)
    s_t = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    b = tl.zeros((BLOCK_N,), tl.float32)
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
        m_s_new, alpha_s, e_s = tile_step(tl.where(col_ok[None, :], x_s, float("-inf")), m_s)
        m_t_new, alpha_t, e_t = tile_step(tl.where(col_ok[None, :], x_t, float("-inf")), m_t)
        # the centered difference; lanes off the vocabulary have e = 0 and finite x (zeros)
        d = ((x_s - reference_max(m_s_new)[:, None]) - (x_t - reference_max(m_t_new)[:, None]))
        d = tl.where(col_ok[None, :], d, 0.0)
        shift = max_shift(m_s, m_s_new) - max_shift(m_t, m_t_new)
        a = moved(a, alpha_s, s_s, shift) + tl.sum(e_s * d, axis=1)
        b = moved(b, alpha_t, s_t, -shift) - tl.sum(e_t * d, axis=1)
        s_s = s_s * alpha_s + tl.sum(e_s, axis=1)
        s_t = s_t * alpha_t + tl.sum(e_t, axis=1)
        m_s = m_s_new
        m_t = m_t_new
    out = part_ptr + (split * PARTS) * n_rows + offs_n
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + n_rows, s_s, mask=row_ok)
    tl.store(out + 2 * n_rows, m_t, mask=row_ok)
    tl.store(out + 3 * n_rows, s_t, mask=row_ok)
    tl.store(out + 4 * n_rows, a, mask=row_ok)
    tl.store(out + 5 * n_rows, b, mask=row_ok)


@triton.jit
def fused_linear_kl_merge_kernel(
    part_ptr, lse_s_ptr, lse_t_ptr, reverse_kl_ptr, forward_kl_ptr, n_rows, n_splits,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_s = tl.zeros((BLOCK_N,), tl.float32)
    s_t = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    b = tl.zeros((BLOCK_N,), tl.float32)
    for split in range(0, n_splits):
        at = part_ptr + (split * PARTS) * n_rows + offs_n
        split_m_s = tl.load(at, mask=row_ok, other=0.0)
        split_s_s = tl.load(at + n_rows, mask=row_ok, other=1.0)
        split_m_t = tl.load(at + 2 * n_rows, mask=row_ok, other=0.0)
        split_s_t = tl.load(at + 3 * n_rows, mask=row_ok, other=1.0)
        new_m_s, new_s_s, old_alpha_s, split_alpha_s = merge(m_s, s_s, split_m_s, split_s_s)
        new_m_t, new_s_t, old_alpha_t, split_alpha_t = merge(m_t, s_t, split_m_t, split_s_t)
        old_shift = max_shift(m_s, new_m_s) - max_shift(m_t, new_m_t)
        split_shift = max_shift(split_m_s, new_m_s) - max_shift(split_m_t, new_m_t)
        a = (moved(a, old_alpha_s, s_s, old_shift)
             + moved(tl.load(at + 4 * n_rows, mask=row_ok, other=0.0), split_alpha_s, split_s_s,
                     split_shift))
        b = (moved(b, old_alpha_t, s_t, -old_shift)
             + moved(tl.load(at + 5 * n_rows, mask=row_ok, other=0.0), split_alpha_t, split_s_t,
                     -split_shift))
        m_s, s_s, m_t, s_t = new_m_s, new_s_s, new_m_t, new_s_t
    log_s_s = tl.log(s_s)
    log_s_t = tl.log(s_t)
    tl.store(lse_s_ptr + offs_n, m_s + log_s_s, mask=row_ok)
    tl.store(lse_t_ptr + offs_n, m_t + log_s_t, mask=row_ok)
    tl.store(reverse_kl_ptr + offs_n, a / s_s - log_s_s + log_s_t, mask=row_ok)
    tl.store(forward_kl_ptr + offs_n, b / s_t - log_s_t + log_s_s, mask=row_ok)


def _forward_spec(dtype: str, label: str, has_bias=False, block_n=128, block_v=64, block_h=64,
                  num_warps=8):
    ptr = f"*{dtype}"
    bias = ptr if has_bias else "constexpr"
    signature = {
        "student_hidden_ptr": ptr, "student_weight_ptr": ptr, "student_bias_ptr": bias,
        "teacher_hidden_ptr": ptr, "teacher_weight_ptr": ptr, "teacher_bias_ptr": bias,
        "part_ptr": "*fp32",
        **dict.fromkeys(["n_rows", "n_vocab", "student_hidden_size", "teacher_hidden_size",
                         "stride_shn", "stride_swv", "stride_thn", "stride_twv"], "i32"),
        "inv_tau": "fp32", "cap_s": "fp32", "cap_t": "fp32", "tiles_per_split": "i32",
        "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr",
        "HAS_BIAS_S": "constexpr", "HAS_BIAS_T": "constexpr", "DOT_PRECISION": "constexpr",
    }
    constexprs = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h,
                  "HAS_BIAS_S": has_bias, "HAS_BIAS_T": has_bias,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    if not has_bias:
        constexprs.update(student_bias_ptr=None, teacher_bias_ptr=None)
    return AOTSpec(fused_linear_kl_kernel.fn, signature, constexprs, num_warps=num_warps, num_stages=3,
                   label=label)


_MERGE_SIGNATURE = {
    **dict.fromkeys(["part_ptr", "lse_s_ptr", "lse_t_ptr", "reverse_kl_ptr", "forward_kl_ptr"],
                    "*fp32"),
    "n_rows": "i32", "n_splits": "i32", "BLOCK_N": "constexpr",
}

AOT_SPECS = [
    _forward_spec("bf16", "bf16"),
    _forward_spec("bf16", "bf16,bias", has_bias=True),
    _forward_spec("fp16", "fp16"),
    _forward_spec("fp32", "fp32", block_n=64, block_h=32),
    AOTSpec(fused_linear_kl_merge_kernel, _MERGE_SIGNATURE, {"BLOCK_N": 128}, num_warps=4,
            num_stages=1),
]
