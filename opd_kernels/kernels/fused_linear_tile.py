"""The logits tile every fused-linear kernel is built on: z = softcap(h W^T + b) for a block of
rows and a block of vocabulary ids, accumulated in fp32 over the hidden dimension with ``tl.dot``.

Operands stay in their storage dtype so that bf16/fp16 reach the tensor cores (HGMMA on sm_90);
fp32 inputs use ``ieee`` precision (tf32 would cost ~1e-3 relative error). The bias (HAS_BIAS)
is added in fp32 to the accumulator, then the soft-cap c tanh(u / c) (``cap`` a runtime float,
0 = none). The temperature is left to the caller, which also needs z itself for dz/du.
Rows past ``n_rows`` and ids past ``n_vocab`` load zeros: callers mask them out of their sums.
"""
import triton
import triton.language as tl

from opd_kernels.kernels.online_softmax import softcapped

AOT_SPECS = []  # helpers only: compiled as part of the kernels that use them


def dot_precision(*hidden_names):
    """A triton.heuristics rule: "ieee" when any of the named hidden-state arguments is fp32 (a
    bf16 student beside an fp32 teacher must not put the teacher's products through tf32)."""
    def rule(args):
        tensors = [args[name] for name in hidden_names if args[name] is not None]
        return "ieee" if any(t.dtype.itemsize == 4 for t in tensors) else "tf32"
    return rule


def has(name):
    """A triton.heuristics rule: True when the optional pointer argument ``name`` is given."""
    return lambda args: args[name] is not None


@triton.jit
def logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, n_rows, n_vocab, hidden_size,
                stride_hn, stride_wv, cap,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of softcap(hidden[offs_n] @ weight[offs_v]^T + bias[offs_v])."""
    offs_h = tl.arange(0, BLOCK_H)
    row_ok = offs_n < n_rows
    col_ok = offs_v < n_vocab
    h_ptrs = hidden_ptr + offs_n[:, None].to(tl.int64) * stride_hn + offs_h[None, :]
    # W is read as its transpose [BLOCK_H, BLOCK_V] directly, so tl.dot needs no permute.
    w_ptrs = weight_ptr + offs_v[None, :].to(tl.int64) * stride_wv + offs_h[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, hidden_size, BLOCK_H):
        h_ok = (offs_h + h0) < hidden_size
        a = tl.load(h_ptrs, mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return softcapped(acc, cap)

