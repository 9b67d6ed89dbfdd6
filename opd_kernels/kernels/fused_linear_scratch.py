"""The logits-form kernels as the fused-linear gradient-in-forward path launches them.

That path (backends/triton_fused_grad.py, ``reduced_loss``) writes one token chunk of both
models' logits u = h W^T + b into an fp32 scratch with cuBLAS, then runs the logits backend's
kernels over it: ``row_stats`` (lse, both KLs or token log-probs, top-k statistics),
``row_mixture`` (the JSD) and ``row_grad`` (dL/du, stored in the input dtype for the two GEMMs
that follow). Those are specializations the logits backend itself never launches (fp32 logits with mask and tokens,
fp32 logits with a bf16/fp16 gradient), so they are listed here for the ahead-of-time compile.
No kernel of its own lives here.
"""
from opd_kernels.kernels.row_grad import dense_grad_spec
from opd_kernels.kernels.row_stats import _finalize_spec, _partial_spec

AOT_SPECS = [
    _partial_spec("fp32", "scratch,kl"),
    _partial_spec("fp32", "scratch,kl,stats,top16,mask", mask=True, k_pad=16),
    _finalize_spec("fp32", "scratch,kl,mask", mask=True),
    _finalize_spec("fp32", "scratch,kl,tokens,mask", mask=True, tokens=True),
    _finalize_spec("fp32", "scratch,stats,top16,mask", mask=True, k_pad=16),
    *(dense_grad_spec("fp32", f"scratch,{what},mask={mask},grad {dt}", teacher=teacher, mask=mask,
                      mixture=mixture, grad_dtype=dt)
      for dt in ("bf16", "fp16") for mask in (False, True)
      for what, teacher, mixture in (("student", False, False), ("pair", True, False),
                                     ("pair,mixture", True, True))),
]
