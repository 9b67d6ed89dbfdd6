"""The logits-form kernels as the fused-linear gradient-in-forward path launches them.

That path (ops/triton_fused_linear.py, ``fused_linear_opd_loss_reduced``) writes one token
chunk of both models' logits u = h W^T into an fp32 scratch with cuBLAS, then runs the logits
backend's kernels over it: ``row_stats`` (lse, KL or token log-probs, top-k statistics) and
``logits_grad`` (dL/du, stored in the input dtype for the two GEMMs that follow). Those are
specializations the logits backend itself never launches (fp32 logits with mask and tokens,
fp32 logits with a bf16/fp16 gradient), so they are listed here for the ahead-of-time compile.
No kernel of its own lives here.
"""
import dataclasses

from opd_kernels.kernels.logits_grad import _reverse_kl_spec, _softmax_spec
from opd_kernels.kernels.row_stats import _finalize_spec, _partial_spec


def _gradient_in(spec, dtype: str):
    """``spec`` (all pointers fp32) storing its gradient in ``dtype``."""
    return dataclasses.replace(spec, signature={**spec.signature, "grad_ptr": f"*{dtype}"},
                               label=f"{spec.label},grad {dtype}")


AOT_SPECS = [
    _partial_spec("fp32", "scratch,kl"),
    _partial_spec("fp32", "scratch,kl,stats,top16,mask", mask=True, k_pad=16),
    _finalize_spec("fp32", "scratch,kl,mask", mask=True),
    _finalize_spec("fp32", "scratch,kl,tokens,mask", mask=True, tokens=True),
    _finalize_spec("fp32", "scratch,stats,top16,mask", mask=True, k_pad=16),
    *(_gradient_in(_reverse_kl_spec("fp32", f"scratch,mask={mask}", mask=mask), dt)
      for dt in ("bf16", "fp16") for mask in (False, True)),
    *(_gradient_in(_softmax_spec("fp32", f"scratch,tokens,mask={mask}", tokens=True, mask=mask), dt)
      for dt in ("bf16", "fp16") for mask in (False, True)),
]
