"""The native CPU backend of the logits form: the kernels of csrc/ (built by native.py) behind
logits_form.py, so every objective runs on them as on the Triton kernels.

csrc/row_pass.cpp makes the one forward read (the fields of kernels/row_fields.py and the
student's top-k, any k), csrc/row_grad.cpp the mixture read and the dense gradient, and
csrc/row_pass_grad.cpp both of a row at once where the objective's shift is affine in the row's
fields (the gradient in the forward of the fused-linear form); rows run in parallel on torch's
intra-op threads. fp32 and bf16 logits, fp32 accumulation; the gradient in
the logits' dtype.
"""
from __future__ import annotations

import torch

from . import native
from .base import Capabilities
from .logits_form import Kernels, LogitsFormBackend, RowPass, cap, shift_coefficients

# The registry imports this module only where native.available(); torch.compile then sees the
# ops themselves, not the build-once wrapper.
OPS = native.ops()
if OPS is None:
    raise ImportError("the native CPU kernels are unavailable here (see the warning)")

CAPABILITIES = Capabilities(forms=frozenset({"logits"}), devices=frozenset({"cpu"}),
                            dtypes=frozenset({torch.float32, torch.bfloat16}), served_teacher=True)


def _row_pass(student, teacher=None, tokens=None, mask=None, k=0, temperature=1.0,
              student_softcap=None, teacher_softcap=None) -> RowPass:
    fields, top_ids = OPS.row_pass(student, teacher, tokens, mask, k, temperature,
                                   cap(student_softcap), cap(teacher_softcap))
    return RowPass(fields, top_ids if k else None)


def _mixture(student, teacher, rp: RowPass, mask, temperature, caps, beta) -> tuple:
    sums = OPS.mixture(student, teacher, rp.fields, mask, temperature, *caps, beta)
    return sums[0], sums[1]


def _dense_grad(student, teacher, grad, rp: RowPass, form, shift, scale, mask, temperature, caps):
    OPS.dense_grad(student, teacher, rp.fields, shift, scale, mask, temperature, *caps,
                   form.reverse, form.forward, form.mixture, form.beta if form.mixture else 0.5,
                   grad)


def _row_pass_grad(student, teacher, tokens, mask, k, temperature, caps, form, scale, out) -> RowPass:
    fields, top_ids, mixture = OPS.row_pass_grad(
        student, teacher, tokens, mask, k, temperature, *caps, shift_coefficients(form),
        form.reverse, form.forward, form.mixture, form.beta, scale, out)
    return RowPass(fields, top_ids if k else None, mixture if form.mixture else None)


KERNELS = Kernels(row_pass=_row_pass, mixture=_mixture, dense_grad=_dense_grad,
                  row_pass_grad=_row_pass_grad)
BACKEND = LogitsFormBackend("cpp", CAPABILITIES, KERNELS)
