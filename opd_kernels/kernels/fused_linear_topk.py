"""The k-sparse kernels: both models' logits at given ids (the student's top-k S, or the tokens),
and the backward of a gradient that is non-zero at those ids only (the sparse part of a GradForm:
all of "topk" eq. 5's gradient, the one-hot part of "sampled" and "topk_pg").

``fused_linear_gather_logits_kernel``, grid (rows,): out[n, j] = softcap(h[n] . W[ids[n, j]]
+ b[ids[n, j]]) / tau, a loop over BLOCK_H chunks of the hidden dimension with the k gathered
rows as a [K_PAD, BLOCK_H] tile: 2 N k H FLOPs in place of the 2 N V H of an lm_head product,
and no [N, k, H] gather in memory.

The backward, with g[n, j] = dL/du at u = h W^T + b and id S[n, j] (1/tau, the soft-cap's
derivative and the upstream gradient already folded in), ADDS to its outputs (zeroed by the
launcher when no dense part wrote them first), so a dense and a sparse part sum into one dh, dW:
``fused_linear_sparse_grad_kernel``, grid (rows, hidden blocks):
    dh[n] += sum_j g[n, j] W[S[n, j]]
``fused_linear_sparse_weight_grad_kernel``, grid (entries, hidden blocks), over the N k entries
(id, row, g) sorted by id (stable, so rows ascend within an id):
    dW[v] += sum_{entries with id v, in sorted order} g h[row]     db[v] += the sum of those g
The program at the first entry of an id's run sums the run BLOCK_E entries at a time; the
others return at once. Every element is written by one program (no atomics) and the order of
the sum is fixed, so dW and db are the same run to run (fp32 atomics would add in arrival order).
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec
from opd_kernels.kernels.fused_linear_tile import has
from opd_kernels.kernels.online_softmax import softcapped


@triton.heuristics({"HAS_BIAS": has("bias_ptr")})
@triton.jit
def fused_linear_gather_logits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, ids_ptr, out_ptr, k, hidden_size, stride_hn, stride_wv,
    inv_tau, cap, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
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
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ids, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * k + offs_k, softcapped(acc, cap) * inv_tau, mask=k_ok)


@triton.jit
def fused_linear_sparse_grad_kernel(
    weight_ptr, ids_ptr, grad_logits_ptr, grad_hidden_ptr, k, hidden_size, stride_wv, stride_ghn,
    K_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < hidden_size
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < k
    ids = tl.load(ids_ptr + row * k + offs_k, mask=k_ok, other=0)
    g = tl.load(grad_logits_ptr + row * k + offs_k, mask=k_ok, other=0.0)
    w = tl.load(weight_ptr + ids[:, None] * stride_wv + offs_h[None, :],
                mask=k_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
    out = grad_hidden_ptr + row * stride_ghn + offs_h
    grad_h = tl.sum(g[:, None] * w, axis=0) + tl.load(out, mask=h_ok, other=0.0).to(tl.float32)
    tl.store(out, grad_h.to(grad_hidden_ptr.dtype.element_ty), mask=h_ok)


@triton.heuristics({"HAS_BIAS": has("grad_bias_ptr")})
@triton.jit
def fused_linear_sparse_weight_grad_kernel(
    hidden_ptr, sorted_ids_ptr, sorted_rows_ptr, sorted_grad_ptr, grad_weight_ptr, grad_bias_ptr,
    n_entries, hidden_size, stride_hn, stride_gwv,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    entry = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < hidden_size
    vocab_id = tl.load(sorted_ids_ptr + entry)
    previous = tl.load(sorted_ids_ptr + entry - 1, mask=entry > 0, other=-1)
    if vocab_id != previous:  # the first entry of its id's run sums the run
        acc = tl.zeros((BLOCK_H,), tl.float32)
        g_sum = tl.zeros((BLOCK_E,), tl.float32)
        start = entry
        run_goes_on = True
        while run_goes_on:
            offs_e = start + tl.arange(0, BLOCK_E)
            same = tl.load(sorted_ids_ptr + offs_e, mask=offs_e < n_entries, other=-1) == vocab_id
            rows = tl.load(sorted_rows_ptr + offs_e, mask=same, other=0)
            g = tl.load(sorted_grad_ptr + offs_e, mask=same, other=0.0)
            h = tl.load(hidden_ptr + rows[:, None] * stride_hn + offs_h[None, :],
                        mask=same[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(g[:, None] * h, axis=0)
            g_sum += g
            # the run is a prefix of the block (ids sorted): it goes on only if it filled it
            run_goes_on = tl.sum(same.to(tl.int32), axis=0) == BLOCK_E
            start += BLOCK_E
        out = grad_weight_ptr + vocab_id * stride_gwv + offs_h
        acc += tl.load(out, mask=h_ok, other=0.0).to(tl.float32)
        tl.store(out, acc.to(grad_weight_ptr.dtype.element_ty), mask=h_ok)
        if HAS_BIAS:
            if tl.program_id(1) == 0:  # one hidden block adds the run's sum to db
                db = grad_bias_ptr + vocab_id
                tl.store(db, tl.load(db) + tl.sum(g_sum, axis=0))


def _gather_spec(dtype: str, k_pad: int, bias=False):
    signature = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}",
                 "bias_ptr": f"*{dtype}" if bias else "constexpr", "ids_ptr": "*i64",
                 "out_ptr": "*fp32", "k": "i32", "hidden_size": "i32", "stride_hn": "i32",
                 "stride_wv": "i32", "inv_tau": "fp32", "cap": "fp32", "K_PAD": "constexpr",
                 "BLOCK_H": "constexpr", "HAS_BIAS": "constexpr"}
    constexprs = {"K_PAD": k_pad, "BLOCK_H": 128, "HAS_BIAS": bias, **({} if bias else {"bias_ptr": None})}
    return AOTSpec(fused_linear_gather_logits_kernel.fn, signature, constexprs, num_warps=4,
                   num_stages=2, label=f"{dtype},k{k_pad}" + (",bias" if bias else ""))


def _sparse_grad_spec(dtype: str, k_pad: int):
    signature = {"weight_ptr": f"*{dtype}", "ids_ptr": "*i64", "grad_logits_ptr": "*fp32",
                 "grad_hidden_ptr": f"*{dtype}",
                 **dict.fromkeys(["k", "hidden_size", "stride_wv", "stride_ghn"], "i32"),
                 "K_PAD": "constexpr", "BLOCK_H": "constexpr"}
    return AOTSpec(fused_linear_sparse_grad_kernel, signature, {"K_PAD": k_pad, "BLOCK_H": 128},
                   num_warps=4, num_stages=2, label=f"{dtype},k{k_pad}")


def _sparse_weight_grad_spec(dtype: str, bias=False):
    signature = {"hidden_ptr": f"*{dtype}", "sorted_ids_ptr": "*i64", "sorted_rows_ptr": "*i64",
                 "sorted_grad_ptr": "*fp32", "grad_weight_ptr": "*fp32",
                 "grad_bias_ptr": "*fp32" if bias else "constexpr",
                 **dict.fromkeys(["n_entries", "hidden_size", "stride_hn", "stride_gwv"], "i32"),
                 "BLOCK_E": "constexpr", "BLOCK_H": "constexpr", "HAS_BIAS": "constexpr"}
    constexprs = {"BLOCK_E": 32, "BLOCK_H": 128, "HAS_BIAS": bias,
                  **({} if bias else {"grad_bias_ptr": None})}
    return AOTSpec(fused_linear_sparse_weight_grad_kernel.fn, signature, constexprs, num_warps=4,
                   num_stages=2, label=dtype + (",bias" if bias else ""))


AOT_SPECS = [
    *(_gather_spec(dt, 16) for dt in ("bf16", "fp16", "fp32")),
    _gather_spec("bf16", 64),
    _gather_spec("bf16", 16, bias=True),
    _gather_spec("bf16", 2),  # the tokens' logits (k = 1)
    *(_sparse_grad_spec(dt, 16) for dt in ("bf16", "fp16", "fp32")),
    _sparse_grad_spec("bf16", 64),
    _sparse_grad_spec("bf16", 2),
    *(_sparse_weight_grad_spec(dt) for dt in ("bf16", "fp16", "fp32")),
    _sparse_weight_grad_spec("bf16", bias=True),
]
