"""Fused-linear Triton kernels (interpreted on CPU) against the reference on float64 logits.

Values and gradients w.r.t. the student's hidden states and weight: fp32 to ~1e-5 relative;
fp16 no worse than PyTorch's own fp16 computation plus a small tolerance (the interpreter's
tl.dot is wrong on bf16, so bf16 is left to the GPU).
"""
import sys

import pytest
import torch

import opd_kernels
from opd_kernels import objectives, reference
from opd_kernels.backends import triton_fused, triton_fused_grad
from opd_kernels.backends.triton_fused_grad import Side

RTOL_FP32 = 2e-5


def _inputs(n, vocab, hs, ht=None, teacher_vocab=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)
    ht = ht or hs
    return dict(
        student_hidden=make(n, hs), student_weight=make(vocab, hs, scale=3 / hs**0.5),
        teacher_hidden=make(n, ht), teacher_weight=make(teacher_vocab or vocab, ht, scale=3 / ht**0.5),
        tokens=torch.randint(0, min(vocab, teacher_vocab or vocab), (n,), generator=g),
        upstream=torch.randn(n, generator=g, dtype=torch.float64),
    )


def _run(fn, hidden, weight, upstream, dtype=None):
    """Value and grads of sum(upstream * fn(h, w)) with h, w cast to ``dtype``."""
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    value = fn(h, w)
    (value.double() * upstream).sum().backward()
    return value.detach().double(), h.grad.double(), w.grad.double()


def _assert_fp32(ours, truth):
    for name, a, b in zip(("value", "grad_hidden", "grad_weight"), ours, truth):
        scale = b.abs().max().clamp(min=1e-12)
        err = ((a - b).abs().max() / scale).item()
        assert err <= RTOL_FP32, f"{name}: max error {err:.2e} of the largest magnitude"
        assert torch.isfinite(a).all(), name


def _assert_like_torch_fp16(ours, torch16, truth):
    """|ours - gt| <= |torch_fp16 - gt| + tol, elementwise (the Cut Cross-Entropy rule)."""
    for name, a, t, b in zip(("value", "grad_hidden", "grad_weight"), ours, torch16, truth):
        tol = 2e-3 * b.abs().max()
        excess = ((a - b).abs() - (t - b).abs() - tol).max().item()
        assert excess <= 0, f"{name}: worse than torch fp16 by {excess:.2e}"


def _check(ours_fn, ref_fn, x, dtype):
    """ours_fn runs the kernels; ref_fn the reference (used in float64 and in ``dtype``)."""
    hs, ws, up = x["student_hidden"], x["student_weight"], x["upstream"]
    ours = _run(ours_fn, hs, ws, up)
    truth = _run(ref_fn, hs, ws, up, torch.float64)
    if dtype == torch.float32:
        _assert_fp32(ours, truth)
    else:
        _assert_like_torch_fp16(ours, _run(ref_fn, hs, ws, up), truth)
    return ours, truth


@pytest.mark.parametrize("n,vocab,hidden,tau,dtype", [
    (1, 1000, 127, 1.0, torch.float32),
    (7, 1000, 64, 0.5, torch.float32),
    (3, 50257, 32, 2.0, torch.float32),
    (5, 1000, 127, 1.0, torch.float16),
])
def test_logsumexp_and_token_logprobs(n, vocab, hidden, tau, dtype):
    x = _inputs(n, vocab, hidden, dtype=dtype)
    y = x["tokens"]
    _check(lambda h, w: opd_kernels.fused_linear_logsumexp(h, w, temperature=tau, backend="triton"),
           lambda h, w: reference.logsumexp(reference.linear_logits(h, w), tau), x, dtype)
    _check(lambda h, w: opd_kernels.fused_linear_token_logprobs(h, w, y, temperature=tau, backend="triton"),
           lambda h, w: reference.token_logprobs(reference.linear_logits(h, w), y, tau), x, dtype)


def _mask(kind, n):
    if kind == "none":
        return None
    if kind == "all":
        return torch.zeros(n, dtype=torch.bool)
    return torch.arange(n) % 3 != 1


def _loss_pair(x, objective, k, mask, tau, vocab_size, lead=None):
    """(ours, reference) per-position loss functions of the student's (h, W)."""
    ht, wt, y = x["teacher_hidden"], x["teacher_weight"], x["tokens"]
    reshape = (lambda t: t.reshape(*lead, t.shape[-1])) if lead else (lambda t: t)
    ours = lambda h, w: opd_kernels.fused_linear_opd_loss(
        reshape(h), w, reshape(ht), wt, objective=objective, tokens=y.reshape(lead or y.shape),
        k=k, mask=None if mask is None else mask.reshape(lead or mask.shape), temperature=tau,
        reduction="none", vocab_size=vocab_size, backend="triton").reshape(-1)
    ref = lambda h, w: reference.opd_loss(
        reference.linear_logits(h, w, vocab_size), reference.linear_logits(ht.to(h.dtype), wt.to(h.dtype), vocab_size),
        objective, tokens=y, k=k, mask=mask, temperature=tau, reduction="none")
    return ours, ref


@pytest.mark.parametrize("objective", ["full", "sampled"])
@pytest.mark.parametrize("n,vocab,teacher_vocab,vocab_size,hs,ht,mask,tau,dtype", [
    (1, 1000, 1000, None, 127, 127, "none", 1.0, torch.float32),
    (9, 1000, 1024, 900, 64, 96, "some", 0.5, torch.float32),
    (4, 50257, 50257, None, 32, 48, "some", 2.0, torch.float32),
    (6, 1000, 1000, None, 127, 64, "all", 1.0, torch.float32),
    (6, 1000, 1000, None, 64, 127, "some", 1.0, torch.float16),
])
def test_dense_objectives(objective, n, vocab, teacher_vocab, vocab_size, hs, ht, mask, tau, dtype):
    x = _inputs(n, vocab, hs, ht, teacher_vocab, dtype)
    x["tokens"] %= vocab_size or vocab
    m = _mask(mask, n)
    ours, ref = _loss_pair(x, objective, 4, m, tau, vocab_size)
    (value, grad_h, grad_w), _ = _check(ours, ref, x, dtype)
    if mask == "all":
        assert value.abs().max() == 0 and grad_h.abs().max() == 0 and grad_w.abs().max() == 0
    if vocab_size is not None:  # ids past vocab_size are outside both distributions
        assert grad_w[vocab_size:].abs().max() == 0


@pytest.mark.parametrize("n,vocab,hs,ht,k,mask,tau,dtype", [
    (1, 1000, 127, 64, 1, "none", 1.0, torch.float32),
    (5, 1000, 64, 96, 16, "some", 0.5, torch.float32),
    (1, 300, 32, 32, 64, "none", 2.0, torch.float32),
    (4, 1000, 64, 127, 4, "some", 1.0, torch.float16),
])
def test_topk_objective(n, vocab, hs, ht, k, mask, tau, dtype):
    x = _inputs(n, vocab, hs, ht, dtype=dtype)
    ours, ref = _loss_pair(x, "topk", k, _mask(mask, n), tau, None)
    (_, _, grad_w), _ = _check(ours, ref, x, dtype)
    # the backward is k-sparse: at most n*k rows of dW are touched
    assert int((grad_w.abs().sum(-1) > 0).sum()) <= n * k


def test_topk_objective_never_runs_a_teacher_lm_head_pass(monkeypatch):
    """The teacher is read only through the k-row gather: its weight never reaches a tile pass."""
    x = _inputs(4, 1000, 32)
    passes = []
    row_stats = triton_fused._row_stats
    monkeypatch.setattr(triton_fused, "_row_stats",
                        lambda side, *a, **kw: passes.append(side.weight) or row_stats(side, *a, **kw))
    monkeypatch.setattr(triton_fused, "_pair_pass", lambda *a, **kw: pytest.fail("a pair pass ran"))
    for grad_in_forward in (True, False):
        h = x["student_hidden"].clone().requires_grad_()
        opd_kernels.fused_linear_opd_loss(h, x["student_weight"], x["teacher_hidden"],
                                          x["teacher_weight"], objective="topk", k=4,
                                          grad_in_forward=grad_in_forward, backend="triton").backward()
    assert [w.data_ptr() for w in passes] == [x["student_weight"].data_ptr()] * 2


def _assert_stats_close(ours, truth, mask):
    for name, a in ours.tensors().items():
        b = getattr(truth, name).float()
        if mask is not None:
            assert torch.isnan(a[~mask]).all(), name
            a, b = a[mask], b[mask]
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        ok = ~torch.isnan(b)
        torch.testing.assert_close(a[ok], b[ok], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("n,vocab,hs,ht,k,mask,tau", [
    (4, 1000, 64, 96, 16, "some", 1.0),
    (2, 1000, 127, 32, 4, "none", 0.5),
])
def test_topk_overlap(n, vocab, hs, ht, k, mask, tau):
    x = _inputs(n, vocab, hs, ht, seed=3)
    m = _mask(mask, n)
    ours = opd_kernels.fused_linear_topk_overlap(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], k=k,
        mask=m, temperature=tau, backend="triton")
    truth = reference.topk_overlap(
        reference.linear_logits(x["student_hidden"].double(), x["student_weight"].double()),
        reference.linear_logits(x["teacher_hidden"].double(), x["teacher_weight"].double()), k, tau)
    _assert_stats_close(ours, truth, m)


def test_overlap_advantage_is_nan_where_the_top_sets_are_disjoint():
    """Teacher = negated student logits: with k=2 of 1000 ids the top sets cannot meet."""
    x = _inputs(2, 1000, 32)
    stats = opd_kernels.fused_linear_topk_overlap(
        x["student_hidden"], x["student_weight"], -x["student_hidden"], x["student_weight"], k=2,
        backend="triton")
    assert (stats.overlap == 0).all() and torch.isnan(stats.overlap_advantage).all()
    assert (stats.student_mass == 0).all()


@pytest.mark.parametrize("objective", ["full", "sampled", "topk"])
def test_return_stats_matches_reference(objective):
    x = _inputs(4, 600, 64, 32, seed=5)
    m = _mask("some", 4)
    loss, stats = opd_kernels.fused_linear_opd_loss(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"],
        objective=objective, tokens=x["tokens"], k=4, mask=m, return_stats=True, backend="triton")
    s64 = reference.linear_logits(x["student_hidden"].double(), x["student_weight"].double())
    t64 = reference.linear_logits(x["teacher_hidden"].double(), x["teacher_weight"].double())
    expected = reference.opd_loss(s64, t64, objective, tokens=x["tokens"], k=4, mask=m)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-7)
    truth = reference.topk_overlap(s64, t64, 4, tokens=x["tokens"])
    _assert_stats_close(stats, truth, m)
    # the statistics always carry the full reverse KL (for "topk" the pair pass runs for it)
    assert stats.reverse_kl is not None
    assert stats.student_logprob is not None and stats.teacher_logprob is not None


def test_leading_dims_and_mean_reduction():
    x = _inputs(6, 1000, 32, 48, seed=7)
    m = _mask("some", 6)
    kw = dict(objective="full", mask=m.reshape(2, 3), backend="triton")
    h = x["student_hidden"].clone().requires_grad_()
    loss = opd_kernels.fused_linear_opd_loss(h.reshape(2, 3, 32), x["student_weight"],
                                             x["teacher_hidden"].reshape(2, 3, 48), x["teacher_weight"], **kw)
    loss.backward()
    h64 = x["student_hidden"].double().requires_grad_()
    expected = reference.opd_loss(reference.linear_logits(h64, x["student_weight"].double()),
                                  reference.linear_logits(x["teacher_hidden"].double(),
                                                          x["teacher_weight"].double()),
                                  "full", mask=m)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-5, atol=0)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-7)


def test_vocab_splits_merge_and_backward_chunks(monkeypatch):
    """Partials from many vocabulary splits merge to the single-split result (the single-model,
    pair and mixture passes), and a backward cut into several token chunks gives the one-chunk
    gradients."""
    x = _inputs(40, 3000, 32, seed=11)
    h, w = x["student_hidden"], x["student_weight"]
    ht, wt = x["teacher_hidden"], x["teacher_weight"]
    s, t = Side(h, w, None, 0.0), Side(ht, wt, None, 0.0)
    z = reference.linear_logits(h.double(), w.double())
    z_t = reference.linear_logits(ht.double(), wt.double())
    truth = reference.pass_results(z, z_t, frozenset(objectives.Need), beta=0.3)
    for splits in (1, 3, 6):
        k = 8 if splits == 3 else 0  # the top-k merge is slow in the interpreter: once is enough
        st = triton_fused._row_stats(Side(h[:4], w, None, 0.0) if k else s, 3000, 1.0,
                                     entropy=True, k=k, splits=splits)
        rows = z[:4] if k else z
        torch.testing.assert_close(st.lse.double(), reference.logsumexp(rows), rtol=1e-6, atol=0)
        torch.testing.assert_close(st.entropy.double(), reference.entropy(rows), rtol=1e-4, atol=1e-5)
        if k:
            assert torch.equal(st.topk_ids, reference.topk_ids(rows, k))
        lse_s, lse_t, rkl, fkl = triton_fused._pair_pass(s, t, 3000, 1.0, splits=splits)
        j_p, j_q = triton_fused._mixture_pass(s, t, lse_s, lse_t, 3000, 1.0, 0.3, splits=splits)
        for name, ours in dict(lse_s=lse_s, lse_t=lse_t, reverse_kl=rkl, forward_kl=fkl,
                               mixture_student=j_p, mixture_teacher=j_q).items():
            torch.testing.assert_close(ours.double(), getattr(truth, name), rtol=1e-5, atol=1e-6,
                                       msg=f"{name}, {splits} splits")
    ours, ref = _loss_pair(x, "full", 1, None, 1.0, None)
    one_chunk = _run(ours, h, w, x["upstream"])
    monkeypatch.setattr(triton_fused, "SCRATCH_BYTES", 16 * 1000 * 4)  # 16-row chunks
    _assert_fp32(_run(ours, h, w, x["upstream"]), _run(ref, h, w, x["upstream"], torch.float64))
    for a, b in zip(_run(ours, h, w, x["upstream"]), one_chunk):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_teacher_gets_no_gradient_and_frozen_weight_is_skipped():
    x = _inputs(4, 1000, 32)
    ht = x["teacher_hidden"].clone().requires_grad_()
    wt = x["teacher_weight"].clone().requires_grad_()
    hs = x["student_hidden"].clone().requires_grad_()
    for objective in ("full", "topk"):
        loss = opd_kernels.fused_linear_opd_loss(hs, x["student_weight"], ht, wt, objective=objective,
                                                 k=4, backend="triton")
        loss.backward()
        assert ht.grad is None and wt.grad is None and hs.grad is not None
        hs.grad = None


def test_weight_grad_dtype_is_the_weights():
    x = _inputs(4, 1000, 32, dtype=torch.float16)
    w = x["student_weight"].clone().requires_grad_()
    for objective in ("sampled", "topk", "topk_pg"):
        loss = opd_kernels.fused_linear_opd_loss(
            x["student_hidden"], w, x["teacher_hidden"], x["teacher_weight"], objective=objective,
            tokens=x["tokens"], k=4, weight_grad_dtype=torch.float32, backend="triton")
        loss.backward()
        assert w.grad.dtype == torch.float16 and torch.isfinite(w.grad).all()
        w.grad = None


def test_topk_weight_gradient_sums_long_runs_of_one_id():
    """40 near-identical rows share their top-k ids: each id's run (40 entries) spans two blocks
    of the sorted-run sum, and dW still equals the reference."""
    x = _inputs(40, 500, 32, seed=13)
    g = torch.Generator().manual_seed(1)
    x["student_hidden"] = x["student_hidden"][:1] * 3 + 0.01 * torch.randn(40, 32, generator=g)
    ours, ref = _loss_pair(x, "topk", 4, None, 1.0, None)
    ids = reference.topk_ids(reference.linear_logits(x["student_hidden"].double(),
                                                     x["student_weight"].double()), 4)
    assert (ids == ids[:1]).all()
    _check(ours, ref, x, torch.float32)


@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("objective", ["full", "sampled", "topk"])
def test_empty_batch(objective, grad_in_forward):
    """N = 0 positions: zero values and zero gradients, as the logits backend gives."""
    x = _inputs(0, 50, 16, 24)
    h = x["student_hidden"].requires_grad_()
    w = x["student_weight"].requires_grad_()
    loss, stats = opd_kernels.fused_linear_opd_loss(
        h, w, x["teacher_hidden"], x["teacher_weight"], objective=objective, tokens=x["tokens"],
        k=4, return_stats=True, grad_in_forward=grad_in_forward, backend="triton")
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == (0, 16) and (w.grad == 0).all()
    assert stats.overlap.shape == (0,)
    assert opd_kernels.fused_linear_logsumexp(h, w, backend="triton").shape == (0,)
    assert opd_kernels.fused_linear_token_logprobs(h, w, x["tokens"], backend="triton").shape == (0,)


def test_backward_frees_its_chunk_scratch_before_the_weight_cast(monkeypatch):
    """The dL/du scratch ([chunk, K], up to SCRATCH_BYTES) is gone when the fp32 dW accumulator is
    cast to the weight's dtype, so the two allocations do not add up at the backward's peak."""
    vocab = 300
    x = _inputs(5, vocab, 16, dtype=torch.float16)
    cast = triton_fused_grad.finish
    alive, casts = [], []

    def checked_cast(grad, like):
        caller = sys._getframe(1).f_locals  # the function that calls the cast
        casts.append(grad)
        alive.extend(name for name, v in caller.items()
                     if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == vocab)
        return cast(grad, like)

    monkeypatch.setattr(triton_fused_grad, "finish", checked_cast)
    for reduction in ("none", "mean"):  # recomputed in the backward; computed in the forward
        h = x["student_hidden"].clone().requires_grad_()
        w = x["student_weight"].clone().requires_grad_()
        loss = opd_kernels.fused_linear_opd_loss(h, w, x["teacher_hidden"], x["teacher_weight"],
                                                 objective="full", reduction=reduction,
                                                 backend="triton")
        loss.sum().backward()
        assert w.grad is not None and not alive, (reduction, alive)
    assert len(casts) == 4  # dW and db (None) of each path


def test_fp32_matmuls_of_either_model_use_ieee_precision():
    from opd_kernels.kernels.fused_linear_tile import dot_precision

    rule = dot_precision("student", "teacher")
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert rule({"student": bf16, "teacher": fp32}) == "ieee"
    assert rule({"student": fp32, "teacher": None}) == "ieee"
    assert rule({"student": bf16, "teacher": bf16}) == "tf32"  # no effect on 16-bit inputs
