"""Edge inputs through the public API, on both backends, against the float64 reference."""
import math

import pytest
import torch

import opd_kernels as O
from opd_kernels import objectives
from opd_kernels import reference as R

INF = math.inf


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_student_zero_mass_inside_the_shared_set(backend):
    # Fewer finite student logits than k: S holds ids with p = 0, whose terms count as 0.
    zs = torch.tensor([[0.0, 0.5, -INF, -INF], [1.0, -INF, 0.0, 2.0]])
    zt = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.5, 0.0, 1.0, -1.0]])
    stats = O.topk_overlap(zs, zt, k=4, backend=backend)
    ref = R.topk_overlap(zs.double(), zt.double(), k=4)
    assert torch.isfinite(ref.overlap_advantage).all()
    for name, value in stats.tensors().items():
        torch.testing.assert_close(value.double(), getattr(ref, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
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
