"""The public API on the PyTorch backend against the reference, in float64 and float32."""
import importlib
import math

import pytest
import torch

import opd_kernels as O
from opd_kernels import objectives
from opd_kernels import reference as R

D = torch.float64
# (the module, not the attribute: backends/__init__.py imports the torch package under that name)
torch_backend = importlib.import_module("opd_kernels.backends.torch")


def rand(*shape, scale=3.0, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=D) * scale).to(dtype)


def masks(lead):
    some = torch.rand(lead, generator=torch.Generator().manual_seed(3)) > 0.4
    some.view(-1)[0] = True
    return {"none": None, "some": some, "all_out": torch.zeros(lead, dtype=torch.bool)}


@pytest.mark.parametrize("objective", objectives.names())
@pytest.mark.parametrize("mask_kind", ["none", "some", "all_out"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_opd_loss_matches_reference(objective, mask_kind, tau):
    lead, vocab = (2, 5), 33
    zs, zt = rand(*lead, vocab).requires_grad_(), rand(*lead, vocab, seed=1)
    tokens = torch.randint(0, vocab, lead, generator=torch.Generator().manual_seed(2))
    mask = masks(lead)[mask_kind]
    loss, stats = O.opd_loss(zs, zt, objective=objective, tokens=tokens, k=4, mask=mask,
                             temperature=tau, return_stats=True, backend="torch")
    expected = R.opd_loss(zs, zt, objective, tokens, 4, mask, tau)
    (g,) = torch.autograd.grad(loss, zs)
    (g_ref,) = torch.autograd.grad(expected, zs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    if mask_kind == "all_out":
        assert loss.item() == 0.0 and (g == 0).all()
        assert all(math.isnan(v) for k_, v in stats.summary().items())
    ref_stats = R.topk_overlap(zs.detach(), zt, 4, tau, tokens=tokens)
    counted = torch.ones(lead, dtype=torch.bool) if mask is None else mask
    for name, value in stats.tensors().items():
        assert value.shape == lead and value.dtype == torch.float32
        torch.testing.assert_close(value[counted], getattr(ref_stats, name)[counted].float(),
                                   equal_nan=True)
        assert torch.isnan(value[~counted]).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reverse_kl_reductions_and_per_position_upstream_gradient(reduction):
    zs, zt = rand(6, 17).requires_grad_(), rand(6, 17, seed=1)
    mask = torch.tensor([True, True, False, True, False, True])
    out = O.reverse_kl(zs, zt, mask=mask, reduction=reduction, backend="torch")
    expected = R.reduce(R.reverse_kl(zs, zt), mask, reduction)
    torch.testing.assert_close(out, expected)
    upstream = torch.linspace(-2, 3, out.numel(), dtype=D).reshape(out.shape)
    (g,) = torch.autograd.grad(out, zs, upstream)
    (g_ref,) = torch.autograd.grad(expected, zs, upstream)
    torch.testing.assert_close(g, g_ref)


def test_float32_against_float64_oracle_and_leading_dims():
    zs32, zt32 = rand(3, 2, 1000, dtype=torch.float32), rand(3, 2, 1000, seed=1, dtype=torch.float32)
    out = O.reverse_kl(zs32, zt32, reduction="none", backend="torch")
    assert out.dtype == torch.float32 and out.shape == (3, 2)
    torch.testing.assert_close(out.double(), R.reverse_kl(zs32.double(), zt32.double()), rtol=1e-5, atol=1e-6)
    lse = O.logsumexp(zs32, temperature=2.0, backend="torch")
    torch.testing.assert_close(lse.double(), R.logsumexp(zs32.double(), 2.0), rtol=1e-6, atol=1e-6)


def test_logsumexp_and_token_logprobs_gradients():
    z = rand(4, 9).requires_grad_()
    y = torch.tensor([1, 0, 8, 4])
    assert torch.autograd.gradcheck(lambda x: O.logsumexp(x, temperature=0.5, backend="torch"), (z,))
    assert torch.autograd.gradcheck(lambda x: O.token_logprobs(x, y, temperature=2.0, backend="torch"), (z,))


@pytest.mark.parametrize("objective", ["full", "topk", "forward_kl", "jsd"])
def test_gradcheck_float64(objective):
    zs, zt = rand(3, 7).requires_grad_(), rand(3, 7, seed=1)
    fn = lambda x: O.opd_loss(x, zt, objective=objective, k=3, temperature=0.7, backend="torch")
    assert torch.autograd.gradcheck(fn, (zs,))


def test_large_logits_and_teacher_minus_inf():
    zs = torch.tensor([[1e4, -1e4, 0.0, 1e4]], dtype=torch.float32)
    zt = torch.tensor([[1e4, 1e4, -1e4, 0.0]], dtype=torch.float32)
    kl = O.reverse_kl(zs, zt, reduction="none", backend="torch")
    torch.testing.assert_close(kl.double(), R.reverse_kl(zs.double(), zt.double()))
    assert torch.isfinite(kl).all()
    zt_inf = torch.tensor([[0.0, -math.inf, 0.0, 0.0]])
    assert O.reverse_kl(torch.zeros(1, 4), zt_inf, reduction="none", backend="torch").item() == math.inf


def test_opd_loss_module_on_both_forms():
    hs, ws = rand(2, 3, 8).requires_grad_(), rand(19, 8, scale=0.5).requires_grad_()
    ht, wt = rand(2, 3, 5, seed=1), rand(21, 5, seed=2, scale=0.5)
    loss_fn = O.OPDLoss(objective="full", vocab_size=19, backend="torch")
    fused = loss_fn(hs, ht, student_weight=ws, teacher_weight=wt)
    logits = O.OPDLoss(objective="full", backend="torch")(R.linear_logits(hs, ws), R.linear_logits(ht, wt, 19))
    torch.testing.assert_close(fused, logits)
    with pytest.raises(ValueError, match="both student_weight and teacher_weight"):
        loss_fn(hs, ht, student_weight=ws)


@pytest.mark.parametrize("objective", objectives.names())
@pytest.mark.parametrize("return_stats", [False, True])
def test_fused_linear_matches_reference_on_materialized_logits(objective, return_stats):
    hs, ws = rand(7, 12, scale=1.0).requires_grad_(), rand(40, 12, seed=1, scale=0.5).requires_grad_()
    ht, wt = rand(7, 9, seed=2, scale=1.0), rand(44, 9, seed=3, scale=0.5)
    tokens = torch.randint(0, 37, (7,), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([True, False, True, True, True, False, True])
    out = O.fused_linear_opd_loss(hs, ws, ht, wt, objective=objective, tokens=tokens, k=5, mask=mask,
                                  temperature=1.3, vocab_size=37, return_stats=return_stats,
                                  backend="torch")
    loss = out[0] if return_stats else out
    expected = R.opd_loss(R.linear_logits(hs, ws, 37), R.linear_logits(ht, wt, 37), objective, tokens,
                          5, mask, 1.3)
    grads = torch.autograd.grad(loss, (hs, ws))
    grads_ref = torch.autograd.grad(expected, (hs, ws))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert (grads[1][37:] == 0).all()  # padding rows of the weight get nothing


def test_fused_linear_weight_gradient_summed_in_fp32_across_chunks(monkeypatch):
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 4 * 64)  # one row a chunk: many partial sums
    hs = rand(64, 16, scale=1.0, dtype=torch.bfloat16).requires_grad_()
    ws = rand(64, 16, seed=1, scale=0.3, dtype=torch.bfloat16).requires_grad_()
    ht, wt = rand(64, 8, seed=2, dtype=torch.bfloat16), rand(64, 8, seed=3, dtype=torch.bfloat16)
    ref = R.opd_loss(R.linear_logits(hs.double(), ws.double()), R.linear_logits(ht.double(), wt.double()), "full")
    (g_ref,) = torch.autograd.grad(ref, ws)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        loss = O.fused_linear_reverse_kl(hs, ws, ht, wt, weight_grad_dtype=dtype, backend="torch")
        (g,) = torch.autograd.grad(loss, ws)
        assert g.dtype == torch.bfloat16
        errors[dtype] = (g.double() - g_ref).norm() / g_ref.norm()
    assert errors[torch.float32] < errors[torch.bfloat16]


def test_fused_linear_logsumexp_and_token_logprobs():
    h, w = rand(2, 3, 6).requires_grad_(), rand(11, 6, seed=1, scale=0.5).requires_grad_()
    y = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(lambda a, b: O.fused_linear_logsumexp(a, b, temperature=0.5, backend="torch"), (h, w))
    assert torch.autograd.gradcheck(lambda a, b: O.fused_linear_token_logprobs(a, b, y, backend="torch"), (h, w))
    stats = O.fused_linear_topk_overlap(h, w, h.detach(), w.detach(), k=3, backend="torch")
    assert stats.summary()["overlap"] == 1.0 and stats.summary()["entropy_gap"] == 0.0


def test_single_model_ops_with_softcap_and_bias():
    z = rand(2, 3, 9, scale=10.0).requires_grad_()
    y = torch.randint(0, 9, (2, 3), generator=torch.Generator().manual_seed(0))
    capped = R.softcapped(z, 4.0)
    lse = O.logsumexp(z, temperature=0.7, softcap=4.0, backend="torch")
    torch.testing.assert_close(lse, R.logsumexp(capped, 0.7))
    lp = O.token_logprobs(z, y, temperature=0.7, softcap=4.0, backend="torch")
    torch.testing.assert_close(lp, R.token_logprobs(capped, y, 0.7))
    assert torch.autograd.gradcheck(lambda x: O.token_logprobs(x, y, softcap=4.0, backend="torch"), (z,))
    h, w = rand(2, 3, 5).requires_grad_(), rand(11, 5, seed=1, scale=0.5).requires_grad_()
    b = rand(11, seed=2).requires_grad_()
    y = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(1))
    zb = R.softcapped(R.linear_logits(h, w, bias=b), 3.0)
    torch.testing.assert_close(O.fused_linear_logsumexp(h, w, bias=b, softcap=3.0, backend="torch"),
                               R.logsumexp(zb))
    torch.testing.assert_close(O.fused_linear_token_logprobs(h, w, y, bias=b, softcap=3.0, backend="torch"),
                               R.token_logprobs(zb, y))
    assert torch.autograd.gradcheck(
        lambda a, c, d: O.fused_linear_token_logprobs(a, c, y, bias=d, temperature=0.5, backend="torch"),
        (h, w, b))


def test_opd_loss_module_objective_parameters_and_biases():
    hs, ws, bs = rand(4, 6).requires_grad_(), rand(9, 6, seed=1, scale=0.5), rand(9, seed=2)
    ht, wt, bt = rand(4, 3, seed=3), rand(9, 3, seed=4, scale=0.5), rand(9, seed=5)
    module = O.OPDLoss(objective="jsd", beta=0.3, temperature=0.7, student_softcap=5.0, backend="torch")
    assert "beta=0.3" in repr(module)
    fused = module(hs, ht, student_weight=ws, teacher_weight=wt, student_bias=bs, teacher_bias=bt)
    expected = R.opd_loss(R.linear_logits(hs, ws, bias=bs), R.linear_logits(ht, wt, bias=bt), "jsd",
                          temperature=0.7, student_softcap=5.0, beta=0.3)
    torch.testing.assert_close(fused, expected)
    with pytest.raises(ValueError, match="the biases apply to the fused-linear form"):
        module(R.linear_logits(hs, ws), R.linear_logits(ht, wt), student_bias=bs)
