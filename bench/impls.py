"""Every implementation the suite times: ours, the PyTorch baselines and the peers.

An implementation's ``build(case, mode, inputs, k, temperature)`` returns a closure that runs the
forward once and returns its output (a scalar or per-row tensor, or the statistics); it is called
only where ``applies(case, mode, temperature)``. Peers are optional imports.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import baselines
from .registry import Case
from .workloads import Inputs


def _everywhere(case: Case, mode: str, tau: float) -> bool:
    return True


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "ours" | "pytorch" | "peer"
    build: Callable
    applies: Callable[[Case, str, float], bool] = _everywhere
    peer: Optional[str] = None  # the module a peer lives in


def _ours(backend: str):
    def build(case: Case, mode: str, x: Inputs, k: int, tau: float):
        import opd_kernels as ok

        kw = {"temperature": tau, "backend": backend}
        tokens = x.tokens if case.needs_tokens else None  # tokens add work where not needed
        params = case.objective_params
        if case.teacher_k is not None:
            loss = (ok.sparse_teacher_opd_loss if case.form == "logits"
                    else ok.fused_linear_sparse_teacher_opd_loss)
            student = (x.student,) if case.form == "logits" else (x.student, x.student_weight)
            return lambda: loss(*student, **x.served, objective=case.objective, tokens=tokens, k=k,
                                **params, **kw)
        if case.form == "logits":
            s, t = x.student, x.teacher
            return {
                "logsumexp": lambda: ok.logsumexp(s, **kw),
                "token_logprobs": lambda: ok.token_logprobs(s, x.tokens, **kw),
                "reverse_kl": lambda: ok.reverse_kl(s, t, **kw),
                "topk_overlap": lambda: ok.topk_overlap(s, t, k=k, **kw),
            }.get(case.op, lambda: ok.opd_loss(s, t, objective=case.objective, tokens=tokens,
                                               k=k, **params, **kw))
        hs, ws, ht, wt = x.student, x.student_weight, x.teacher, x.teacher_weight
        return {
            "logsumexp": lambda: ok.fused_linear_logsumexp(hs, ws, **kw),
            "token_logprobs": lambda: ok.fused_linear_token_logprobs(hs, ws, x.tokens, **kw),
            "reverse_kl": lambda: ok.fused_linear_reverse_kl(hs, ws, ht, wt, **kw),
            "topk_overlap": lambda: ok.fused_linear_topk_overlap(hs, ws, ht, wt, k=k, **kw),
        }.get(case.op, lambda: ok.fused_linear_opd_loss(hs, ws, ht, wt, objective=case.objective,
                                                       tokens=tokens, k=k, **params, **kw))
    return build


_COMPILED: dict = {}


def _compiled(fn):
    """torch.compile once per baseline function; dynamic shapes so that N and V reuse it."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _pytorch(compiled: bool):
    """Eager (or torch.compile of) the natural code: for an objective, its own ``reference`` on
    materialized fp32 logits (a served teacher: baselines.served_baseline). In the fused form
    the lm_head matmuls run eagerly (cuBLAS either way) and the compiled part is the loss on the
    materialized logits."""
    def build(case: Case, mode: str, x: Inputs, k: int, tau: float):
        fn = baselines.logits_op(case.op)
        fn = _compiled(fn) if compiled else fn

        def run():
            s, t = baselines.materialized(case, x)
            return fn(s, t, x.tokens, k, tau)
        return run
    return build


def _dense_teacher(case: Case, mode: str, tau: float) -> bool:
    """torch.compile times the dense-teacher ops: the served ones' eager code is a gather over
    [N, K] after the student's log_softmax, and compiling each of their baselines would spend
    the suite's time budget."""
    return case.teacher_k is None


def _scaled(z, tau):
    return z if tau == 1.0 else z / tau


# The peers below compute KL(student || teacher): the standalone reverse_kl op, and the objective
# that is that KL. Which objective that is, is a fact about the peers, checked against the
# declarations by the tests (reverse_kl is the "full" objective's reference).
PEER_KL_OBJECTIVE = "full"


def _is_reverse_kl(case: Case) -> bool:
    return case.op == "reverse_kl" or (case.objective == PEER_KL_OBJECTIVE
                                       and case.objective_op.params == ())


def _kl_in(form):
    return lambda case, mode, tau: case.form == form and _is_reverse_kl(case)


def _liger_jsd(case, mode, x, k, tau):
    """LigerJSD(beta=1) = KL(student || teacher); it takes log-probs, made by log_softmax."""
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=1.0)
    return lambda: jsd(torch.log_softmax(_scaled(x.student, tau), dim=-1),
                       torch.log_softmax(_scaled(x.teacher, tau), dim=-1))


def _liger_fused_jsd(case, mode, x, k, tau):
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=1.0, temperature=tau)
    return lambda: loss(x.student, x.student_weight, x.teacher, x.teacher_weight, None)


def _liger_chunked_jsd(case, mode, x, k, tau):
    """The torch.compile'd chunked loss, soft (distillation) term only."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                   temperature=tau)
    return lambda: loss(x.student, x.student_weight, x.teacher, x.teacher_weight, x.tokens)


def _trl_applies(case, mode, tau):
    """TRL's loss head is the generalized JSD in the fused form; beta = 1 is the reverse KL."""
    return case.form == "fused" and (case.objective == "jsd" or _is_reverse_kl(case))


def _trl_chunked_divergence(case, mode, x, k, tau):
    """TRL's ChunkedDivergenceFunction (the head of DistillationTrainer), mean over the rows."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    beta = case.objective_params.get("beta", 1.0)
    return lambda: ChunkedDivergenceFunction.apply(x.student, x.student_weight, None, x.teacher,
                                                   x.teacher_weight, None, beta, tau)[0].mean()


def _cce_applies(case, mode, tau):
    """Token log-probs, and the lse forward (CCE has no lse backward of its own); no temperature."""
    return case.form == "fused" and tau == 1.0 and (
        case.op == "token_logprobs" or (case.op == "logsumexp" and mode == "fwd"))


def _cce(case, mode, x, k, tau):
    """Cut Cross-Entropy: token log-probs = -linear_cross_entropy; lse from its forward kernel."""
    if case.op == "token_logprobs":
        from cut_cross_entropy import linear_cross_entropy

        return lambda: -linear_cross_entropy(x.student, x.student_weight, x.tokens, reduction="none")
    from cut_cross_entropy.cce_lse_forward import cce_lse_forward_kernel

    return lambda: cce_lse_forward_kernel(x.student, x.student_weight)


IMPLS = {impl.name: impl for impl in (
    Impl("opd-triton", "ours", _ours("triton")),
    Impl("opd-cpp", "ours", _ours("cpp")),
    Impl("opd-torch", "ours", _ours("torch")),
    Impl("eager", "pytorch", _pytorch(compiled=False)),
    Impl("compile", "pytorch", _pytorch(compiled=True), _dense_teacher),
    Impl("liger-jsd", "peer", _liger_jsd, _kl_in("logits"), peer="liger_kernel"),
    Impl("liger-fused-jsd", "peer", _liger_fused_jsd, _kl_in("fused"), peer="liger_kernel"),
    Impl("liger-chunked-jsd", "peer", _liger_chunked_jsd, _kl_in("fused"), peer="liger_kernel"),
    Impl("cce", "peer", _cce, _cce_applies, peer="cut_cross_entropy"),
    Impl("trl-chunked-divergence", "peer", _trl_chunked_divergence, _trl_applies, peer="trl"),
)}
GPU_IMPLS = ("opd-triton", "eager", "compile", "liger-jsd", "liger-fused-jsd",
             "liger-chunked-jsd", "cce", "trl-chunked-divergence")
CPU_IMPLS = ("opd-cpp", "opd-torch", "eager")
PEER_PACKAGES = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy",
                 "trl": "trl"}


def peer_status(module: str) -> str:
    """The installed version, "absent", or "unusable: <why>" when the import fails."""
    if importlib.util.find_spec(module) is None:
        return "absent"
    try:
        importlib.import_module(module)
    except Exception as exc:  # a peer that cannot load is reported, not fatal
        return f"unusable: {type(exc).__name__}: {exc}"[:200]
    try:
        return importlib.metadata.version(PEER_PACKAGES[module])
    except importlib.metadata.PackageNotFoundError:
        return "present"


def peer_usable(status: str) -> bool:
    return status != "absent" and not status.startswith("unusable")
