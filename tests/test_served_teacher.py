"""A served (sparse) teacher: the losses and statistics from its top-K answer alone, on every
backend and both student forms, against the float64 reference on the dense teacher the answer
was taken from (its top-K log-probs at the loss temperature, the actual tokens' log-probs, and
its log-probs at the student's top-k ids)."""
import math

import pytest
import torch

import opd_kernels as O
from opd_kernels import objectives
from opd_kernels import reference as R

N, V, H, K, k, TAU = 6, 300, 32, 20, 8, 0.7
SERVED = objectives.names("served")
BACKENDS = ["torch", "triton", "cpp"]


def _world(seed=0, cap=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    t[0, 50:] -= 25.0                          # a teacher nearly sure to stay in the first 50 ids
    student = R.softcapped(R.linear_logits(h, w, None, b), cap)
    t[1] = student[1] * 1.3                    # a row where both agree: a large overlap
    y = torch.randint(0, 50, (N,), generator=g)
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    log_q = torch.log_softmax(t / TAU, -1)
    ids = R.topk_ids(t, K)
    perm = torch.randperm(K, generator=g)      # servers need not sort their answer
    answer = dict(teacher_ids=ids[:, perm], teacher_logprobs=log_q.gather(-1, ids)[:, perm].float(),
                  teacher_token_logprob=log_q.gather(-1, y[:, None])[:, 0].float(),
                  teacher_logprobs_at=log_q.gather(-1, R.topk_ids(student, k)).float())
    return dict(h=h, w=w, b=b, t=t, y=y, mask=mask, answer=answer, student=student)


def _oracle(x, world, objective, cap):
    return R.opd_loss(x, world["t"], objective, tokens=world["y"],
                      k=K if objective.startswith("teacher") else k, mask=world["mask"],
                      temperature=TAU, reduction="none", student_softcap=cap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", SERVED)
@pytest.mark.parametrize("cap", [None, 4.0])
def test_logits_form(backend, objective, cap):
    world = _world(1)
    s = R.linear_logits(world["h"], world["w"], None, world["b"])
    up = torch.rand(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    x = s.clone().requires_grad_()
    (_oracle(x, world, objective, cap) * up).sum().backward()
    expected = _oracle(s, world, objective, cap)
    xf = s.float().requires_grad_()
    ours = O.sparse_teacher_opd_loss(xf, **world["answer"], objective=objective, tokens=world["y"],
                                     k=k, mask=world["mask"], temperature=TAU, reduction="none",
                                     student_softcap=cap, backend=backend)
    (ours * up.float()).sum().backward()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(xf.grad.double(), x.grad, rtol=1e-5, atol=1e-5)
    assert (xf.grad[~world["mask"]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", SERVED)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fused_linear_form_with_bias_and_softcap(backend, objective, reduction):
    cap = 4.0
    world = _world(3, cap)
    leaves = [world[n].clone().requires_grad_() for n in ("h", "w", "b")]
    ref = _oracle(R.linear_logits(*leaves[:2], None, leaves[2]), world, objective, cap)
    R.reduce(ref, world["mask"], reduction).sum().backward()
    ours_leaves = [world[n].float().requires_grad_() for n in ("h", "w", "b")]
    ours = O.fused_linear_sparse_teacher_opd_loss(
        ours_leaves[0], ours_leaves[1], **world["answer"], objective=objective, tokens=world["y"],
        k=k, mask=world["mask"], temperature=TAU, reduction=reduction, student_bias=ours_leaves[2],
        student_softcap=cap, backend=backend)
    ours.sum().backward()
    torch.testing.assert_close(ours.double(), R.reduce(ref.detach(), world["mask"], reduction),
                               rtol=1e-5, atol=2e-5)
    for mine, truth in zip(ours_leaves, leaves):
        torch.testing.assert_close(mine.grad.double(), truth.grad, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["logits", "fused_linear"])
def test_statistics_exact_and_the_teacher_entropy_a_lower_bound(backend, form):
    world = _world(4)
    s = R.linear_logits(world["h"], world["w"], None, world["b"])
    if form == "logits":
        _, stats = O.sparse_teacher_opd_loss(s.float(), **world["answer"], tokens=world["y"], k=k,
                                             mask=world["mask"], temperature=TAU,
                                             return_stats=True, backend=backend)
    else:
        _, stats = O.fused_linear_sparse_teacher_opd_loss(
            world["h"].float(), world["w"].float(), **world["answer"], tokens=world["y"], k=k,
            mask=world["mask"], temperature=TAU, return_stats=True,
            student_bias=world["b"].float(), backend=backend)
    truth = R.topk_overlap(s, world["t"], k, TAU, tokens=world["y"])
    m = world["mask"]
    for name in ("overlap", "student_mass", "teacher_mass", "overlap_advantage",
                 "student_entropy", "student_logprob", "teacher_logprob"):
        torch.testing.assert_close(getattr(stats, name)[m].double(), getattr(truth, name)[m],
                                   rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
        assert torch.isnan(getattr(stats, name)[~m]).all(), name
    assert stats.teacher_entropy_is_bound and stats.reverse_kl is None
    assert (stats.teacher_entropy[m].double() <= truth.teacher_entropy[m] + 1e-6).all()
    assert (stats.overlap[m] > 0.5).any()   # the agreeing row: a real overlap is compared
    summary = stats.summary()
    assert "teacher_entropy" not in summary and "teacher_entropy_lower_bound" in summary


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_topk_ids_both_forms_ties_to_the_lower_id(backend):
    world = _world(5)
    s = torch.round(R.linear_logits(world["h"], world["w"], None, world["b"]))  # many ties
    assert torch.equal(O.student_topk_ids(s.float(), k=k, backend=backend), R.topk_ids(s, k))
    ids = O.fused_linear_student_topk_ids(world["h"].float(), world["w"].float(), k=k,
                                          bias=world["b"].float(), backend=backend)
    z = R.linear_logits(world["h"].float(), world["w"].float(), None, world["b"].float())
    assert torch.equal(ids, R.topk_ids(z.double(), k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncounted_positions_may_hold_anything_and_empty_batches(backend):
    world = _world(6)
    answer = dict(world["answer"])
    garbage = ~world["mask"]
    answer["teacher_ids"] = answer["teacher_ids"].masked_fill(garbage[:, None], -1)
    answer["teacher_logprobs"] = answer["teacher_logprobs"].masked_fill(garbage[:, None], math.nan)
    s = R.linear_logits(world["h"], world["w"], None, world["b"]).float()
    loss = O.sparse_teacher_opd_loss(s, **answer, tokens=world["y"], k=k, mask=world["mask"],
                                     temperature=TAU, backend=backend)
    assert torch.isfinite(loss)
    empty = O.sparse_teacher_opd_loss(torch.zeros(0, V), torch.zeros(0, K, dtype=torch.long),
                                      torch.zeros(0, K), reduction="none", backend=backend)
    assert empty.shape == (0,)


def _bad(**change):
    world = _world(7)
    answer = {**world["answer"], **change}
    s = R.linear_logits(world["h"], world["w"], None, world["b"]).float()
    return lambda **kw: O.sparse_teacher_opd_loss(s, **{**answer, **kw.pop("answer", {})},
                                                  tokens=world["y"], **kw)


def test_bad_answers_raise_naming_the_problem():
    world = _world(7)
    ids, lps = world["answer"]["teacher_ids"], world["answer"]["teacher_logprobs"]
    cases = {
        "teacher_logprobs shape": _bad(teacher_logprobs=lps[:, :-1]),
        "outside the vocabulary": _bad(teacher_ids=ids.masked_fill(ids == ids[0, 0], V)),
        "repeats an id": _bad(teacher_ids=torch.cat([ids[:, :1], ids[:, :-1]], -1)),
        "NaN or a value above 0": _bad(teacher_logprobs=lps.clone().fill_(0.1)),
        "exceeds 1": _bad(teacher_logprobs=torch.full_like(lps, math.log(0.9))),
    }
    for message, call in cases.items():
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="teacher_logprobs_at"):
        _bad(teacher_logprobs_at=None)(objective="topk")
    with pytest.raises(ValueError, match="teacher_token_logprob"):
        _bad(teacher_token_logprob=None)(objective="sampled")
    with pytest.raises(ValueError, match="a served teacher does not give"):
        _bad()(objective="full")
    with pytest.raises(ValueError, match="k=32 > K=20"):
        _bad()(k=32, return_stats=True)
    with pytest.raises(TypeError, match="teacher_ids must be an integer tensor"):
        _bad(teacher_ids=ids.float())()
    s = R.linear_logits(world["h"], world["w"], None, world["b"]).float()
    with pytest.raises(ValueError, match="teacher_topk.*needs the teacher's own top-K"):
        O.opd_loss(s, world["t"].float(), objective="teacher_topk")
