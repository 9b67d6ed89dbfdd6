"""Reverse KL(p || q) per row from hidden states, both models' logits computed tile by tile.

With z^s = h_s W_s^T / tau and z^t = h_t W_t^T / tau (hidden sizes may differ), one pass keeps
per row, rescaled whenever a running max moves,
    m_s, s_s = sum_v e^{z^s_v - m_s},   m_t, s_t = sum_v e^{z^t_v - m_t},
    a = sum_v e^{z^s_v - m_s} (z^s_v - z^t_v)
so that KL = sum_v p_v (log p_v - log q_v) = a / s_s - lse_s + lse_t. Accumulating the
difference (rather than sum p z^s and sum p z^t apart) avoids cancellation when p ~ q.

``fused_linear_kl_kernel``, grid (row blocks, vocabulary splits), writes these five per split;
``fused_linear_kl_merge_kernel`` folds the splits in a fixed order (deterministic) into
lse_s, lse_t and KL. The backward lives in fused_linear_grad.py.
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec
from opd_kernels.kernels.fused_linear_tile import dot_precision, logits_tile


@triton.heuristics({"DOT_PRECISION": dot_precision("student_hidden_ptr", "teacher_hidden_ptr")})
@triton.jit
def fused_linear_kl_kernel(
    student_hidden_ptr, student_weight_ptr, teacher_hidden_ptr, teacher_weight_ptr,
    part_max_s_ptr, part_sum_s_ptr, part_max_t_ptr, part_sum_t_ptr, part_diff_ptr,
    n_rows, n_vocab, student_hidden_size, teacher_hidden_size,
    stride_shn, stride_swv, stride_thn, stride_twv, inv_tau, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_s = tl.zeros((BLOCK_N,), tl.float32)
    s_t = tl.zeros((BLOCK_N,), tl.float32)
    diff = tl.zeros((BLOCK_N,), tl.float32)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, tl.cdiv(n_vocab, BLOCK_V))
    for tile in range(tile_begin, tile_end):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = offs_v < n_vocab
        z_s = logits_tile(student_hidden_ptr, student_weight_ptr, offs_n, offs_v, n_rows, n_vocab,
                          student_hidden_size, stride_shn, stride_swv, inv_tau,
                          BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        z_t = logits_tile(teacher_hidden_ptr, teacher_weight_ptr, offs_n, offs_v, n_rows, n_vocab,
                          teacher_hidden_size, stride_thn, stride_twv, inv_tau,
                          BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        z_s_live = tl.where(col_ok[None, :], z_s, float("-inf"))
        z_t_live = tl.where(col_ok[None, :], z_t, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(z_s_live, axis=1))
        m_t_new = tl.maximum(m_t, tl.max(z_t_live, axis=1))
        rescale_s = tl.exp(m_s - m_s_new)
        e_s = tl.exp(z_s_live - m_s_new[:, None])
        s_s = s_s * rescale_s + tl.sum(e_s, axis=1)
        # off-vocabulary lanes have e_s = 0 and z_s - z_t = 0 (both tiles load zeros there)
        diff = diff * rescale_s + tl.sum(e_s * (z_s - z_t), axis=1)
        s_t = s_t * tl.exp(m_t - m_t_new) + tl.sum(tl.exp(z_t_live - m_t_new[:, None]), axis=1)
        m_s = m_s_new
        m_t = m_t_new
    out = split * n_rows + offs_n
    tl.store(part_max_s_ptr + out, m_s, mask=row_ok)
    tl.store(part_sum_s_ptr + out, s_s, mask=row_ok)
    tl.store(part_max_t_ptr + out, m_t, mask=row_ok)
    tl.store(part_sum_t_ptr + out, s_t, mask=row_ok)
    tl.store(part_diff_ptr + out, diff, mask=row_ok)


@triton.jit
def fused_linear_kl_merge_kernel(
    part_max_s_ptr, part_sum_s_ptr, part_max_t_ptr, part_sum_t_ptr, part_diff_ptr,
    lse_s_ptr, lse_t_ptr, kl_ptr, n_rows, n_splits, BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_s = tl.zeros((BLOCK_N,), tl.float32)
    s_t = tl.zeros((BLOCK_N,), tl.float32)
    diff = tl.zeros((BLOCK_N,), tl.float32)
    for split in range(0, n_splits):
        at = split * n_rows + offs_n
        split_m_s = tl.load(part_max_s_ptr + at, mask=row_ok, other=0.0)
        split_m_t = tl.load(part_max_t_ptr + at, mask=row_ok, other=0.0)
        m_s_new = tl.maximum(m_s, split_m_s)
        m_t_new = tl.maximum(m_t, split_m_t)
        old_s, new_s = tl.exp(m_s - m_s_new), tl.exp(split_m_s - m_s_new)
        s_s = s_s * old_s + tl.load(part_sum_s_ptr + at, mask=row_ok, other=1.0) * new_s
        diff = diff * old_s + tl.load(part_diff_ptr + at, mask=row_ok, other=0.0) * new_s
        s_t = (s_t * tl.exp(m_t - m_t_new)
               + tl.load(part_sum_t_ptr + at, mask=row_ok, other=1.0) * tl.exp(split_m_t - m_t_new))
        m_s = m_s_new
        m_t = m_t_new
    lse_s = m_s + tl.log(s_s)
    lse_t = m_t + tl.log(s_t)
    tl.store(lse_s_ptr + offs_n, lse_s, mask=row_ok)
    tl.store(lse_t_ptr + offs_n, lse_t, mask=row_ok)
    tl.store(kl_ptr + offs_n, diff / s_s - lse_s + lse_t, mask=row_ok)


def _forward_spec(dtype: str, block_n=128, block_v=64, block_h=64, num_warps=8):
    ptr = f"*{dtype}"
    signature = {
        "student_hidden_ptr": ptr, "student_weight_ptr": ptr, "teacher_hidden_ptr": ptr,
        "teacher_weight_ptr": ptr, **dict.fromkeys(
            ["part_max_s_ptr", "part_sum_s_ptr", "part_max_t_ptr", "part_sum_t_ptr", "part_diff_ptr"],
            "*fp32"),
        **dict.fromkeys(["n_rows", "n_vocab", "student_hidden_size", "teacher_hidden_size",
                         "stride_shn", "stride_swv", "stride_thn", "stride_twv"], "i32"),
        "inv_tau": "fp32", "tiles_per_split": "i32",
        "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr",
        "DOT_PRECISION": "constexpr",
    }
    constexprs = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    return AOTSpec(fused_linear_kl_kernel.fn, signature, constexprs, num_warps=num_warps, num_stages=3,
                   label=dtype)


_MERGE_SIGNATURE = {
    **dict.fromkeys(["part_max_s_ptr", "part_sum_s_ptr", "part_max_t_ptr", "part_sum_t_ptr",
                     "part_diff_ptr", "lse_s_ptr", "lse_t_ptr", "kl_ptr"], "*fp32"),
    "n_rows": "i32", "n_splits": "i32", "BLOCK_N": "constexpr",
}

AOT_SPECS = [
    _forward_spec("bf16"),
    _forward_spec("fp16"),
    _forward_spec("fp32", block_n=64, block_h=32),
    AOTSpec(fused_linear_kl_merge_kernel, _MERGE_SIGNATURE, {"BLOCK_N": 128}, num_warps=4,
            num_stages=1),
]
