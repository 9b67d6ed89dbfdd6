"""The backward pass over logits rows: read the logits once more, write dL/dz once.

Every objective hands its gradient w.r.t. x = z_c / tau (z_c the soft-capped logits) in one
form (objectives/base.py, GradForm), with p = softmax(x_s), q = softmax(x_t),
m = beta q + (1 - beta) p:

    dL/dx_v = p_v (shift + w_r (log p_v - log q_v) + w_m (log p_v - log m_v)) + w_q q_v
              + (a sparse part at k ids a row, added by the launcher)

``shift`` is per row, the weights w_r, w_q, w_m and beta are numbers of the call (runtime
scalars: a weight of 0 skips its term, so the reverse KL pays no exp for q, the lse gradient
none for the teacher). With the row's upstream gradient g and dz_c/dz = 1 - (z_c / c)^2:

    dL/dz_v = (g / tau) (1 - (z_c / c)^2) dL/dx_v                      (``scale`` = g / tau)

log p_v = (x_v - max_s) - logsum_s from the forward's split lse (see row_stats.py), likewise
log q. Where p_v = 0 the p-terms are 0 whatever log q or log m say (no 0 * inf). The grid is
(rows, vocabulary blocks): one element's gradient depends on its own logits and the row's
scalars only, so even one row fills the GPU. Rows with mask False are written as zeros
without reading their logits. The gradient is stored in the gradient buffer's dtype.

``HAS_MIXTURE`` (the generalized JSD strictly inside (0, 1)) is the one term that needs a
log a element beyond the others, so it is a compile-time choice; so is ``SOFTCAP`` (derived
from the caps): the capping's code costs this kernel ~25 registers on sm_90, one resident
block an SM fewer, where the forward's partial kernel keeps its occupancy with it at run time.
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec
from opd_kernels.kernels.online_softmax import log_mixture, softcap_grad, softcapped


@triton.heuristics({
    "HAS_TEACHER": lambda args: args["teacher_ptr"] is not None,
    "HAS_MASK": lambda args: args["mask_ptr"] is not None,
    "SOFTCAP": lambda args: args["cap_s"] > 0 or args["cap_t"] > 0,
})
@triton.jit
def dense_grad_kernel(
    student_ptr, teacher_ptr, grad_ptr, max_s_ptr, logsum_s_ptr, max_t_ptr, logsum_t_ptr,
    shift_ptr, scale_ptr, mask_ptr,
    n_vocab, stride_s, stride_t, stride_g, inv_tau, cap_s, cap_t,
    w_reverse, w_forward, w_mixture, log_beta, log_1m_beta,
    BLOCK_V: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_MIXTURE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < n_vocab
    grad_row = grad_ptr + row.to(tl.int64) * stride_g
    counted = True
    if HAS_MASK:
        counted = tl.load(mask_ptr + row) != 0
    if counted:
        z_s = tl.load(student_ptr + row.to(tl.int64) * stride_s + offs, mask=in_vocab,
                      other=0.0).to(tl.float32)
        if SOFTCAP:
            z_s = softcapped(z_s, cap_s)
        log_p = (z_s * inv_tau - tl.load(max_s_ptr + row)) - tl.load(logsum_s_ptr + row)
        p = tl.exp(log_p)
        coef = tl.zeros([BLOCK_V], tl.float32) + tl.load(shift_ptr + row)
        extra = tl.zeros([BLOCK_V], tl.float32)
        if HAS_TEACHER:
            z_t = tl.load(teacher_ptr + row.to(tl.int64) * stride_t + offs, mask=in_vocab,
                          other=0.0).to(tl.float32)
            if SOFTCAP:
                z_t = softcapped(z_t, cap_t)
            log_q = (z_t * inv_tau - tl.load(max_t_ptr + row)) - tl.load(logsum_t_ptr + row)
            if w_reverse != 0:
                coef += w_reverse * (log_p - log_q)
            if HAS_MIXTURE:
                coef += w_mixture * (log_p - log_mixture(log_p, log_q, log_beta, log_1m_beta))
            if w_forward != 0:
                extra = w_forward * tl.exp(log_q)
        grad = tl.where(p > 0, p * coef, 0.0) + extra
        grad = grad * tl.load(scale_ptr + row)
        if SOFTCAP:
            grad = grad * softcap_grad(z_s, cap_s)
        tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)
    else:
        tl.store(grad_row + offs, tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty), mask=in_vocab)


def dense_grad_spec(dtype, label, teacher=True, mask=False, mixture=False, grad_dtype=None,
                    softcap=False, block_v=4096, num_warps=8):
    ptr = f"*{dtype}"
    signature = {"student_ptr": ptr, "teacher_ptr": ptr if teacher else "constexpr",
                 "grad_ptr": f"*{grad_dtype or dtype}",
                 **dict.fromkeys(["max_s_ptr", "logsum_s_ptr"], "*fp32"),
                 **dict.fromkeys(["max_t_ptr", "logsum_t_ptr"], "*fp32" if teacher else "constexpr"),
                 "shift_ptr": "*fp32", "scale_ptr": "*fp32",
                 "mask_ptr": "*i1" if mask else "constexpr",
                 **dict.fromkeys(["n_vocab", "stride_s", "stride_t", "stride_g"], "i32"),
                 **dict.fromkeys(["inv_tau", "cap_s", "cap_t", "w_reverse", "w_forward",
                                  "w_mixture", "log_beta", "log_1m_beta"], "fp32"),
                 "BLOCK_V": "constexpr", "HAS_TEACHER": "constexpr", "HAS_MASK": "constexpr",
                 "HAS_MIXTURE": "constexpr", "SOFTCAP": "constexpr"}
    constexprs = {"BLOCK_V": block_v, "HAS_TEACHER": teacher, "HAS_MASK": mask,
                  "HAS_MIXTURE": mixture, "SOFTCAP": softcap}
    constexprs.update({name: None for name, ty in signature.items()
                       if ty == "constexpr" and name not in constexprs})
    return AOTSpec(dense_grad_kernel.fn, signature, constexprs, num_warps=num_warps, num_stages=1,
                   label=label)


AOT_SPECS = [
    # logsumexp / token log-probs / sampled: the student alone
    *(dense_grad_spec(dt, f"{dt},student", teacher=False) for dt in ("fp32", "bf16", "fp16")),
    dense_grad_spec("bf16", "bf16,student,mask", teacher=False, mask=True),
    # reverse / forward KL, topk_pg, JSD at its ends
    *(dense_grad_spec(dt, f"{dt},pair") for dt in ("fp32", "bf16", "fp16")),
    dense_grad_spec("bf16", "bf16,pair,mask", mask=True),
    # the generalized JSD inside (0, 1)
    dense_grad_spec("bf16", "bf16,pair,mixture,mask", mask=True, mixture=True),
    dense_grad_spec("fp32", "fp32,pair,mixture", mixture=True),
    dense_grad_spec("bf16", "bf16,pair,softcap,mask", mask=True, softcap=True),
]
