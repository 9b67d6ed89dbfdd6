"""Inputs of a case and the least work any correct implementation must do on it (the floor).

Logits form is memory-bound: the floor is bytes moved, each logits tensor read once per pass
and the gradient written once (kernel-design.md). Fused-linear form is matmul-bound: the floor
is the lm_head FLOPs that cannot be avoided, counting each product once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .registry import Case


@dataclass
class Inputs:
    """Logits form: ``student``/``teacher`` are [N, V] logits and the weights are None.
    Fused form: they are hidden states [N, H] and the weights [V, H] lm_heads."""

    student: torch.Tensor
    teacher: torch.Tensor
    tokens: torch.Tensor
    student_weight: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None

    def grad_leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.student, self.student_weight) if t is not None and t.requires_grad]

    def nbytes(self) -> int:
        tensors = (self.student, self.teacher, self.tokens, self.student_weight, self.teacher_weight)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# Logits with a standard deviation of 3 give a spread-out but peaked softmax (entropy of a few
# nats at V=150K); the teacher is the student plus noise so that their top-k sets overlap.
LOGIT_SCALE = 3.0


def make_inputs(case: Case, dtype: torch.dtype, device, requires_grad: bool, seed: int = 0) -> Inputs:
    """Random inputs of the case's shape, created directly in ``dtype`` (no fp32 temporaries)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, m = case.n, case.model

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).mul_(scale)

    tokens = torch.randint(0, m.vocab, (n,), generator=gen, device=device)
    if case.form == "logits":
        student = randn(n, m.vocab, scale=LOGIT_SCALE)
        teacher = randn(n, m.vocab).add_(student)
        return Inputs(student.requires_grad_(requires_grad), teacher, tokens)
    student = randn(n, m.student_hidden)
    student_weight = randn(m.vocab, m.student_hidden, scale=LOGIT_SCALE / math.sqrt(m.student_hidden))
    teacher, teacher_weight = correlated_teacher(student, student_weight, m.teacher_hidden, randn)
    return Inputs(student.requires_grad_(requires_grad), teacher, tokens,
                  student_weight.requires_grad_(requires_grad), teacher_weight)


def correlated_teacher(hidden, weight, teacher_hidden_size: int, randn):
    """A teacher (hidden [N, Ht], weight [V, Ht]) whose logits are the student's plus noise of
    standard deviation about 1, so that the two top-k sets overlap as real pairs do.

    h ~ N(0, 1) and W ~ N(0, s^2 / H) give logits of standard deviation s. The teacher's hidden
    state starts with the student's; its weight starts with the student's plus noise and ends
    with independent columns (Ht >= Hs, as in every pair of the registry).
    """
    n, hs = hidden.shape
    vocab, extra = weight.shape[0], teacher_hidden_size - hs
    if extra < 0:
        raise ValueError("the teacher's hidden size must be at least the student's")
    teacher = torch.cat([hidden.detach(), randn(n, extra)], dim=1)
    shared_columns = randn(vocab, hs, scale=1.0 / math.sqrt(hs)).add_(weight.detach())
    teacher_weight = torch.cat([shared_columns, randn(vocab, extra, scale=1.0 / math.sqrt(max(extra, 1)))], dim=1)
    return teacher, teacher_weight


def logits_floor_bytes(op: str, mode: str, n: int, vocab: int, itemsize: int) -> int:
    """Bytes of the logits each pass must read, plus the one gradient the backward writes.

    Forward: one read of every logits tensor the op depends on at every id (topk needs the
    teacher at k ids only). Backward: the dense gradient needs the student again (its softmax)
    and, for full/reverse KL, the teacher too; topk's gradient is k values a row, so its
    backward only writes the (mostly zero) gradient.
    """
    reads_fwd = {"logsumexp": 1, "token_logprobs": 1, "reverse_kl": 2, "topk_overlap": 2,
                 "opd_full": 2, "opd_sampled": 2, "opd_topk": 1}[op]
    reads_bwd = {"logsumexp": 1, "token_logprobs": 1, "reverse_kl": 2, "opd_full": 2,
                 "opd_sampled": 1, "opd_topk": 0}
    elements = n * vocab
    passes = reads_fwd
    if mode == "fwd+bwd":
        passes += reads_bwd[op] + 1  # + the gradient written once
    return passes * elements * itemsize


def fused_floor_flops(op: str, mode: str, n: int, vocab: int, hs: int, ht: int, k: int) -> int:
    """lm_head FLOPs no implementation can skip (each product counted once).

    One model's logits cost 2NVH. logsumexp / token log-probs use the student only; KL, the
    statistics, full and sampled need both models' full products; topk needs the student's
    product (to find S) and the teacher's logits at k ids (2NkHt). Backward: a dense gradient
    over the logits costs dh (2NVHs) plus dW (2NVHs); topk's k-sparse one costs 2NkHs each.
    """
    student, teacher = 2 * n * vocab * hs, 2 * n * vocab * ht
    if op in ("logsumexp", "token_logprobs"):
        fwd, bwd = student, 2 * student
    elif op == "opd_topk":
        fwd, bwd = student + 2 * n * k * ht, 4 * n * k * hs
    else:
        fwd, bwd = student + teacher, 2 * student
    return fwd + (bwd if mode == "fwd+bwd" else 0)


def floor(case: Case, mode: str, itemsize: int, k: int) -> tuple[str, int]:
    """("bytes", B) for the logits form, ("flops", F) for the fused form."""
    m = case.model
    if case.form == "logits":
        return "bytes", logits_floor_bytes(case.op, mode, case.n, m.vocab, itemsize)
    return "flops", fused_floor_flops(case.op, mode, case.n, m.vocab, m.student_hidden,
                                      m.teacher_hidden, k)
