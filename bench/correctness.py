"""Every public op on one backend against the float64 reference, in each input dtype.

    python -m bench.correctness                      # CUDA, Triton backend, fp32 bf16 fp16
    TRITON_INTERPRET=1 python -m bench.correctness --device cpu --dtypes fp32 fp16

The GPU counterpart of the CPU test suite (which runs the kernels under the interpreter, where
bf16 arithmetic is wrong): values, gradients (student logits; student hidden and weight in the
fused form, with a random upstream gradient), the top-k statistics, a mask with some rows out
and a temperature != 1. Error = ||ours - ref|| / ||ref|| over finite entries (the statistics:
the largest absolute difference); the NaN/inf patterns must match exactly. Exit status 1 when any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Norm-wise relative tolerances. Values are fp32 computed from exactly representable inputs;
# fused fp32 inputs may go through tf32 matrix products. Gradients are stored in the input
# dtype, so they carry its rounding (bf16: 2^-8 relative).
VALUE_TOL = {"logits": 2e-5, "fused": {torch.float32: 2e-3, torch.bfloat16: 1e-4, torch.float16: 1e-4}}
GRAD_TOL = {torch.float32: {"logits": 2e-5, "fused": 2e-3}, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _finite_pair(ours: torch.Tensor, ref: torch.Tensor):
    """The entries finite in both, or None when the NaN/inf patterns differ."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    same = (torch.equal(torch.isnan(ours), torch.isnan(ref))
            and torch.equal(torch.isinf(ours), torch.isinf(ref))
            and torch.equal(ours[torch.isinf(ours)], ref[torch.isinf(ref)]))
    finite = torch.isfinite(ref)
    return (ours[finite], ref[finite]) if same else None


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| over the finite entries; inf if NaN/inf patterns differ."""
    pair = _finite_pair(ours, ref)
    if pair is None:
        return float("inf")
    return float((pair[0] - pair[1]).norm() / pair[1].norm().clamp(min=1e-30))


def max_abs_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    pair = _finite_pair(ours, ref)
    if pair is None:
        return float("inf")
    return float((pair[0] - pair[1]).abs().max()) if pair[1].numel() else 0.0


def _grad_tol(dtype, form):
    tol = GRAD_TOL[dtype]
    return tol[form] if isinstance(tol, dict) else tol


def _value_tol(dtype, form):
    tol = VALUE_TOL[form]
    return tol[dtype] if isinstance(tol, dict) else tol


def check_case(op: str, form: str, dtype: torch.dtype, device, n: int, vocab: int, hs: int, ht: int,
               k: int, tau: float, backend: str, seed: int = 0) -> list[tuple[str, float, float]]:
    """[(quantity, error, tolerance)] for one op in one form and dtype."""
    import opd_kernels as ok
    from opd_kernels import reference as R
    from opd_kernels.objectives import Need

    from .registry import OPS
    from .workloads import correlated_teacher

    g = torch.Generator().manual_seed(seed)
    randn = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    mask = torch.rand(n, generator=g) > 0.3
    tokens = torch.randint(0, vocab, (n,), generator=g)
    objective = OPS[op]  # an ObjectiveOp, or None for a standalone op
    if form == "logits":
        leaves64 = [randn(n, vocab, scale=3.0)]
        teacher64 = leaves64[0] + randn(n, vocab)
    else:
        leaves64 = [randn(n, hs), randn(vocab, hs, scale=3.0 / hs ** 0.5)]
        teacher64 = correlated_teacher(*leaves64, ht, randn)
    # Both sides see the same values: ours the low-precision tensors, the reference them upcast.
    low = [t.to(dtype) for t in leaves64]
    ref_leaves = [t.double().requires_grad_() for t in low]
    ours_leaves = [t.to(device).requires_grad_() for t in low]
    if form == "logits":
        t_low = teacher64.to(dtype)
        ref_student, ref_teacher = ref_leaves[0], t_low.double()
        args = (ours_leaves[0], t_low.to(device))
    else:
        t_low = [t.to(dtype) for t in teacher64]
        ref_student = R.linear_logits(*ref_leaves)
        ref_teacher = R.linear_logits(*[t.double() for t in t_low])
        args = (ours_leaves[0], ours_leaves[1], t_low[0].to(device), t_low[1].to(device))
    dev_tokens, dev_mask = tokens.to(device), mask.to(device)
    kw = {"temperature": tau, "backend": backend}
    prefix = "" if form == "logits" else "fused_linear_"

    if op == "topk_overlap":
        stats = getattr(ok, prefix + "topk_overlap")(*args, k=k, mask=dev_mask, **kw)
        ref = R.topk_overlap(ref_student.detach(), ref_teacher, k, tau)
        # Statistics are O(1) (ratios, masses, nats) and some are exactly 0 in the reference (the
        # advantage over a one-token overlap): compared by their largest absolute difference.
        return [(name, max_abs_error(getattr(stats, name), torch.where(mask, ref_t, float("nan"))),
                 _value_tol(dtype, form)) for name, ref_t in ref.tensors().items()]

    if op in ("logsumexp", "token_logprobs"):
        args = args[:len(args) // 2]  # the student's logits, or its hidden states and weight
    if op == "logsumexp":
        ours = getattr(ok, prefix + "logsumexp")(*args, **kw)
        ref = R.logsumexp(ref_student, tau)
    elif op == "token_logprobs":
        ours = getattr(ok, prefix + "token_logprobs")(*args, dev_tokens, **kw)
        ref = R.token_logprobs(ref_student, tokens, tau)
    elif op == "reverse_kl":
        ours = getattr(ok, prefix + "reverse_kl")(*args, mask=dev_mask, reduction="none", **kw)
        ref = R.reduce(R.reverse_kl(ref_student, ref_teacher, tau), mask, "none")
    else:
        # tokens only where the objective declares it needs them: the path the suite times
        needs_tokens = Need.TOKENS in objective.needs
        ours = getattr(ok, prefix + "opd_loss")(*args, objective=objective.name,
                                                tokens=dev_tokens if needs_tokens else None, k=k,
                                                mask=dev_mask, reduction="none", **objective.kwargs,
                                                **kw)
        ref = R.opd_loss(ref_student, ref_teacher, objective.name, tokens if needs_tokens else None,
                         k, mask, tau, "none", **objective.kwargs)
    upstream = randn(n)
    grads = torch.autograd.grad(ours, ours_leaves, upstream.to(device, ours.dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, upstream)
    names = ["d_logits"] if form == "logits" else ["d_hidden", "d_weight"]
    return [("value", rel_error(ours, ref), _value_tol(dtype, form))] + [
        (name, rel_error(a, b), _grad_tol(dtype, form)) for name, a, b in zip(names, grads, ref_grads)]


def main(argv=None) -> int:
    from .registry import FORMS, OPS, SERVED_OPS

    p = argparse.ArgumentParser(prog="python -m bench.correctness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="triton")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=sorted(DTYPES))
    dense = [op for op in OPS if op not in SERVED_OPS]  # the served ops: tests/test_served_teacher.py
    p.add_argument("--ops", nargs="+", default=dense, choices=dense)
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    p.add_argument("--n", type=int, default=37, help="positions (odd on purpose)")
    p.add_argument("--vocab", type=int, default=50257, help="not a multiple of any tile")
    p.add_argument("--hidden", type=int, nargs=2, default=[256, 384], metavar=("HS", "HT"))
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu with TRITON_INTERPRET=1)")
    if device.type == "cpu" and args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("Triton on CPU tensors needs TRITON_INTERPRET=1 set before Python starts")

    failures, total = 0, 0
    print(f"{'op':<17} {'form':<7} {'dtype':<5} {'quantity':<18} {'error':>10} {'tol':>8}  verdict")
    for form in args.forms:
        for op in args.ops:
            for name in args.dtypes:
                try:
                    results = check_case(op, form, DTYPES[name], device, args.n, args.vocab,
                                         *args.hidden, args.k, args.temperature, args.backend)
                except Exception as exc:  # report every op, not only the first broken one
                    results = [(f"raised {type(exc).__name__}: {exc}"[:120], float("inf"), 0.0)]
                for quantity, err, tol in results:
                    ok = err <= tol
                    failures += not ok
                    total += 1
                    print(f"{op:<17} {form:<7} {name:<5} {quantity:<18} {err:>10.2e} {tol:>8.0e}  "
                          f"{'ok' if ok else 'FAIL'}", flush=True)
    print(f"correctness: {total - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
