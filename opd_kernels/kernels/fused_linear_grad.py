"""Gradient of a per-row loss w.r.t. the raw student logits u = h W_s^T + b_s, one tile at a time.

Every objective's dense gradient comes as a GradForm (objectives/base.py): with x = z / tau,
z = softcap(u), p = softmax(x^s), q = softmax(x^t), m = beta q + (1 - beta) p,
    dL/dx_v = p_v (shift + reverse (log p_v - log q_v) + mixture (log p_v - log m_v)) + forward q_v
(the sparse part of a GradForm goes through fused_linear_topk.py's kernels). Then
    dL/du_v = scale * dL/dx_v * (1 / tau) * (1 - (z^s_v / c_s)^2)
with ``scale`` the per-row upstream gradient (0 on uncounted rows) and the last factor the
soft-cap's derivative (1 without a cap). log p_v = x^s_v - lse_s and log q_v = x^t_v - lse_t come
from the forward's final normalizers. ``shift`` and ``scale`` are per-row vectors, ``reverse``,
``forward``, ``mixture`` and log beta, log(1 - beta) runtime scalars of the call; the teacher's
tile is recomputed only when one of the three needs it (HAS_TEACHER: the launcher passes no
teacher otherwise), q's exp only when ``forward`` is not 0, and log m only for MIXTURE (the one
flag of the form: its logaddexp costs two transcendentals an element).
    logsumexp        shift = 1;            token log-prob  shift = -1 (+1 at y, sparse)
    reverse KL       shift = -KL, reverse = 1;   forward KL  shift = 1, forward = -1
    JSD, 0<beta<1    shift = -(1 - beta) KL(p || m), mixture = 1 - beta

``fused_linear_grad_logits_kernel``, grid (row blocks, vocabulary tiles) over a chunk of rows,
writes that chunk's dL/du in the activations' dtype; the launcher turns it into dh = dU W and
dW += dU^T h with two GEMMs, so the scratch is one token chunk of logits, never [N, V].
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec
from opd_kernels.kernels.fused_linear_tile import dot_precision, has, logits_tile
from opd_kernels.kernels.online_softmax import log_mixture, softcap_grad


@triton.heuristics({
    "HAS_BIAS_S": has("bias_ptr"),
    "HAS_BIAS_T": has("teacher_bias_ptr"),
    "HAS_TEACHER": has("teacher_hidden_ptr"),
    "MIXTURE": lambda args: args["mixture"] != 0,
    "DOT_PRECISION": dot_precision("hidden_ptr", "teacher_hidden_ptr"),
})
@triton.jit
def fused_linear_grad_logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr,
    lse_ptr, teacher_lse_ptr, shift_ptr, scale_ptr, grad_ptr,
    n_rows, n_vocab, hidden_size, teacher_hidden_size,
    stride_hn, stride_wv, stride_thn, stride_twv, stride_gn,
    inv_tau, cap_s, cap_t, reverse, forward, mixture, log_beta, log_1m_beta,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_TEACHER: tl.constexpr,
    MIXTURE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < n_rows
    col_ok = offs_v < n_vocab
    z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, n_rows, n_vocab, hidden_size,
                    stride_hn, stride_wv, cap_s, BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS_S,
                    DOT_PRECISION)
    log_p = z * inv_tau - tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)[:, None]
    p = tl.exp(log_p)
    coef = tl.load(shift_ptr + offs_n, mask=row_ok, other=0.0)[:, None]
    if HAS_TEACHER:
        z_t = logits_tile(teacher_hidden_ptr, teacher_weight_ptr, teacher_bias_ptr, offs_n, offs_v,
                          n_rows, n_vocab, teacher_hidden_size, stride_thn, stride_twv, cap_t,
                          BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS_T, DOT_PRECISION)
        log_q = z_t * inv_tau - tl.load(teacher_lse_ptr + offs_n, mask=row_ok, other=0.0)[:, None]
        coef = coef + reverse * (log_p - log_q)
        if MIXTURE:
            coef += mixture * (log_p - log_mixture(log_p, log_q, log_beta, log_1m_beta))
        grad = p * coef
        if forward != 0.0:
            grad += forward * tl.exp(log_q)
    else:
        grad = p * coef
    row_scale = tl.load(scale_ptr + offs_n, mask=row_ok, other=0.0) * inv_tau
    grad = grad * row_scale[:, None] * softcap_grad(z, cap_s)
    out = grad_ptr + offs_n[:, None].to(tl.int64) * stride_gn + offs_v[None, :]
    tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _spec(dtype: str, label: str, teacher=False, bias=False, mixture=False, block_n=128,
          block_v=128, block_h=64, num_warps=8):
    ptr = f"*{dtype}"
    opt = lambda flag: ptr if flag else "constexpr"
    signature = {
        "hidden_ptr": ptr, "weight_ptr": ptr, "bias_ptr": opt(bias),
        "teacher_hidden_ptr": opt(teacher), "teacher_weight_ptr": opt(teacher),
        "teacher_bias_ptr": opt(teacher and bias),
        "lse_ptr": "*fp32", "teacher_lse_ptr": "*fp32" if teacher else "constexpr",
        "shift_ptr": "*fp32", "scale_ptr": "*fp32", "grad_ptr": ptr,
        **dict.fromkeys(["n_rows", "n_vocab", "hidden_size", "teacher_hidden_size", "stride_hn",
                         "stride_wv", "stride_thn", "stride_twv", "stride_gn"], "i32"),
        **dict.fromkeys(["inv_tau", "cap_s", "cap_t", "reverse", "forward", "mixture", "log_beta",
                         "log_1m_beta"], "fp32"),
        **dict.fromkeys(["BLOCK_N", "BLOCK_V", "BLOCK_H", "HAS_BIAS_S", "HAS_BIAS_T", "HAS_TEACHER",
                         "MIXTURE", "DOT_PRECISION"], "constexpr"),
    }
    constexprs = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h, "HAS_BIAS_S": bias,
                  "HAS_BIAS_T": teacher and bias, "HAS_TEACHER": teacher, "MIXTURE": mixture,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    for name, ty in signature.items():
        if ty == "constexpr" and name not in constexprs:
            constexprs[name] = None
    return AOTSpec(fused_linear_grad_logits_kernel.fn, signature, constexprs, num_warps=num_warps,
                   num_stages=3, label=label)


AOT_SPECS = [
    _spec("bf16", "bf16,student"),
    _spec("bf16", "bf16,student,bias", bias=True),
    _spec("fp32", "fp32,student", block_n=64, block_h=32),
    # two live logits tiles take 64-wide vocabulary tiles (registers), as the launcher picks
    _spec("bf16", "bf16,teacher", teacher=True, block_v=64),
    _spec("bf16", "bf16,teacher,bias", teacher=True, bias=True, block_v=64),
    _spec("bf16", "bf16,teacher,mixture", teacher=True, mixture=True, block_v=64),
    _spec("fp16", "fp16,teacher", teacher=True, block_v=64),
    _spec("fp32", "fp32,teacher", teacher=True, block_n=64, block_v=64, block_h=32),
    _spec("fp32", "fp32,teacher,mixture", teacher=True, mixture=True, block_n=64, block_v=64,
          block_h=32),
]
