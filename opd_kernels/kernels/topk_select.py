"""Exact top-k selection inside Triton kernels, with ties going to the lower token id.

A (value, id) pair is packed into one int64 key so that a single signed comparison orders
the pairs the way top-k needs: by value first, and for equal values the lower id first.

    high 32 bits: the fp32 value's bits, mapped so that signed int32 order = float order.
                  Non-negative floats already compare correctly as signed ints; negative
                  floats compare in reverse, so their 31 non-sign bits are flipped
                  (bits ^ 0x7FFFFFFF). -inf maps to 0x807FFFFF; -0.0 is
                  packed as +0.0 (they are the same logit).
    low 32 bits:  0x7FFFFFFF - id (ids are < 2**31), so that a lower id gives a larger key.

The smallest int64 (``MIN_KEY``) unpacks to a NaN with id 0x7FFFFFFF; lanes outside the
vocabulary carry it, so they lose against every real entry, -inf logits included.

All helpers work on the last axis, for 1D [BLOCK] and 2D [ROWS, BLOCK] tiles alike.
``merge_topk`` keeps a running top-K_PAD list sorted in descending key order: the block's
own top K_PAD (``tl.topk``, a bitonic top-k) is reversed and combined element-wise with the
running list by ``max``: for two sorted lists a (descending) and b (ascending), max(a_i, b_i)
holds exactly the K_PAD largest keys of the union and is a bitonic sequence, which one
bitonic merge sorts. ``block_can_enter`` is the cheap test (one max reduction) that lets a
kernel skip the merge when no key of the block beats the running k-th key; in 1D it is a
scalar, so the merge sits behind a real branch.

``insert_topk`` is the selection-by-insertion alternative for an UNSORTED running list: while
the block's largest key beats the list's smallest, it replaces that smallest key and leaves
the block. Each step is one max and one min reduction, and only keys that enter the top-k
cost a step (for a peaked row, a handful in the first blocks, then none), so it needs no
sort of the block at all; sort the list once at the end (``tl.sort``, K_PAD elements). Its
running list must hold distinct keys: start from ``no_keys`` (MIN_KEY + lane), never from
copies of MIN_KEY, and give ignored block lanes MIN_KEY itself (it never enters).
"""
import triton
import triton.language as tl

MIN_KEY = tl.constexpr(-(2**63))

AOT_SPECS = []  # helpers only: they are compiled as part of the kernels that use them


@triton.jit
def pack_keys(values, ids):
    """values: fp32, ids: int32 (>= 0), same shape -> int64 keys (signed order = top-k order)."""
    # -0.0 and +0.0 are the same logit: give both the bits of +0.0 so they tie on the id
    bits = tl.where(values == 0.0, 0, values.to(tl.int32, bitcast=True))
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    low = (0x7FFFFFFF - ids).to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low


@triton.jit
def unpack_values(keys):
    """int64 keys -> the fp32 values packed into them (NaN for MIN_KEY)."""
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def unpack_ids(keys):
    """int64 keys -> the int32 ids packed into them (0x7FFFFFFF for MIN_KEY)."""
    return 0x7FFFFFFF - (keys & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def block_can_enter(running_keys, block_keys):
    """True (per row) where the block's largest key beats the running list's smallest one."""
    return tl.max(block_keys, axis=-1) > tl.min(running_keys, axis=-1)


@triton.jit
def merge_sorted(running_keys, other_keys):
    """Top K of two descending-sorted [.., K] key lists, sorted descending."""
    if running_keys.shape[-1] == 1:
        merged = tl.maximum(running_keys, other_keys)
    else:
        bitonic = tl.maximum(running_keys, tl.flip(other_keys, dim=len(other_keys.shape) - 1))
        merged = tl.bitonic_merge(bitonic, descending=True)
    return merged


@triton.jit
def merge_topk(running_keys, block_keys, K_PAD: tl.constexpr):
    """Top K_PAD of running_keys [.., K_PAD] (sorted descending) and block_keys [.., BLOCK]."""
    # BLOCK >= K_PAD, both powers of two (the launchers guarantee it)
    if K_PAD == 1:
        block_top = tl.max(block_keys, axis=-1, keep_dims=True)
    else:
        block_top = tl.topk(block_keys, K_PAD)
    return merge_sorted(running_keys, block_top)


@triton.jit
def no_keys(K_PAD: tl.constexpr):
    """An empty running list for insert_topk: K_PAD distinct keys below every real key."""
    return MIN_KEY + tl.arange(0, K_PAD).to(tl.int64)


@triton.jit
def insert_topk(running_keys, block_keys):
    """Top K of an unsorted running list [K] (distinct keys) and block_keys [BLOCK] (1D),
    unsorted; block lanes holding MIN_KEY are ignored."""
    kth = tl.min(running_keys)
    best = tl.max(block_keys)
    while best > kth:
        running_keys = tl.where(running_keys == kth, best, running_keys)
        block_keys = tl.where(block_keys == best, MIN_KEY, block_keys)
        kth = tl.min(running_keys)
        best = tl.max(block_keys)
    return running_keys
