"""The Triton backend of the logits form: OPD losses and statistics from [N, V] logits.

Every call makes one forward pass over the logits (``row_stats``: a partial kernel over (rows,
vocabulary splits) and a small finalize kernel that merges the splits in a fixed order), plus
the mixture pass of kernels/row_mixture.py when the objective needs it (the generalized JSD);
nothing of size [N, V] is written in the forward. The backward is one more pass
(``row_grad``, then the sparse part at k ids a row). These are the three kernels of
logits_form.py, which holds everything else (the objectives' passes, the autograd Function, the
backend class) for this backend and the native CPU one alike.

Bytes per element of the logits (bf16, 2 B an element of each model):
    full, forward_kl, topk_pg  forward 4 (both read once)   backward 6 (both read, gradient written)
    jsd (0 < beta < 1)         forward 8 (two reads)        backward 6
    sampled                    forward 4                    backward 4 (student read, gradient written)
    topk                       forward 2 (student read)     backward 2 (zeros + k values a row written)
``return_stats`` rides the same forward pass (the top-k of both models and their entropies are
kept while the blocks stream by); for ``topk`` it adds the teacher's read (4 B in all).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ..kernels import row_stats
from ..kernels.row_grad import dense_grad_kernel
from ..kernels.row_mixture import mixture_kernel
from ..kernels.row_stats import row_stats_finalize_kernel, row_stats_partial_kernel
from . import _interpreter_compat  # noqa: F401  (before any launch under TRITON_INTERPRET=1)
from .base import Capabilities
from .logits_form import Kernels, LogitsFormBackend, RowPass, cap

# Vocabulary block widths, for 8 warps. Forward: every lane keeps its own running state
# (6 fp32 values for a pair, 8 with statistics), so 2048 lanes, 8 a thread, keep the KL pass
# within registers on sm_90 (see bench/results/hopper_report.md). Backward: no state, one block
# a program, 4096 elements (8 KB of bf16 a model) for enough bytes in flight.
_FORWARD_BLOCK_V = 2048
BACKWARD_BLOCK_V = 4096

# The largest k the running top-k keeps on-chip.
MAX_K = 64


def vocab_block(vocab: int, cap: int, k_pad: int = 0) -> int:
    return max(min(triton.next_power_of_2(vocab), cap), k_pad, 16)


def warps_for_block(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def vocab_splits(n_rows: int, n_blocks: int, device: torch.device) -> int:
    """Programs a row is split into: enough to give every SM a few programs when rows are few."""
    units = (torch.cuda.get_device_properties(device).multi_processor_count
             if device.type == "cuda" else 1)
    return max(1, min(n_blocks, triton.cdiv(4 * units, max(n_rows, 1))))


def _split_plan(n: int, vocab: int, block_v: int, device) -> tuple:
    n_blocks = triton.cdiv(vocab, block_v)
    blocks_per_split = triton.cdiv(n_blocks, vocab_splits(n, n_blocks, device))
    return triton.cdiv(n_blocks, blocks_per_split), blocks_per_split


@torch.no_grad()
def row_pass(student: torch.Tensor, teacher: Optional[torch.Tensor] = None,
             tokens: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
             k: int = 0, temperature: float = 1.0, student_softcap: Optional[float] = None,
             teacher_softcap: Optional[float] = None) -> RowPass:
    """One read of the logits: lse (both models), both KLs, token logits, entropies, top-k
    statistics (teacher and k > 0), student top-k ids (k > 0), as ``row_stats`` describes."""
    n, vocab = student.shape
    device = student.device
    fields = torch.empty(row_stats.NUM_FIELDS.value, n, dtype=torch.float32, device=device)
    top_ids = torch.empty(n, k, dtype=torch.int64, device=device) if k else None
    if n == 0:
        return RowPass(fields, top_ids)
    k_pad = triton.next_power_of_2(k) if k else 0
    block_v = vocab_block(vocab, _FORWARD_BLOCK_V, k_pad)
    splits, blocks_per_split = _split_plan(n, vocab, block_v, device)
    state = torch.empty(n, splits, row_stats.NUM_STATE.value, dtype=torch.float32, device=device)
    keys = torch.empty(n, splits, 2, k_pad, dtype=torch.int64, device=device) if k else None
    inv_tau, caps = 1.0 / temperature, (cap(student_softcap), cap(teacher_softcap))
    stride_t = teacher.stride(0) if teacher is not None else 0
    row_stats_partial_kernel[(n, splits)](
        student, teacher, mask, state, keys, vocab, student.stride(0), stride_t, blocks_per_split,
        inv_tau, *caps, BLOCK_V=block_v, K_PAD=max(k_pad, 1), num_warps=warps_for_block(block_v))
    row_stats_finalize_kernel[(n,)](
        state, keys, student, teacher, tokens, mask, fields, top_ids, n, splits,
        student.stride(0), stride_t, inv_tau, *caps, k, SPLITS_PAD=triton.next_power_of_2(splits),
        K_PAD=max(k_pad, 1), num_warps=4)
    return RowPass(fields, top_ids)


@torch.no_grad()
def _mixture(student, teacher, rp: RowPass, mask, temperature, caps, beta) -> tuple:
    """(KL(p || m), KL(q || m)) per row, m = beta q + (1 - beta) p (row_mixture.py)."""
    n, vocab = student.shape
    block_v = vocab_block(vocab, _FORWARD_BLOCK_V)
    splits, blocks_per_split = _split_plan(n, vocab, block_v, student.device)
    partial = torch.empty(splits, n, 2, dtype=torch.float32, device=student.device)
    if n:
        mixture_kernel[(n, splits)](
            student, teacher, mask, rp.field("max_s"), rp.field("logsum_s"), rp.field("max_t"),
            rp.field("logsum_t"), partial, n, vocab, student.stride(0), teacher.stride(0),
            blocks_per_split, 1.0 / temperature, *caps, math.log(beta), math.log1p(-beta),
            BLOCK_V=block_v, num_warps=warps_for_block(block_v))
    total = partial.sum(0)  # splits in a fixed order
    return total[:, 0], total[:, 1]


def _dense_grad(student, teacher, grad, rp: RowPass, form, shift, scale, mask, temperature, caps):
    """The dense part of ``form`` into ``grad`` (row_grad.py), one program a vocabulary block."""
    n, vocab = student.shape
    beta = form.beta if form.mixture else 0.5
    block_v = vocab_block(vocab, BACKWARD_BLOCK_V)
    dense_grad_kernel[(n, triton.cdiv(vocab, block_v))](
        student, teacher, grad, rp.field("max_s"), rp.field("logsum_s"), rp.field("max_t"),
        rp.field("logsum_t"), shift, scale, mask, vocab, student.stride(0),
        teacher.stride(0) if teacher is not None else 0, grad.stride(0), 1.0 / temperature, *caps,
        form.reverse, form.forward, form.mixture, math.log(beta), math.log1p(-beta),
        BLOCK_V=block_v, HAS_MIXTURE=bool(form.mixture), num_warps=warps_for_block(block_v))


KERNELS = Kernels(row_pass=row_pass, mixture=_mixture, dense_grad=_dense_grad)

BACKEND = LogitsFormBackend(
    "triton", Capabilities(forms=frozenset({"logits"}), devices=frozenset({"cuda"}),
                           dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
                           max_k=MAX_K, needs_interpreter_off_gpu=True, served_teacher=True),
    KERNELS)
