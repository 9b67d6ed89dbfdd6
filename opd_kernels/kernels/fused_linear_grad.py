"""Gradient of a per-row loss w.r.t. the raw student logits u = h W_s^T, one tile at a time.

Every dense objective's gradient has the form (z = u / tau, p = softmax(z), y the target id)
    dL/du_v = p_v * (alpha + gamma * (z^s_v - z^t_v)) + beta * [v == y]
with per-row coefficients that already hold the upstream gradient g and the 1/tau:
    logsumexp           alpha = g/tau
    token log-prob      alpha = -g/tau,                      beta = g/tau
    sampled (eq. 3)     alpha = g r/tau,                     beta = -g r/tau   (r detached)
    reverse KL (eq. 4)  alpha = g (lse_t - lse_s - KL)/tau,  gamma = g/tau
since dKL/du_v = (1/tau) p_v (log p_v - log q_v - KL) and log p_v - log q_v
= z^s_v - z^t_v - lse_s + lse_t. The teacher tile (HAS_TEACHER) is recomputed only for KL.

``fused_linear_grad_logits_kernel``, grid (row blocks, vocabulary tiles) over a chunk of rows,
writes that chunk's dL/du in the input dtype; the launcher turns it into dh = dU W and
dW += dU^T h with two GEMMs, so the scratch is one token chunk of logits, never [N, V].
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec
from opd_kernels.kernels.fused_linear_tile import dot_precision, logits_tile



@triton.heuristics({
    "HAS_TEACHER": lambda args: args["teacher_hidden_ptr"] is not None,
    "HAS_TARGET": lambda args: args["target_ptr"] is not None,
    "DOT_PRECISION": dot_precision("hidden_ptr", "teacher_hidden_ptr"),
})
@triton.jit
def fused_linear_grad_logits_kernel(
    hidden_ptr, weight_ptr, teacher_hidden_ptr, teacher_weight_ptr, target_ptr,
    lse_ptr, alpha_ptr, beta_ptr, gamma_ptr, grad_ptr,
    n_rows, n_vocab, hidden_size, teacher_hidden_size,
    stride_hn, stride_wv, stride_thn, stride_twv, stride_gn, inv_tau,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_TEACHER: tl.constexpr, HAS_TARGET: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < n_rows
    col_ok = offs_v < n_vocab
    z = logits_tile(hidden_ptr, weight_ptr, offs_n, offs_v, n_rows, n_vocab, hidden_size,
                    stride_hn, stride_wv, inv_tau, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    coef = tl.load(alpha_ptr + offs_n, mask=row_ok, other=0.0)[:, None]
    if HAS_TEACHER:
        z_t = logits_tile(teacher_hidden_ptr, teacher_weight_ptr, offs_n, offs_v, n_rows, n_vocab,
                          teacher_hidden_size, stride_thn, stride_twv, inv_tau,
                          BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        gamma = tl.load(gamma_ptr + offs_n, mask=row_ok, other=0.0)
        coef = coef + gamma[:, None] * (z - z_t)
    grad = tl.exp(z - lse[:, None]) * coef
    if HAS_TARGET:
        target = tl.load(target_ptr + offs_n, mask=row_ok, other=-1)
        beta = tl.load(beta_ptr + offs_n, mask=row_ok, other=0.0)
        grad += tl.where(offs_v[None, :] == target[:, None], beta[:, None], 0.0)
    out = grad_ptr + offs_n[:, None].to(tl.int64) * stride_gn + offs_v[None, :]
    tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _spec(dtype: str, label: str, has_teacher=False, has_target=False, block_n=128, block_v=128,
          block_h=64, num_warps=8):
    ptr = f"*{dtype}"
    signature = {
        "hidden_ptr": ptr, "weight_ptr": ptr,
        "teacher_hidden_ptr": ptr if has_teacher else "constexpr",
        "teacher_weight_ptr": ptr if has_teacher else "constexpr",
        "target_ptr": "*i64" if has_target else "constexpr",
        "lse_ptr": "*fp32", "alpha_ptr": "*fp32",
        "beta_ptr": "*fp32" if has_target else "constexpr",
        "gamma_ptr": "*fp32" if has_teacher else "constexpr",
        "grad_ptr": ptr,
        **dict.fromkeys(["n_rows", "n_vocab", "hidden_size", "teacher_hidden_size", "stride_hn",
                         "stride_wv", "stride_thn", "stride_twv", "stride_gn"], "i32"),
        "inv_tau": "fp32",
        "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr",
        "HAS_TEACHER": "constexpr", "HAS_TARGET": "constexpr", "DOT_PRECISION": "constexpr",
    }
    constexprs = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h,
                  "HAS_TEACHER": has_teacher, "HAS_TARGET": has_target,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    for name, ty in signature.items():
        if ty == "constexpr" and name not in constexprs:
            constexprs[name] = None
    return AOTSpec(fused_linear_grad_logits_kernel.fn, signature, constexprs, num_warps=num_warps,
                   num_stages=3, label=label)


AOT_SPECS = [
    _spec("bf16", "bf16,lse"),
    _spec("bf16", "bf16,target", has_target=True),
    _spec("bf16", "bf16,teacher", has_teacher=True),
    _spec("fp16", "fp16,teacher", has_teacher=True),
    _spec("fp32", "fp32,target", has_target=True, block_n=64, block_h=32),
    _spec("fp32", "fp32,teacher", has_teacher=True, block_n=64, block_h=32),
]
