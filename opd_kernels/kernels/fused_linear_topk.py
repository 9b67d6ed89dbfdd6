"""The k-sparse half of the topk objective (eq. 5): teacher logits at the student's top-k ids,
and the backward that touches only those k rows of W_s per position.

``fused_linear_gather_logits_kernel``, grid (rows,): out[n, j] = h[n] . W[ids[n, j]] / tau, a loop
over BLOCK_H chunks of the hidden dimension with the k gathered rows as a [K_PAD, BLOCK_H] tile:
2 N k H FLOPs in place of the 2 N V H of an lm_head product, and no [N, k, H] gather in memory.

``fused_linear_sparse_grad_kernel``, grid (rows, hidden blocks): with g[n, j] = dL/du at
u = h W^T and id S[n, j] (the 1/tau already folded into g),
    dh[n]       = sum_j g[n, j] W[S[n, j]]        (written once, no atomics)
    dW[S[n, j]] += g[n, j] h[n]                   (fp32 atomic scatter-add; many rows share ids)
Zero entries of g (masked rows) skip their atomics.
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec


@triton.jit
def fused_linear_gather_logits_kernel(
    hidden_ptr, weight_ptr, ids_ptr, out_ptr, k, hidden_size, stride_hn, stride_wv, inv_tau,
    K_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < k
    ids = tl.load(ids_ptr + row * k + offs_k, mask=k_ok, other=0)
    acc = tl.zeros((K_PAD,), tl.float32)
    for h0 in range(0, hidden_size, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < hidden_size
        h = tl.load(hidden_ptr + row * stride_hn + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + ids[:, None] * stride_wv + offs_h[None, :],
                    mask=k_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * h[None, :], axis=1)
    tl.store(out_ptr + row * k + offs_k, acc * inv_tau, mask=k_ok)


@triton.heuristics({
    "HAS_GRAD_HIDDEN": lambda args: args["grad_hidden_ptr"] is not None,
    "HAS_GRAD_WEIGHT": lambda args: args["grad_weight_ptr"] is not None,
})
@triton.jit
def fused_linear_sparse_grad_kernel(
    hidden_ptr, weight_ptr, ids_ptr, grad_logits_ptr, grad_hidden_ptr, grad_weight_ptr,
    k, hidden_size, stride_hn, stride_wv, stride_ghn, stride_gwv,
    K_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_GRAD_HIDDEN: tl.constexpr, HAS_GRAD_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < hidden_size
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < k
    ids = tl.load(ids_ptr + row * k + offs_k, mask=k_ok, other=0)
    g = tl.load(grad_logits_ptr + row * k + offs_k, mask=k_ok, other=0.0)
    if HAS_GRAD_HIDDEN:
        w = tl.load(weight_ptr + ids[:, None] * stride_wv + offs_h[None, :],
                    mask=k_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        grad_h = tl.sum(g[:, None] * w, axis=0)
        tl.store(grad_hidden_ptr + row * stride_ghn + offs_h,
                 grad_h.to(grad_hidden_ptr.dtype.element_ty), mask=h_ok)
    if HAS_GRAD_WEIGHT:
        h = tl.load(hidden_ptr + row * stride_hn + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        live = k_ok & (g != 0.0)
        tl.atomic_add(grad_weight_ptr + ids[:, None] * stride_gwv + offs_h[None, :],
                      g[:, None] * h[None, :], mask=live[:, None] & h_ok[None, :], sem="relaxed")


def _gather_spec(dtype: str, k_pad: int):
    signature = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "ids_ptr": "*i64",
                 "out_ptr": "*fp32", "k": "i32", "hidden_size": "i32", "stride_hn": "i32",
                 "stride_wv": "i32", "inv_tau": "fp32", "K_PAD": "constexpr", "BLOCK_H": "constexpr"}
    return AOTSpec(fused_linear_gather_logits_kernel, signature, {"K_PAD": k_pad, "BLOCK_H": 128},
                   num_warps=4, num_stages=2, label=f"{dtype},k{k_pad}")


def _sparse_grad_spec(dtype: str, k_pad: int, grad_hidden=True, grad_weight=True):
    signature = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "ids_ptr": "*i64",
                 "grad_logits_ptr": "*fp32",
                 "grad_hidden_ptr": f"*{dtype}" if grad_hidden else "constexpr",
                 "grad_weight_ptr": "*fp32" if grad_weight else "constexpr",
                 **dict.fromkeys(["k", "hidden_size", "stride_hn", "stride_wv", "stride_ghn",
                                  "stride_gwv"], "i32"),
                 "K_PAD": "constexpr", "BLOCK_H": "constexpr",
                 "HAS_GRAD_HIDDEN": "constexpr", "HAS_GRAD_WEIGHT": "constexpr"}
    constexprs = {"K_PAD": k_pad, "BLOCK_H": 128, "HAS_GRAD_HIDDEN": grad_hidden,
                  "HAS_GRAD_WEIGHT": grad_weight}
    if not grad_hidden:
        constexprs["grad_hidden_ptr"] = None
    if not grad_weight:
        constexprs["grad_weight_ptr"] = None
    return AOTSpec(fused_linear_sparse_grad_kernel.fn, signature, constexprs, num_warps=4,
                   num_stages=2, label=f"{dtype},k{k_pad},dh={grad_hidden},dw={grad_weight}")


AOT_SPECS = [
    *(_gather_spec(dt, 16) for dt in ("bf16", "fp16", "fp32")),
    _gather_spec("bf16", 64),
    *(_sparse_grad_spec(dt, 16) for dt in ("bf16", "fp16", "fp32")),
    _sparse_grad_spec("bf16", 64),
    _sparse_grad_spec("bf16", 16, grad_hidden=False),
    _sparse_grad_spec("bf16", 16, grad_weight=False),
]
