"""Backward passes over logits rows: read the logits once more, write dL/dz once.

Both kernels take the per-row results of the forward pass (row_stats) and the upstream
gradient already folded into one per-row coefficient, and run on a grid of
(rows, vocabulary blocks): the gradient of one element depends only on its own logits and the
row's scalars, so even one row fills the GPU. Rows with mask False are written as zeros
without reading their logits. The gradient is stored in the logits' dtype.

``softmax_grad_kernel``: with x = z / tau, p = softmax(x), lse = log sum e^x,
    d lse / dz_v = p_v / tau,   d (x_y - lse) / dz_v = (onehot(y)_v - p_v) / tau,
so every loss built from lse and one token log-prob has
    dL/dz_v = coef_p * p_v + coef_y * onehot(y)_v
with per-row coefficients: logsumexp coef_p = g / tau; token log-prob coef_p = -g / tau,
coef_y = g / tau; the sampled objective -r log p(y) is the token log-prob with g -> -r g,
i.e. dL/dz = -(r g / tau)(onehot(y) - p).

``reverse_kl_grad_kernel``: KL = sum_v p_v (log p_v - log q_v), and with
d log p_u / dz_v = (onehot(u)_v - p_v) / tau,
    dKL/dz_v = (1/tau) p_v (log p_v - log q_v - KL),
log p_v = x_v - lse_s, log q_v = xt_v - lse_t; coef = g / tau. Where p_v = 0 (student -inf)
the term is 0, whatever the teacher says (no 0 * inf).
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec


@triton.jit
def _is_counted(mask_ptr, row, HAS_MASK: tl.constexpr):
    """Uncounted rows get a zero gradient without reading their logits."""
    counted = True
    if HAS_MASK:
        counted = tl.load(mask_ptr + row) != 0
    return counted


@triton.heuristics({
    "HAS_TOKENS": lambda args: args["tokens_ptr"] is not None,
    "HAS_MASK": lambda args: args["mask_ptr"] is not None,
})
@triton.jit
def softmax_grad_kernel(
    logits_ptr, grad_ptr, max_ptr, logsum_ptr, coef_p_ptr, coef_y_ptr, tokens_ptr, mask_ptr,
    n_vocab, stride_z, stride_g, inv_tau,
    BLOCK_V: tl.constexpr, HAS_TOKENS: tl.constexpr, HAS_MASK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < n_vocab
    grad_row = grad_ptr + row.to(tl.int64) * stride_g
    if _is_counted(mask_ptr, row, HAS_MASK):
        z = tl.load(logits_ptr + row.to(tl.int64) * stride_z + offs, mask=in_vocab,
                    other=float("-inf")).to(tl.float32)
        log_p = (z * inv_tau - tl.load(max_ptr + row)) - tl.load(logsum_ptr + row)
        grad = tl.load(coef_p_ptr + row) * tl.exp(log_p)
        if HAS_TOKENS:
            grad += tl.where(offs == tl.load(tokens_ptr + row), tl.load(coef_y_ptr + row), 0.0)
        tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)
    else:
        tl.store(grad_row + offs, tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty), mask=in_vocab)


@triton.heuristics({"HAS_MASK": lambda args: args["mask_ptr"] is not None})
@triton.jit
def reverse_kl_grad_kernel(
    student_ptr, teacher_ptr, grad_ptr, max_s_ptr, logsum_s_ptr, max_t_ptr, logsum_t_ptr, kl_ptr,
    coef_ptr, mask_ptr,
    n_vocab, stride_s, stride_t, stride_g, inv_tau,
    BLOCK_V: tl.constexpr, HAS_MASK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < n_vocab
    grad_row = grad_ptr + row.to(tl.int64) * stride_g
    if _is_counted(mask_ptr, row, HAS_MASK):
        z_s = tl.load(student_ptr + row.to(tl.int64) * stride_s + offs, mask=in_vocab,
                      other=float("-inf")).to(tl.float32)
        z_t = tl.load(teacher_ptr + row.to(tl.int64) * stride_t + offs, mask=in_vocab,
                      other=0.0).to(tl.float32)
        log_p = (z_s * inv_tau - tl.load(max_s_ptr + row)) - tl.load(logsum_s_ptr + row)
        log_q = (z_t * inv_tau - tl.load(max_t_ptr + row)) - tl.load(logsum_t_ptr + row)
        p = tl.exp(log_p)
        grad = tl.where(p > 0, p * (log_p - log_q - tl.load(kl_ptr + row)), 0.0)
        grad = grad * tl.load(coef_ptr + row)
        tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)
    else:
        tl.store(grad_row + offs, tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty), mask=in_vocab)


def _softmax_spec(dtype, label, tokens=False, mask=False, block_v=4096, num_warps=8):
    signature = {"logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "max_ptr": "*fp32",
                 "logsum_ptr": "*fp32",
                 "coef_p_ptr": "*fp32", "coef_y_ptr": "*fp32" if tokens else "constexpr",
                 "tokens_ptr": "*i64" if tokens else "constexpr",
                 "mask_ptr": "*i1" if mask else "constexpr",
                 "n_vocab": "i32", "stride_z": "i32", "stride_g": "i32", "inv_tau": "fp32",
                 "BLOCK_V": "constexpr", "HAS_TOKENS": "constexpr", "HAS_MASK": "constexpr"}
    constexprs = {"BLOCK_V": block_v, "HAS_TOKENS": tokens, "HAS_MASK": mask}
    for name, present in (("coef_y_ptr", tokens), ("tokens_ptr", tokens), ("mask_ptr", mask)):
        if not present:
            constexprs[name] = None
    return AOTSpec(softmax_grad_kernel.fn, signature, constexprs, num_warps=num_warps,
                   num_stages=1, label=label)


def _reverse_kl_spec(dtype, label, mask=False, block_v=4096, num_warps=8):
    ptr = f"*{dtype}"
    signature = {"student_ptr": ptr, "teacher_ptr": ptr, "grad_ptr": ptr, "max_s_ptr": "*fp32",
                 "logsum_s_ptr": "*fp32", "max_t_ptr": "*fp32", "logsum_t_ptr": "*fp32",
                 "kl_ptr": "*fp32", "coef_ptr": "*fp32",
                 "mask_ptr": "*i1" if mask else "constexpr",
                 "n_vocab": "i32", "stride_s": "i32", "stride_t": "i32", "stride_g": "i32",
                 "inv_tau": "fp32", "BLOCK_V": "constexpr", "HAS_MASK": "constexpr"}
    constexprs = {"BLOCK_V": block_v, "HAS_MASK": mask}
    if not mask:
        constexprs["mask_ptr"] = None
    return AOTSpec(reverse_kl_grad_kernel.fn, signature, constexprs, num_warps=num_warps,
                   num_stages=1, label=label)


AOT_SPECS = [
    *(_softmax_spec(dt, f"{dt},lse") for dt in ("fp32", "bf16", "fp16")),
    _softmax_spec("bf16", "bf16,tokens", tokens=True),
    _softmax_spec("bf16", "bf16,tokens,mask", tokens=True, mask=True),
    *(_reverse_kl_spec(dt, f"{dt}") for dt in ("fp32", "bf16", "fp16")),
    _reverse_kl_spec("bf16", "bf16,mask", mask=True),
]
