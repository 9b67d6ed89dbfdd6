"""Edge inputs through the public API, on both backends, against the float64 reference."""
import math

import pytest
import torch

import opd_kernels as O
from opd_kernels import objectives
from opd_kernels import reference as R

INF = math.inf


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_student_zero_mass_inside_the_shared_set(backend):
    # Fewer finite student logits than k: S holds ids with p = 0, whose terms count as 0.
    zs = torch.tensor([[0.0, 0.5, -INF, -INF], [1.0, -INF, 0.0, 2.0]])
    zt = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.5, 0.0, 1.0, -1.0]])
    stats = O.topk_overlap(zs, zt, k=4, backend=backend)
    ref = R.topk_overlap(zs.double(), zt.double(), k=4)
    assert torch.isfinite(ref.overlap_advantage).all()
    for name, value in stats.tensors().items():
        torch.testing.assert_close(value.double(), getattr(ref, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_teacher_minus_inf_gives_inf_only_where_the_student_has_mass(backend):
    zs = torch.tensor([[0.0, 1.0, -INF, 2.0], [0.0, 1.0, 3.0, 2.0]]).requires_grad_()
    zt = torch.tensor([[1.0, 0.0, -INF, 0.5], [1.0, 0.0, -INF, 0.5]])
    kl = O.reverse_kl(zs, zt, reduction="none", backend=backend)
    ref = R.reverse_kl(zs.detach().double(), zt.double())
    assert math.isfinite(kl[0].item()) and kl[1].item() == INF
    torch.testing.assert_close(kl[0].double(), ref[0], rtol=1e-6, atol=1e-7)
    # masking the +inf row leaves a finite loss and gradient
    loss = O.reverse_kl(zs, zt, mask=torch.tensor([True, False]), backend=backend)
    (grad,) = torch.autograd.grad(loss, zs)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("objective", objectives.names())
def test_all_positions_masked(backend, objective):
    zs = torch.randn(3, 50).requires_grad_()
    zt = torch.full((3, 50), float("nan"))  # never read
    loss, stats = O.opd_loss(zs, zt, objective=objective, tokens=torch.zeros(3, dtype=torch.long),
                             k=4, mask=torch.zeros(3, dtype=torch.bool), return_stats=True,
                             backend=backend)
    (grad,) = torch.autograd.grad(loss, zs)
    assert loss.item() == 0.0 and (grad == 0).all()
    assert all(torch.isnan(t).all() for t in stats.tensors().values())


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("objective, params", [(n, {}) for n in objectives.names() if n != "jsd"]
                         + [("jsd", {"beta": b}) for b in (0.0, 0.3, 1.0)])
def test_both_models_exclude_the_same_ids(backend, objective, params):
    # -inf in both models at the same ids (a vocabulary both mask out): finite values and
    # gradients for every objective, equal to the reference on the remaining ids.
    zs = torch.randn(3, 12, generator=torch.Generator().manual_seed(0)).double()
    zt = torch.randn(3, 12, generator=torch.Generator().manual_seed(1)).double()
    zs[:, [2, 7]] = -INF
    zt[:, [2, 7]] = -INF
    keep = [i for i in range(12) if i not in (2, 7)]
    tokens = torch.tensor([0, 5, 11])
    dtype = torch.float64 if backend == "torch" else torch.float32
    x = zs.to(dtype).requires_grad_()
    loss = O.opd_loss(x, zt.to(dtype), objective=objective, tokens=tokens, k=4, temperature=0.7,
                      backend=backend, **params)
    (grad,) = torch.autograd.grad(loss, x)
    y = zs[:, keep].requires_grad_()
    expected = R.opd_loss(y, zt[:, keep], objective, torch.tensor([0, 4, 9]), 4, None, 0.7, **params)
    (g_ref,) = torch.autograd.grad(expected, y)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[:, [2, 7]] == 0).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[:, keep].double(), g_ref, rtol=1e-4, atol=1e-6)


OBJECTIVE_CASES = [(n, {}) for n in objectives.names() if n != "jsd"] + [("jsd", {"beta": 0.3})]


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("objective, params", OBJECTIVE_CASES)
def test_empty_batch_every_objective_both_forms(backend, objective, params):
    zs = torch.zeros(0, 3, 40, requires_grad=True)
    tokens = torch.zeros(0, 3, dtype=torch.long)
    loss = O.opd_loss(zs, torch.zeros(0, 3, 40), objective=objective, tokens=tokens, k=4,
                      reduction="none", backend=backend, **params)
    assert loss.shape == (0, 3)
    h, w = torch.zeros(0, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    for reduction in ("none", "mean"):
        loss = O.fused_linear_opd_loss(h, w, torch.zeros(0, 6), torch.randn(40, 6),
                                       objective=objective, tokens=torch.zeros(0, dtype=torch.long),
                                       k=4, reduction=reduction, backend=backend, **params)
        (grad_w,) = torch.autograd.grad(loss.sum(), w)
        assert (grad_w == 0).all() and (loss == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("objective, params", OBJECTIVE_CASES)
def test_logits_near_1e4_every_objective(backend, objective, params):
    # Centered sums: rows near +-1e4 lose nothing to cancellation (an fp32 lse there is off by
    # ~1e-3, which the split lse and centered accumulators keep out of the values).
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(4, 300, generator=g, dtype=torch.float64) * 2 + torch.tensor([1e4, -1e4, 1e4, 0.0])[:, None]
    zt = torch.randn(4, 300, generator=g, dtype=torch.float64) * 2 + torch.tensor([1e4, -1e4, -1e4, 1e4])[:, None]
    tokens = torch.tensor([0, 17, 299, 150])
    x = zs.float().requires_grad_()
    loss = O.opd_loss(x, zt.float(), objective=objective, tokens=tokens, k=8, reduction="none",
                      backend=backend, **params)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    y = zs.clone().requires_grad_()
    expected = R.opd_loss(y, zt, objective, tokens, 8, None, 1.0, "none", **params)
    (g_ref,) = torch.autograd.grad(expected.sum(), y)
    # the logits themselves are rounded to fp32 (ulp 1e-3 at 1e4): compare with the reference on
    # the rounded logits, to the precision fp32 arithmetic has on O(1) differences
    expected_rounded = R.opd_loss(zs.float().double(), zt.float().double(), objective, tokens, 8,
                                  None, 1.0, "none", **params)
    torch.testing.assert_close(loss.double(), expected_rounded, rtol=1e-4, atol=1e-4)
    y_rounded = zs.float().double().requires_grad_()
    (g_rounded,) = torch.autograd.grad(
        R.opd_loss(y_rounded, zt.float().double(), objective, tokens, 8, None, 1.0, "none",
                   **params).sum(), y_rounded)
    torch.testing.assert_close(grad.double(), g_rounded, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(expected).all() and g_ref.shape == grad.shape
