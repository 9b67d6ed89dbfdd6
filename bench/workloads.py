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

import opd_kernels
from opd_kernels import reference
from opd_kernels.objectives import GradForm, Need, reads_full_teacher, topk_ids

from . import baselines
from .registry import OPS, Case, ObjectiveOp


@dataclass
class Inputs:
    """Logits form: ``student``/``teacher`` are [N, V] logits and the weights are None.
    Fused form: they are hidden states [N, H] and the weights [V, H] lm_heads. A served case
    has no teacher tensors: ``served`` is the server's answer, as the keyword arguments of
    sparse_teacher_opd_loss (see served_answer)."""

    student: torch.Tensor
    teacher: Optional[torch.Tensor]
    tokens: torch.Tensor
    student_weight: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    served: Optional[dict] = None

    def grad_leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.student, self.student_weight) if t is not None and t.requires_grad]

    def nbytes(self) -> int:
        tensors = (self.student, self.teacher, self.tokens, self.student_weight, self.teacher_weight,
                   *(self.served or {}).values())
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# Logits with a standard deviation of 3 give a spread-out but peaked softmax (entropy of a few
# nats at V=150K); the teacher is the student plus noise so that their top-k sets overlap.
LOGIT_SCALE = 3.0


def make_inputs(case: Case, dtype: torch.dtype, device, requires_grad: bool, *, k: int = 16,
                temperature: float = 1.0, seed: int = 0) -> Inputs:
    """Random inputs of the case's shape, created directly in ``dtype`` (no fp32 temporaries);
    a served case's answer is taken from the random dense teacher (served_inputs: top-k size
    ``k``, at the loss ``temperature``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, m = case.n, case.model

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).mul_(scale)

    tokens = torch.randint(0, m.vocab, (n,), generator=gen, device=device)
    if case.form == "logits":
        student = randn(n, m.vocab, scale=LOGIT_SCALE)
        teacher = randn(n, m.vocab).add_(student)
        dense = Inputs(student.requires_grad_(requires_grad), teacher, tokens)
    else:
        student = randn(n, m.student_hidden)
        student_weight = randn(m.vocab, m.student_hidden, scale=LOGIT_SCALE / math.sqrt(m.student_hidden))
        teacher, teacher_weight = correlated_teacher(student, student_weight, m.teacher_hidden, randn)
        dense = Inputs(student.requires_grad_(requires_grad), teacher, tokens,
                       student_weight.requires_grad_(requires_grad), teacher_weight)
    return dense if case.teacher_k is None else served_inputs(case, dense, k, temperature)


def served_inputs(case: Case, dense: Inputs, k: int, temperature: float) -> Inputs:
    """A served case's inputs: the student of ``dense`` and, for its teacher, what a server
    returns from that teacher's logits at the loss temperature (the fp32 log-probs), with the
    student's top-k ids from student_topk_ids, as a client asks for them. Built untimed; the
    dense teacher is dropped."""
    with torch.no_grad():
        if case.form == "logits":
            teacher_logits = dense.teacher
            support = lambda: opd_kernels.student_topk_ids(dense.student, k=k)  # noqa: E731
        else:
            teacher_logits = reference.linear_logits(dense.teacher, dense.teacher_weight)
            support = lambda: opd_kernels.fused_linear_student_topk_ids(  # noqa: E731
                dense.student, dense.student_weight, k=k)
        log_q = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
        answer = served_answer(log_q, case.teacher_k, case.needs, dense.tokens, support)
    return Inputs(dense.student, None, dense.tokens, dense.student_weight, served=answer)


def served_answer(log_q: torch.Tensor, teacher_k: int, needs, tokens, support) -> dict:
    """The answer of a teacher with log-probs ``log_q`` [N, V]: its top-K ``teacher_ids`` and
    ``teacher_logprobs``, and as ``needs`` asks, ``teacher_token_logprob`` (log q of the
    tokens) and ``teacher_logprobs_at`` (log q at the ids ``support()`` returns)."""
    top = torch.topk(log_q, teacher_k, dim=-1)
    answer = {"teacher_ids": top.indices, "teacher_logprobs": top.values}
    if Need.TEACHER_AT_TOKENS in needs:
        answer["teacher_token_logprob"] = log_q.gather(-1, tokens[:, None]).squeeze(-1)
    if Need.SUPPORT in needs:
        answer["teacher_logprobs_at"] = log_q.gather(-1, support())
    return answer


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
def gradient_form(objective: ObjectiveOp, k: int = 2) -> GradForm:
    """The objective's declared gradient form (objectives.base), read off from_passes on a tiny
    input at top-k size ``k`` (and its served K): which of p, q enter dL/dx at every id, and
    how many ids its sparse part has."""
    g = torch.Generator().manual_seed(0)
    vocab = 2 * max(4, k, objective.teacher_k or 0)
    s, t = (torch.randn(2, vocab, generator=g, dtype=torch.float64) for _ in range(2))
    tokens, needs, params = torch.tensor([1, 2]), objective.needs, objective.kwargs
    if objective.teacher_k is None:
        results = reference.pass_results(s, t, needs, tokens=tokens, k=k, **params)
    else:
        answer = served_answer(torch.log_softmax(t, -1), objective.teacher_k, needs, tokens,
                               lambda: topk_ids(s, k))
        results = baselines.served_pass_results(s, answer, tokens, k, needs)
    return objective.spec.from_passes(results, **params)[1]


def objective_reads(objective: ObjectiveOp) -> tuple[int, int]:
    """(forward, backward) reads of an [N, V] logits tensor an objective cannot avoid.

    Forward, from its needs: a dense teacher read in full (``reads_full_teacher``: its whole
    distribution, or log q at the tokens) reads both models at every id; SUPPORT alone reads the
    student only (the teacher at k ids is negligible); MIXTURE is one more read of both (the
    mixture sums need both final normalizers first); a served teacher costs no read (its [N, K]
    answer: served_answer_bytes). Backward, from its gradient form: a dense gradient reads the
    student again (its softmax), and the teacher too where q enters it at every id (the
    reverse, forward or mixture terms); a sparse-only gradient (k values a row) reads neither.
    """
    needs = objective.needs
    if objective.teacher_k is not None:
        fwd = 1
    else:
        fwd = (2 if reads_full_teacher(needs) else 1) + (2 if Need.MIXTURE in needs else 0)
    grad = gradient_form(objective)
    bwd = 0 if not grad.dense else 1 + bool(grad.reverse or grad.forward or grad.mixture)
    return fwd, bwd


def _reads(op: str) -> tuple[int, int]:
    objective = OPS[op]
    return _STANDALONE_READS[op] if objective is None else objective_reads(objective)


def served_answer_bytes(objective: ObjectiveOp, n: int, k: int) -> int:
    """A served answer read once: [N, K] int64 ids and fp32 log-probs, and as the objective
    needs, [N] fp32 log q of the tokens and [N, k] fp32 log q at the student's top-k."""
    needs = objective.needs
    return n * (12 * objective.teacher_k + 4 * (Need.TEACHER_AT_TOKENS in needs)
                + 4 * k * (Need.SUPPORT in needs))


def logits_floor_bytes(op: str, mode: str, n: int, vocab: int, itemsize: int, k: int) -> int:
    """Bytes of the logits each pass must read, plus the one gradient the backward writes.

    Forward: one read of every logits tensor the op depends on at every id (topk needs the
    teacher at k ids only; a served teacher is its [N, K] answer). Backward: the dense gradient
    needs the student again (its softmax) and, where the teacher's q enters it at every id (the
    KLs, the JSD), the teacher too; a k-sparse gradient only writes the (mostly zero) gradient.
    See objective_reads.
    """
    reads_fwd, reads_bwd = _reads(op)
    elements = n * vocab
    passes = reads_fwd
    if mode == "fwd+bwd":
        passes += reads_bwd + 1  # + the gradient written once
    objective = OPS[op]
    served = 0 if objective is None or objective.teacher_k is None else served_answer_bytes(objective, n, k)
    return passes * elements * itemsize + served


def fused_floor_flops(op: str, mode: str, n: int, vocab: int, hs: int, ht: int, k: int) -> int:
    """lm_head FLOPs no implementation can skip (each product counted once).

    One model's logits cost 2NVH. logsumexp / token log-probs use the student only; KL and the
    statistics both models' full products. An objective, from its needs: the student's product
    always; the teacher's full product where ``reads_full_teacher``, else its logits at k ids
    (2NkHt), none for a served teacher (the student's logits at its K ids are in the student's
    product); MIXTURE recomputes both products in its second pass (the fused form keeps no
    logits). Backward: a dense gradient over the logits costs dh (2NVHs) plus dW (2NVHs); a
    sparse one at w ids a row (k, or a served K) 2NwHs each.
    """
    student, teacher = 2 * n * vocab * hs, 2 * n * vocab * ht
    objective = OPS[op]
    if op in ("logsumexp", "token_logprobs"):
        fwd, bwd = student, 2 * student
    elif objective is None:
        fwd, bwd = student + teacher, 2 * student
    else:
        needs = objective.needs
        if objective.teacher_k is not None:
            fwd = student
        else:
            fwd = student + (teacher if reads_full_teacher(needs) else 2 * n * k * ht)
            fwd += (student + teacher) if Need.MIXTURE in needs else 0
        grad = gradient_form(objective, k)
        bwd = 2 * student if grad.dense else 4 * n * grad.sparse_ids.shape[-1] * hs
    return fwd + (bwd if mode == "fwd+bwd" else 0)


def floor(case: Case, mode: str, itemsize: int, k: int) -> tuple[str, int]:
    """("bytes", B) for the logits form, ("flops", F) for the fused form."""
    m = case.model
    if case.form == "logits":
        return "bytes", logits_floor_bytes(case.op, mode, case.n, m.vocab, itemsize, k)
    return "flops", fused_floor_flops(case.op, mode, case.n, m.vocab, m.student_hidden,
                                      m.teacher_hidden, k)
