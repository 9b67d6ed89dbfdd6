"""The fused-linear loss reduced to a scalar with its gradient computed in the forward
(backends/triton_fused_grad.py, ``reduced_loss``), interpreted on CPU, against the reference on
float64 logits: values and gradients w.r.t. the student's hidden states and weight for an
upstream scalar != 1, and the same numbers as the per-row path (``grad_in_forward=False``)."""
import pytest
import torch

import opd_kernels
from opd_kernels import reference
from opd_kernels.backends import triton_fused, triton_fused_grad
from test_triton_fused_linear import (_assert_fp32, _assert_stats_close, _check, _inputs, _mask,
                                      _run)

UPSTREAM = torch.tensor(2.5, dtype=torch.float64)


def _loss_pair(x, objective, reduction, mask, tau=1.0, vocab_size=None, k=4, grad_in_forward=True):
    """(ours, reference) scalar losses as functions of the student's (h, W)."""
    ht, wt, y = x["teacher_hidden"], x["teacher_weight"], x["tokens"]
    ours = lambda h, w: opd_kernels.fused_linear_opd_loss(
        h, w, ht.to(h.dtype), wt.to(h.dtype), objective=objective, tokens=y, k=k, mask=mask,
        temperature=tau, reduction=reduction, vocab_size=vocab_size,
        grad_in_forward=grad_in_forward, backend="triton")
    ref = lambda h, w: reference.opd_loss(
        reference.linear_logits(h, w, vocab_size),
        reference.linear_logits(ht.to(h.dtype), wt.to(h.dtype), vocab_size), objective, tokens=y,
        k=k, mask=mask, temperature=tau, reduction=reduction)
    return ours, ref


def _scalar_upstream(x):
    return {**x, "upstream": UPSTREAM}


@pytest.mark.parametrize("objective", ["full", "sampled", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,vocab,teacher_vocab,vocab_size,hs,ht,mask,tau,dtype", [
    (7, 700, 720, 650, 32, 48, "some", 0.5, torch.float32),
    (5, 600, 600, None, 48, 32, "none", 2.0, torch.float32),
    (4, 500, 500, None, 32, 32, "all", 1.0, torch.float32),
    (6, 640, 600, 600, 32, 48, "some", 1.0, torch.float16),
])
def test_reduced_loss_and_gradients_match_reference(objective, reduction, n, vocab, teacher_vocab,
                                                    vocab_size, hs, ht, mask, tau, dtype):
    x = _scalar_upstream(_inputs(n, vocab, hs, ht, teacher_vocab, dtype, seed=n))
    x["tokens"] %= vocab_size or vocab
    ours, ref = _loss_pair(x, objective, reduction, _mask(mask, n), tau, vocab_size)
    (value, grad_h, grad_w), _ = _check(ours, ref, x, dtype)
    if mask == "all":
        assert value == 0 and grad_h.abs().max() == 0 and grad_w.abs().max() == 0
    if vocab_size is not None:  # ids past vocab_size are outside both distributions
        assert grad_w[vocab_size:].abs().max() == 0


@pytest.mark.parametrize("objective", ["full", "sampled", "topk_pg"])
def test_gradient_in_forward_equals_recomputation_over_several_chunks(objective, monkeypatch):
    """Two-row chunks: each lm_head product runs once a chunk, the backward recomputes nothing,
    and the numbers are those of the per-row path and of one chunk."""
    n, vocab = 9, 800
    x = _scalar_upstream(_inputs(n, vocab, 32, 48, seed=2))
    m = _mask("some", n)
    ours, ref = _loss_pair(x, objective, "mean", m, tau=0.7)
    recomputed, _ = _loss_pair(x, objective, "mean", m, tau=0.7, grad_in_forward=False)
    args = (x["student_hidden"], x["student_weight"], UPSTREAM)
    one_chunk = _run(ours, *args)
    per_row = _run(recomputed, *args)

    products = []
    logits_into = triton_fused_grad.logits_into
    monkeypatch.setattr(triton_fused_grad, "logits_into",
                        lambda out, h, w: products.append(w.data_ptr()) or logits_into(out, h, w))
    monkeypatch.setattr(triton_fused, "SCRATCH_BYTES", 2 * vocab * (4 + 4))  # both fp32 logits
    monkeypatch.setattr(triton_fused_grad.Backward, "__call__",
                        lambda *a: pytest.fail("the gradient-in-forward path recomputed logits"))
    chunked = _run(ours, *args)
    student, teacher = x["student_weight"].data_ptr(), x["teacher_weight"].data_ptr()
    assert products == [student, teacher] * 5
    # fp32 GEMMs over different row counts round differently: agreement to ~1e-6 of the scale;
    # the per-row path's passes are other kernels (fused tiles, not the logits over a scratch),
    # and "sampled"'s mean of -r log p(y) cancels to ~1e-5 of its terms
    for a, b, c in zip(chunked, one_chunk, per_row):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
        assert (a - c).abs().max() <= 2e-5 * c.abs().max()
    _assert_fp32(chunked, _run(ref, x["student_hidden"], x["student_weight"], UPSTREAM, torch.float64))


@pytest.mark.parametrize("objective", ["full", "sampled"])
def test_statistics_ride_the_gradient_pass(objective, monkeypatch):
    """return_stats with a gradient: the statistics come from the chunks' pass over the scratch
    (three chunks, concatenated) and equal the reference's; no tile pass runs beside it."""
    n = 6
    x = _inputs(n, 600, 32, 48, seed=4)
    m = _mask("some", n)
    monkeypatch.setattr(triton_fused, "SCRATCH_BYTES", 2 * 600 * 8)
    for name in ("_row_stats", "_pair_pass", "_gather"):
        monkeypatch.setattr(triton_fused, name, lambda *a, **kw: pytest.fail("a tile pass ran"))
    h = x["student_hidden"].clone().requires_grad_()
    loss, stats = opd_kernels.fused_linear_opd_loss(
        h, x["student_weight"], x["teacher_hidden"], x["teacher_weight"], objective=objective,
        tokens=x["tokens"], k=4, mask=m, return_stats=True, backend="triton")
    loss.backward()
    s64 = reference.linear_logits(x["student_hidden"].double(), x["student_weight"].double())
    t64 = reference.linear_logits(x["teacher_hidden"].double(), x["teacher_weight"].double())
    expected = reference.opd_loss(s64, t64, objective, tokens=x["tokens"], k=4, mask=m)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-7)
    _assert_stats_close(stats, reference.topk_overlap(s64, t64, 4, tokens=x["tokens"]), m)
    assert stats.reverse_kl is not None and stats.teacher_logprob is not None
    assert h.grad is not None


def test_no_gradient_work_without_a_student_that_needs_one(monkeypatch):
    x = _inputs(4, 500, 32)
    monkeypatch.setattr(triton_fused_grad, "reduced_loss",
                        lambda *a, **kw: pytest.fail("gradients computed with nothing to receive them"))
    h = x["student_hidden"].clone().requires_grad_()
    ht, wt = x["teacher_hidden"], x["teacher_weight"]
    expected = reference.opd_loss(
        reference.linear_logits(h.detach().double(), x["student_weight"].double()),
        reference.linear_logits(ht.double(), wt.double()), "full")
    with torch.no_grad():
        loss = opd_kernels.fused_linear_opd_loss(h, x["student_weight"], ht, wt, objective="full",
                                                 backend="triton")
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=0)
    frozen = opd_kernels.fused_linear_opd_loss(h.detach(), x["student_weight"], ht, wt,
                                               objective="sampled", tokens=x["tokens"],
                                               reduction="sum", backend="triton")
    assert not frozen.requires_grad


def test_frozen_weight_gets_no_gradient_and_hidden_does():
    x = _inputs(5, 500, 32, 48, seed=9)
    h = x["student_hidden"].clone().requires_grad_()
    w = x["student_weight"].clone()
    loss = opd_kernels.fused_linear_opd_loss(h, w, x["teacher_hidden"], x["teacher_weight"],
                                             objective="full", backend="triton")
    loss.backward()
    h64 = x["student_hidden"].double().requires_grad_()
    reference.opd_loss(reference.linear_logits(h64, w.double()),
                       reference.linear_logits(x["teacher_hidden"].double(),
                                               x["teacher_weight"].double()), "full").backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=0, atol=2e-5 * h64.grad.abs().max())
