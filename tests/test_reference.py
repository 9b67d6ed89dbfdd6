"""The reference against the formulas of opd-math.md written out independently."""
import math

import pytest
import torch

from opd_kernels import objectives
from opd_kernels import reference as R

D = torch.float64


def rand(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D) * scale


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_reverse_kl_one_pass_form(tau):
    # KL = [sum_v e^{z_s/tau - m}(z_s - z_t)/tau] / s - lse_s + lse_t  (the online form kernels use)
    zs, zt = rand(4, 37), rand(4, 37, seed=1)
    m = (zs / tau).amax(-1, keepdim=True)
    w = torch.exp(zs / tau - m)
    one_pass = (w * (zs - zt) / tau).sum(-1) / w.sum(-1) - R.logsumexp(zs, tau) + R.logsumexp(zt, tau)
    torch.testing.assert_close(R.reverse_kl(zs, zt, tau), one_pass, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_reverse_kl_gradient_formula(tau):
    zs, zt = rand(3, 11).requires_grad_(), rand(3, 11, seed=1)
    kl = R.reverse_kl(zs, zt, tau)
    (grad,) = torch.autograd.grad(kl.sum(), zs)
    log_p, log_q = R.log_softmax(zs, tau), R.log_softmax(zt, tau)
    expected = log_p.exp() * (log_p - log_q - kl[:, None]) / tau
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-10, atol=1e-12)


def test_reverse_kl_infinite_where_teacher_excludes_student_mass():
    zs = torch.tensor([[0.0, 0.0, 0.0]], dtype=D)
    zt = torch.tensor([[0.0, -math.inf, 0.0]], dtype=D)
    assert R.reverse_kl(zs, zt).item() == math.inf
    # ... and finite where the student gives that token no mass.
    zs = torch.tensor([[0.0, -math.inf, 0.0]], dtype=D, requires_grad=True)
    kl = R.reverse_kl(zs, zt)
    kl.sum().backward()
    assert kl.item() == pytest.approx(0.0, abs=1e-15)
    assert torch.isfinite(zs.grad).all()


def test_sampled_gradient_formula():
    zs, zt = rand(5, 9).requires_grad_(), rand(5, 9, seed=1)
    y = torch.tensor([0, 3, 8, 2, 2])
    tau = 0.7
    (grad,) = torch.autograd.grad(objectives.get("sampled").reference(zs, zt, tokens=y, temperature=tau).sum(), zs)
    r = (R.token_logprobs(zt, y, tau) - R.token_logprobs(zs, y, tau)).detach()
    onehot = torch.nn.functional.one_hot(y, 9).to(D)
    expected = -(r[:, None] / tau) * (onehot - R.log_softmax(zs, tau).exp())
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-10, atol=1e-12)


def test_topk_loss_and_gradient_formula():
    zs, zt = rand(2, 20).requires_grad_(), rand(2, 20, seed=1)
    k, tau = 4, 1.5
    loss = objectives.get("topk").reference(zs, zt, k=k, temperature=tau)
    (grad,) = torch.autograd.grad(loss.sum(), zs)
    for row in range(2):
        support = torch.argsort(zs[row].detach(), descending=True)[:k]
        p_bar = torch.softmax(zs[row, support].detach() / tau, -1)
        q_bar = torch.softmax(zt[row, support] / tau, -1)
        kl = (p_bar * (p_bar.log() - q_bar.log())).sum()
        assert loss[row].item() == pytest.approx(kl.item(), rel=1e-12)
        expected = torch.zeros(20, dtype=D)
        expected[support] = p_bar * (p_bar.log() - q_bar.log() - kl) / tau
        torch.testing.assert_close(grad[row], expected, rtol=1e-10, atol=1e-12)


def test_topk_ids_ties_go_to_lower_id():
    z = torch.tensor([[1.0, 5.0, 5.0, 0.0, 5.0]], dtype=D)
    assert R.topk_ids(z, 2).tolist() == [[1, 2]]
    assert R.topk_ids(z, 4).tolist() == [[1, 2, 4, 0]]


def test_topk_overlap_by_hand():
    # Student top-2 = {0, 1}; teacher top-2 = {1, 2}: shared {1}.
    zs = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=D)
    zt = torch.tensor([[0.0, 2.0, 3.0, 1.0]], dtype=D)
    s = R.topk_overlap(zs, zt, k=2)
    p, q = torch.softmax(zs, -1)[0], torch.softmax(zt, -1)[0]
    assert s.overlap.item() == 0.5
    assert s.student_mass.item() == pytest.approx(p[1].item())
    assert s.teacher_mass.item() == pytest.approx(q[1].item())
    assert s.overlap_advantage.item() == pytest.approx(0.0, abs=1e-15)  # one shared id: p̄ = q̄ = 1
    h = lambda d: -(d * d.log()).sum().item()
    assert s.student_entropy.item() == pytest.approx(h(p))
    assert s.entropy_gap.item() == pytest.approx(abs(h(q) - h(p)))


def test_overlap_advantage_is_nan_when_disjoint_and_summary_skips_it():
    zs = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]], dtype=D)
    zt = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 2.0, 1.0]], dtype=D)
    s = R.topk_overlap(zs, zt, k=2)
    assert math.isnan(s.overlap_advantage[0].item()) and not math.isnan(s.overlap_advantage[1].item())
    summary = s.summary()
    assert summary["overlap"] == pytest.approx(0.25)
    assert summary["overlap_advantage"] == pytest.approx(s.overlap_advantage[1].item())
    assert summary["empty_overlap_fraction"] == 0.5


def test_opd_loss_mask_drops_positions_even_with_infinities():
    zs = rand(3, 6).requires_grad_()
    zt = rand(3, 6, seed=1)
    zt[1, :] = -math.inf  # garbage in an uncounted position
    mask = torch.tensor([True, False, True])
    loss = R.opd_loss(zs, zt, "full", mask=mask)
    loss.backward()
    expected = R.reverse_kl(zs[[0, 2]], zt[[0, 2]]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.isfinite(zs.grad).all() and (zs.grad[1] == 0).all()


def test_reduce_all_masked_is_zero_mean():
    v = torch.ones(4, dtype=D, requires_grad=True)
    out = R.reduce(v, torch.zeros(4, dtype=torch.bool), "mean")
    out.backward()
    assert out.item() == 0.0 and (v.grad == 0).all()


@pytest.mark.parametrize("seed", range(40))
def test_topk_ids_equals_a_stable_sort(seed):
    # integer-valued logits make ties common (the exact path); Gaussian ones make them rare
    g = torch.Generator().manual_seed(seed)
    vocab = int(torch.randint(1, 40, (1,), generator=g))
    k = int(torch.randint(1, vocab + 1, (1,), generator=g))
    z = (torch.randint(-3, 3, (2, 3, vocab), generator=g).to(D) if seed % 2
         else torch.randn(2, 3, vocab, generator=g, dtype=D))
    if seed % 3 == 0:
        z[0, 0] = -math.inf
    expected = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]
    assert torch.equal(R.topk_ids(z, k), expected)


def test_softcapped_value_and_derivative():
    z = rand(3, 8, scale=40.0).requires_grad_()
    capped = R.softcapped(z, 30.0)
    torch.testing.assert_close(capped, 30.0 * torch.tanh(z / 30.0))
    assert capped.abs().max() < 30.0 and R.softcapped(z, None) is z
    (grad,) = torch.autograd.grad(capped.sum(), z)
    torch.testing.assert_close(grad, 1 - torch.tanh(z.detach() / 30.0) ** 2)


@pytest.mark.parametrize("objective", ["full", "sampled", "topk", "forward_kl", "jsd", "topk_pg"])
def test_opd_loss_softcaps_each_model_before_the_temperature(objective):
    zs, zt = rand(4, 9, scale=20.0), rand(4, 9, seed=1, scale=20.0)
    y = torch.tensor([0, 3, 8, 2])
    capped = R.opd_loss(zs, zt, objective, y, 3, None, 0.7, student_softcap=5.0, teacher_softcap=8.0)
    expected = R.opd_loss(R.softcapped(zs, 5.0), R.softcapped(zt, 8.0), objective, y, 3, None, 0.7)
    torch.testing.assert_close(capped, expected, rtol=1e-12, atol=1e-12)
    assert capped.item() != pytest.approx(R.opd_loss(zs, zt, objective, y, 3, None, 0.7).item())


def test_linear_logits_bias_and_vocab_size():
    h, w, b = rand(2, 4), rand(7, 4, seed=1), rand(7, seed=2)
    torch.testing.assert_close(R.linear_logits(h, w, 5, b), (h @ w.T + b)[:, :5])
    torch.testing.assert_close(R.linear_logits(h, w), h @ w.T)


def test_topk_overlap_reverse_kl_and_token_logprobs():
    zs, zt = rand(3, 9), rand(3, 9, seed=1)
    y = torch.tensor([0, 4, 8])
    s = R.topk_overlap(zs, zt, k=3, temperature=0.5, tokens=y)
    torch.testing.assert_close(s.reverse_kl, R.reverse_kl(zs, zt, 0.5))
    torch.testing.assert_close(s.student_logprob, R.token_logprobs(zs, y, 0.5))
    torch.testing.assert_close(s.teacher_logprob, R.token_logprobs(zt, y, 0.5))
    assert R.topk_overlap(zs, zt, k=3).student_logprob is None
