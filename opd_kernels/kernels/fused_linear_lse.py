"""Per-row statistics of one model's logits x = softcap(h W^T + b) / tau, logits never in memory.

Forward (``fused_linear_lse_kernel``), grid (row blocks, vocabulary splits): each program owns
BLOCK_N rows and a contiguous run of vocabulary tiles. For every tile (``logits_tile``) it merges
the tile online into the state of online_softmax.py,
    m = max_v x_v,   s = sum_v e^{x_v - m}                     (lse = m + log s)
    c = sum_v e^{x_v - m} (x_v - m)     (WITH_ENTROPY: H(p) = log s - c / s)
    the running top-K_PAD packed keys of x  (WITH_TOPK: exact fp32 value + id, see topk_select)
The entropy's terms are centered on the running max, so logits near +-1e4 lose nothing to
cancellation. Each program writes its partials (fp32 [splits, N], keys int64 [splits, N, K_PAD]);
nothing of size [N, V] is written.

Merge (``fused_linear_lse_merge_kernel``), grid (row blocks,): folds the splits in a fixed order
(deterministic, no locks) with ``merge``/``moved``; the sorted key lists are merged pairwise with
a bitonic merge. Writes lse, H(p), and the top-k ids and values.
"""
import triton
import triton.language as tl

from opd_kernels.aot import AOTSpec
from opd_kernels.kernels.fused_linear_tile import dot_precision, has, logits_tile
from opd_kernels.kernels.online_softmax import max_shift, merge, moved, reference_max, tile_step
from opd_kernels.kernels.topk_select import (MIN_KEY, block_can_enter, merge_sorted, merge_topk,
                                             pack_keys, unpack_ids, unpack_values)


@triton.heuristics({
    "HAS_BIAS": has("bias_ptr"),
    "WITH_ENTROPY": has("part_c_ptr"),
    "WITH_TOPK": has("part_keys_ptr"),
    "DOT_PRECISION": dot_precision("hidden_ptr"),
})
@triton.jit
def fused_linear_lse_kernel(
    hidden_ptr, weight_ptr, bias_ptr, part_max_ptr, part_sum_ptr, part_c_ptr, part_keys_ptr,
    n_rows, n_vocab, hidden_size, stride_hn, stride_wv, inv_tau, cap, tiles_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, K_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_TOPK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    c = tl.zeros((BLOCK_N,), tl.float32)
    keys = tl.full((BLOCK_N, K_PAD), MIN_KEY, tl.int64)

    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, tl.cdiv(n_vocab, BLOCK_V))
    for tile in range(tile_begin, tile_end):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = offs_v < n_vocab
        x = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, n_rows, n_vocab,
                        hidden_size, stride_hn, stride_wv, cap, BLOCK_N, BLOCK_V, BLOCK_H,
                        HAS_BIAS, DOT_PRECISION) * inv_tau
        m_new, alpha, e = tile_step(tl.where(col_ok[None, :], x, float("-inf")), m)
        if WITH_ENTROPY:
            # centered on the new max; lanes off the vocabulary have e = 0 and a finite x
            centered = tl.where(col_ok[None, :], x - reference_max(m_new)[:, None], 0.0)
            c = moved(c, alpha, s, max_shift(m, m_new)) + tl.sum(e * centered, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        if WITH_TOPK:
            ids = tl.broadcast_to(offs_v[None, :], (BLOCK_N, BLOCK_V))
            block_keys = tl.where(col_ok[None, :], pack_keys(x, ids), MIN_KEY)
            # Most tiles of a peaked distribution cannot enter the running top-k: skip the sort.
            if tl.max(block_can_enter(keys, block_keys).to(tl.int32)) > 0:
                keys = merge_topk(keys, block_keys, K_PAD)

    out = split * n_rows + offs_n
    tl.store(part_max_ptr + out, m, mask=row_ok)
    tl.store(part_sum_ptr + out, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(part_c_ptr + out, c, mask=row_ok)
    if WITH_TOPK:
        offs_k = tl.arange(0, K_PAD)
        tl.store(part_keys_ptr + out[:, None].to(tl.int64) * K_PAD + offs_k[None, :], keys,
                 mask=row_ok[:, None])


@triton.heuristics({"WITH_ENTROPY": has("part_c_ptr"), "WITH_TOPK": has("part_keys_ptr")})
@triton.jit
def fused_linear_lse_merge_kernel(
    part_max_ptr, part_sum_ptr, part_c_ptr, part_keys_ptr,
    lse_ptr, entropy_ptr, topk_ids_ptr, topk_values_ptr,
    n_rows, n_splits, k,
    BLOCK_N: tl.constexpr, K_PAD: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_TOPK: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    offs_k = tl.arange(0, K_PAD)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    c = tl.zeros((BLOCK_N,), tl.float32)
    keys = tl.full((BLOCK_N, K_PAD), MIN_KEY, tl.int64)
    for split in range(0, n_splits):
        at = split * n_rows + offs_n
        m_split = tl.load(part_max_ptr + at, mask=row_ok, other=0.0)
        s_split = tl.load(part_sum_ptr + at, mask=row_ok, other=1.0)
        m_new, s_new, alpha, alpha_split = merge(m, s, m_split, s_split)
        if WITH_ENTROPY:
            c_split = tl.load(part_c_ptr + at, mask=row_ok, other=0.0)
            c = (moved(c, alpha, s, max_shift(m, m_new))
                 + moved(c_split, alpha_split, s_split, max_shift(m_split, m_new)))
        m, s = m_new, s_new
        if WITH_TOPK:
            split_keys = tl.load(part_keys_ptr + at[:, None].to(tl.int64) * K_PAD + offs_k[None, :],
                                 mask=row_ok[:, None], other=MIN_KEY)
            keys = merge_sorted(keys, split_keys)
    tl.store(lse_ptr + offs_n, m + tl.log(s), mask=row_ok)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + offs_n, tl.log(s) - c / s, mask=row_ok)
    if WITH_TOPK:
        out = offs_n[:, None].to(tl.int64) * k + offs_k[None, :]
        ok = row_ok[:, None] & (offs_k[None, :] < k)
        tl.store(topk_ids_ptr + out, unpack_ids(keys).to(tl.int64), mask=ok)
        tl.store(topk_values_ptr + out, unpack_values(keys), mask=ok)


def _forward_spec(dtype: str, label: str, has_bias=False, with_entropy=False, k_pad=1,
                  block_n=128, block_v=128, block_h=64, num_warps=8):
    ptr = f"*{dtype}"
    opt = lambda flag, ty: ty if flag else "constexpr"
    signature = {
        "hidden_ptr": ptr, "weight_ptr": ptr, "bias_ptr": opt(has_bias, ptr),
        "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
        "part_c_ptr": opt(with_entropy, "*fp32"), "part_keys_ptr": opt(k_pad > 1, "*i64"),
        "n_rows": "i32", "n_vocab": "i32", "hidden_size": "i32", "stride_hn": "i32",
        "stride_wv": "i32", "inv_tau": "fp32", "cap": "fp32", "tiles_per_split": "i32",
        "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr", "K_PAD": "constexpr",
        "HAS_BIAS": "constexpr", "WITH_ENTROPY": "constexpr", "WITH_TOPK": "constexpr",
        "DOT_PRECISION": "constexpr",
    }
    constexprs = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h, "K_PAD": k_pad,
                  "HAS_BIAS": has_bias, "WITH_ENTROPY": with_entropy, "WITH_TOPK": k_pad > 1,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    for name, flag in (("bias_ptr", has_bias), ("part_c_ptr", with_entropy),
                       ("part_keys_ptr", k_pad > 1)):
        if not flag:
            constexprs[name] = None
    return AOTSpec(fused_linear_lse_kernel.fn, signature, constexprs, num_warps=num_warps,
                   num_stages=3, label=label)


def _merge_spec(label: str, with_entropy=False, k_pad=1):
    opt = lambda flag, ty: ty if flag else "constexpr"
    signature = {
        "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_c_ptr": opt(with_entropy, "*fp32"),
        "part_keys_ptr": opt(k_pad > 1, "*i64"),
        "lse_ptr": "*fp32", "entropy_ptr": opt(with_entropy, "*fp32"),
        "topk_ids_ptr": opt(k_pad > 1, "*i64"), "topk_values_ptr": opt(k_pad > 1, "*fp32"),
        "n_rows": "i32", "n_splits": "i32", "k": "i32",
        "BLOCK_N": "constexpr", "K_PAD": "constexpr", "WITH_ENTROPY": "constexpr",
        "WITH_TOPK": "constexpr",
    }
    constexprs = {"BLOCK_N": 64, "K_PAD": k_pad, "WITH_ENTROPY": with_entropy, "WITH_TOPK": k_pad > 1}
    for names, flag in ((("part_c_ptr", "entropy_ptr"), with_entropy),
                        (("part_keys_ptr", "topk_ids_ptr", "topk_values_ptr"), k_pad > 1)):
        if not flag:
            constexprs.update(dict.fromkeys(names))
    return AOTSpec(fused_linear_lse_merge_kernel.fn, signature, constexprs, num_warps=4,
                   num_stages=1, label=label)


AOT_SPECS = [
    *(_forward_spec(dt, f"{dt}") for dt in ("bf16", "fp16")),
    _forward_spec("fp32", "fp32", block_n=64, block_h=32),
    _forward_spec("bf16", "bf16,bias", has_bias=True),
    # a running top-k takes 64-wide vocabulary tiles (registers), as the launcher picks
    _forward_spec("bf16", "bf16,top16", k_pad=16, block_v=64),
    _forward_spec("bf16", "bf16,bias,entropy,top16", has_bias=True, with_entropy=True, k_pad=16,
                  block_v=64),
    _forward_spec("bf16", "bf16,entropy,top64", with_entropy=True, k_pad=64, block_v=64),
    _forward_spec("fp32", "fp32,entropy,top16", with_entropy=True, k_pad=16, block_n=64,
                  block_v=64, block_h=32),
    _merge_spec("plain"),
    _merge_spec("top16", k_pad=16),
    _merge_spec("entropy,top16", with_entropy=True, k_pad=16),
]
