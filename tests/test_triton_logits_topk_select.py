"""The packed-key top-k helpers (opd_kernels/kernels/topk_select.py) under the interpreter."""
import pytest
import torch
import triton
import triton.language as tl

import opd_kernels.backends._interpreter_compat  # noqa: F401  (the interpreter fix, before any launch)
from opd_kernels.kernels.topk_select import (MIN_KEY, block_can_enter, insert_topk, merge_sorted,
                                             merge_topk, no_keys, pack_keys, unpack_ids,
                                             unpack_values)


@triton.jit
def _row_topk_kernel(x_ptr, vals_ptr, ids_ptr, V, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
                     INSERT: tl.constexpr):
    """One row a program: blocks merged behind the scalar skip branch, or inserted key by key
    into an unsorted list that is sorted at the end."""
    row = tl.program_id(0)
    if INSERT:
        running = no_keys(K_PAD)
    else:
        running = tl.full([K_PAD], MIN_KEY, tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * V + offs, mask=offs < V, other=0.0).to(tl.float32)
        keys = tl.where(offs < V, pack_keys(x, offs), MIN_KEY)
        if INSERT:
            running = insert_topk(running, keys)
        elif block_can_enter(running, keys):
            running = merge_topk(running, keys, K_PAD)
    if INSERT and K_PAD > 1:
        running = tl.sort(running, descending=True)
    out = row * K_PAD + tl.arange(0, K_PAD)
    tl.store(vals_ptr + out, unpack_values(running))
    tl.store(ids_ptr + out, unpack_ids(running))


@triton.jit
def _range_topk(x_ptr, rows, V, lo, hi, ROWS: tl.constexpr, K_PAD: tl.constexpr,
                BLOCK: tl.constexpr):
    running = tl.full([ROWS, K_PAD], MIN_KEY, tl.int64)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)[None, :]
        x = tl.load(x_ptr + rows * V + offs, mask=offs < hi, other=0.0).to(tl.float32)
        keys = tl.where(offs < hi, pack_keys(x, offs + rows * 0), MIN_KEY)
        running = merge_topk(running, keys, K_PAD)
    return running


@triton.jit
def _tile_topk_kernel(x_ptr, vals_ptr, ids_ptr, V, ROWS: tl.constexpr, K_PAD: tl.constexpr,
                      BLOCK: tl.constexpr):
    """All rows in one [ROWS, BLOCK] tile; the two halves of the vocabulary are selected apart
    and joined with merge_sorted, as a split-row merge does."""
    rows = tl.arange(0, ROWS)[:, None]
    half = tl.cdiv(tl.cdiv(V, 2), BLOCK) * BLOCK
    merged = merge_sorted(_range_topk(x_ptr, rows, V, 0, half, ROWS, K_PAD, BLOCK),
                          _range_topk(x_ptr, rows, V, half, V, ROWS, K_PAD, BLOCK))
    out = rows * K_PAD + tl.arange(0, K_PAD)[None, :]
    tl.store(vals_ptr + out, unpack_values(merged))
    tl.store(ids_ptr + out, unpack_ids(merged))


def _expected(x, k):
    """Top-k ids by value, ties to the lower id (a stable descending sort)."""
    ids = torch.sort(x.double(), dim=-1, descending=True, stable=True).indices[:, :k]
    return x.gather(1, ids), ids


def _rows(V, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, V, generator=g)
    x[0, ::3] = 0.5                      # many ties
    x[1, 2:] = float("-inf")             # fewer finite entries than k
    x[2] = 1.0                           # all tied: ids 0..k-1
    x[3, : V // 2] = -0.0                # signed zeros tie with +0.0 below
    x[3, V // 2:] = 0.0
    x[4] = torch.arange(V) * -1e4        # large magnitudes, strictly decreasing
    return x


@pytest.mark.parametrize("insert", [False, True])
@pytest.mark.parametrize("V,K_PAD,BLOCK", [(7, 8, 8), (300, 1, 128), (1000, 16, 128),
                                           (1000, 64, 256)])
def test_row_topk_matches_stable_sort(V, K_PAD, BLOCK, insert):
    x = _rows(V)
    vals = torch.empty(5, K_PAD)
    ids = torch.empty(5, K_PAD, dtype=torch.int32)
    _row_topk_kernel[(5,)](x, vals, ids, V, K_PAD=K_PAD, BLOCK=BLOCK, INSERT=insert)
    k = min(K_PAD, V)
    want_vals, want_ids = _expected(x, k)
    assert torch.equal(ids[:, :k].long(), want_ids)
    assert torch.equal(vals[:, :k], want_vals)
    if K_PAD > V:  # lanes past the vocabulary hold keys below every real one (NaN values)
        assert torch.isnan(vals[:, V:]).all() and (ids[:, V:] >= 0x7FFFFFFF - K_PAD).all()


@pytest.mark.parametrize("K_PAD", [1, 4, 16])
def test_tile_topk_and_merge_sorted(K_PAD):
    V = 200
    x = _rows(V, seed=1).half()          # fp16 loads, fp32 keys
    vals = torch.empty(8, K_PAD)
    ids = torch.empty(8, K_PAD, dtype=torch.int32)
    x8 = torch.cat([x, x[:3].flip(-1)])  # 8 rows: a power of two for the tile
    _tile_topk_kernel[(1,)](x8, vals, ids, V, ROWS=8, K_PAD=K_PAD, BLOCK=32)
    want_vals, want_ids = _expected(x8.float(), K_PAD)
    assert torch.equal(ids.long(), want_ids)
    assert torch.equal(vals, want_vals)
