"""Inputs of a case and the least work any correct implementation must do on it (the floor).

Logits form is memory-bound: the floor is bytes moved, each logits tensor read once per pass
and the gradient written once (kernel-design.md). Fused-linear form is matmul-bound: the floor
is the lm_head FLOPs that cannot be avoided, counting each product once.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from opd_kernels import reference
from opd_kernels.objectives import GradForm, Need, reads_full_teacher

from .registry import OPS, Case, ObjectiveOp


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


# The standalone ops' passes: (forward reads, backward reads) of an [N, V] logits tensor.
_STANDALONE_READS = {"logsumexp": (1, 1), "token_logprobs": (1, 1), "reverse_kl": (2, 2),
                     "topk_overlap": (2, 0)}


@functools.lru_cache(maxsize=None)
def gradient_form(objective: ObjectiveOp) -> GradForm:
    """The objective's declared gradient form (objectives.base), read off from_passes on a tiny
    input: which of p, q enter dL/dx at every id."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    tokens = torch.tensor([1, 2])
    results = reference.pass_results(s, t, objective.needs, tokens=tokens, k=2, **objective.kwargs)
    return objective.spec.from_passes(results, **objective.kwargs)[1]


def objective_reads(objective: ObjectiveOp) -> tuple[int, int]:
    """(forward, backward) reads of an [N, V] logits tensor an objective cannot avoid.

    Forward, from its needs: a dense teacher read in full (``reads_full_teacher``: its whole
    distribution, or log q at the tokens) reads both models at every id; SUPPORT alone reads the
    student only (the teacher at k ids is negligible); MIXTURE is one more read of both (the
    mixture sums need both final normalizers first). Backward, from its gradient form: a dense
    gradient reads the student again (its softmax), and the teacher too where q enters it at
    every id (the reverse, forward or mixture terms); a sparse-only gradient (k values a row)
    reads neither.
    """
    needs = objective.needs
    fwd = (2 if reads_full_teacher(needs) else 1) + (2 if Need.MIXTURE in needs else 0)
    grad = gradient_form(objective)
    bwd = 0 if not grad.dense else 1 + bool(grad.reverse or grad.forward or grad.mixture)
    return fwd, bwd


def _reads(op: str) -> tuple[int, int]:
    objective = OPS[op]
    return _STANDALONE_READS[op] if objective is None else objective_reads(objective)


def logits_floor_bytes(op: str, mode: str, n: int, vocab: int, itemsize: int) -> int:
    """Bytes of the logits each pass must read, plus the one gradient the backward writes.

    Forward: one read of every logits tensor the op depends on at every id (topk needs the
    teacher at k ids only). Backward: the dense gradient needs the student again (its softmax)
    and, where the teacher's q enters it at every id (the KLs, the JSD), the teacher too; a
    k-sparse gradient only writes the (mostly zero) gradient. See objective_reads.
    """
    reads_fwd, reads_bwd = _reads(op)
    elements = n * vocab
    passes = reads_fwd
    if mode == "fwd+bwd":
        passes += reads_bwd + 1  # + the gradient written once
    return passes * elements * itemsize


def fused_floor_flops(op: str, mode: str, n: int, vocab: int, hs: int, ht: int, k: int) -> int:
    """lm_head FLOPs no implementation can skip (each product counted once).

    One model's logits cost 2NVH. logsumexp / token log-probs use the student only; KL and the
    statistics both models' full products. An objective, from its needs: the student's product
    always; the teacher's full product where ``reads_full_teacher``, else its logits at k ids
    (2NkHt); MIXTURE recomputes both products in its second pass (the fused form keeps no logits).
    Backward: a dense gradient over the logits costs dh (2NVHs) plus dW (2NVHs); a k-sparse one
    2NkHs each.
    """
    student, teacher = 2 * n * vocab * hs, 2 * n * vocab * ht
    objective = OPS[op]
    if op in ("logsumexp", "token_logprobs"):
        fwd, bwd = student, 2 * student
    elif objective is None:
        fwd, bwd = student + teacher, 2 * student
    else:
        needs = objective.needs
        fwd = student + (teacher if reads_full_teacher(needs) else 2 * n * k * ht)
        fwd += (student + teacher) if Need.MIXTURE in needs else 0
        bwd = 2 * student if gradient_form(objective).dense else 4 * n * k * hs
    return fwd + (bwd if mode == "fwd+bwd" else 0)


def floor(case: Case, mode: str, itemsize: int, k: int) -> tuple[str, int]:
    """("bytes", B) for the logits form, ("flops", F) for the fused form."""
    m = case.model
    if case.form == "logits":
        return "bytes", logits_floor_bytes(case.op, mode, case.n, m.vocab, itemsize)
    return "flops", fused_floor_flops(case.op, mode, case.n, m.vocab, m.student_hidden,
                                      m.teacher_hidden, k)
