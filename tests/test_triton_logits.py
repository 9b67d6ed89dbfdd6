"""The logits-form kernels through the public API, on each backend that has them (the Triton
kernels, opd_kernels.backends.triton_logits, and the native CPU ones, cpp_logits), against the
float64 reference: fp32 values and gradients within 1e-5 of the largest reference magnitude, or
within twice PyTorch's own fp32 error where that is larger (a peaked row's gradient is a small
difference of O(x) terms, so fp32 itself cannot do 1e-5 of it); fp16 no worse than PyTorch's
own fp16 computation plus a small tolerance.
The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py); shapes stay
small."""
import pytest
import torch

import opd_kernels
from opd_kernels import objectives, reference
from opd_kernels.backends import triton_logits

RTOL = 1e-5
ON = {}  # the keyword choosing the backend under test (set by the ``kernels`` fixture)


@pytest.fixture(autouse=True, params=["triton", "cpp"])
def kernels(request):
    ON["backend"] = request.param
    return request.param

# Every registered objective, the JSD at both ends and inside (its mixture pass).
OBJECTIVE_CASES = [(name, {"beta": beta}) for name in objectives.names() if name == "jsd"
                   for beta in (0.0, 0.3, 1.0)] + [(name, {}) for name in objectives.names()
                                                   if name != "jsd"]
CASE_IDS = [name + "".join(f"-{k}{v}" for k, v in params.items()) for name, params in OBJECTIVE_CASES]


def _per_position(objective, tokens=None, **options):
    """The float64 oracle of one objective per position (no mask, reduction none)."""
    return lambda x, t: reference.opd_loss(x, t.to(x.dtype), objective, tokens=tokens,
                                           reduction="none", **options)


def _logits(*shape, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _close(actual, expected, rtol=RTOL, floor=0.0):
    """|actual - expected| <= max(rtol * max|expected|, floor) elementwise (NaN, inf must match)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    finite = torch.isfinite(expected)
    infinite = torch.isinf(expected)
    assert torch.equal(actual[infinite], expected[infinite])
    if finite.any():
        scale = expected[finite].abs().max().clamp(min=1e-30)
        err = (actual[finite] - expected[finite]).abs().max()
        assert err <= max(rtol * scale, floor), f"max error {err:.3e} > {rtol:g} * {scale:.3e}"


def _grad(loss_fn, *inputs, upstream=None):
    """Gradients of sum(upstream * loss_fn(*inputs)) w.r.t. the first input (a leaf copy)."""
    leaf = inputs[0].detach().clone().requires_grad_(True)
    out = loss_fn(leaf, *inputs[1:])
    weights = torch.ones_like(out) if upstream is None else upstream.to(out.dtype)
    (out * weights).sum().backward()
    return out.detach(), leaf.grad


def _max_error(low, ref):
    finite = torch.isfinite(ref)
    return 2 * (low.double() - ref)[finite].abs().max().item() if finite.any() else 0.0


def _check(ours, ref, x, upstream=None):
    """ours(x) against ref(x) in float64 (values and gradients); ref(x) in x's own dtype sets
    the floor of the tolerance (see the module docstring)."""
    value, grad = _grad(ours, x, upstream=upstream)
    ref_value, ref_grad = _grad(ref, x.double(), upstream=upstream)
    low_value, low_grad = _grad(ref, x, upstream=upstream)
    grad_floor = _max_error(low_grad, ref_grad)
    value_floor = _max_error(low_value, ref_value)
    assert value.dtype == torch.float32
    _close(value, ref_value, floor=value_floor)
    _close(grad, ref_grad, floor=grad_floor)
    return value, grad


def _upstream(shape, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64) + 0.5


@pytest.fixture
def split_rows(monkeypatch):
    """Force the small-N path: 128-wide blocks, every row split across 3 programs."""
    monkeypatch.setattr(triton_logits, "_FORWARD_BLOCK_V", 128)
    monkeypatch.setattr(triton_logits, "BACKWARD_BLOCK_V", 128)
    monkeypatch.setattr(triton_logits, "vocab_splits",
                        lambda n_rows, n_blocks, device: min(3, n_blocks))


# ---- logsumexp, token log-probs --------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 1000)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_logsumexp_and_token_logprobs(shape, temperature):
    z = _logits(*shape)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(1))
    up = _upstream(shape[:-1])
    _check(lambda x: opd_kernels.logsumexp(x, temperature=temperature, **ON),
           lambda x: reference.logsumexp(x, temperature), z, up)
    _check(lambda x: opd_kernels.token_logprobs(x, tokens, temperature=temperature, **ON),
           lambda x: reference.token_logprobs(x, tokens, temperature), z, up)


def test_logsumexp_split_rows(split_rows):
    z = _logits(2, 1000, seed=3)
    _check(lambda x: opd_kernels.logsumexp(x, **ON), reference.logsumexp, z)


def test_huge_logits_do_not_overflow():
    z = _logits(4, 300, seed=2)
    z[0] += 1e4
    z[1] -= 1e4
    z[2, ::2] = 1e4
    z[3, ::2] = -1e4
    _check(lambda x: opd_kernels.logsumexp(x, temperature=0.5, **ON),
           lambda x: reference.logsumexp(x, 0.5), z)


# ---- reverse KL --------------------------------------------------------------------------------

def _masks(lead, seed=4):
    some = torch.rand(lead, generator=torch.Generator().manual_seed(seed)) > 0.4
    some.view(-1)[0] = True
    return {"none": None, "some": some, "all": torch.zeros(lead, dtype=torch.bool)}


@pytest.mark.parametrize("vocab", [1, 7, 1000])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("mask_kind", ["none", "some", "all"])
def test_reverse_kl(vocab, temperature, mask_kind):
    lead = (2, 3)
    s, t = _logits(*lead, vocab, seed=1), _logits(*lead, vocab, seed=2)
    mask = _masks(lead)[mask_kind]
    if mask is not None:  # uncounted rows are never read: garbage there must not leak
        s = torch.where(mask[..., None], s, torch.full_like(s, float("nan")))
        t = torch.where(mask[..., None], t, torch.full_like(t, float("inf")))
    up = _upstream(lead)
    value, grad = _check(
        lambda x: opd_kernels.reverse_kl(x, t, mask=mask, temperature=temperature,
                                         reduction="none", **ON),
        lambda x: reference.opd_loss(x, t.to(x.dtype), "full", mask=mask, temperature=temperature,
                                     reduction="none"), s, up)
    ref_value = reference.opd_loss(s.double(), t.double(), "full", mask=mask,
                                   temperature=temperature, reduction="none")
    if mask is not None:
        assert (value[~mask] == 0).all() and (grad[~mask] == 0).all()
    for reduction in ("mean", "sum"):
        reduced = opd_kernels.reverse_kl(s, t, mask=mask, temperature=temperature,
                                         reduction=reduction, **ON)
        _close(reduced, reference.reduce(ref_value, mask, reduction))


def test_reverse_kl_split_rows(split_rows):
    s, t = _logits(2, 1000, seed=5), _logits(2, 1000, seed=6)
    _check(lambda x: opd_kernels.reverse_kl(x, t, reduction="none", **ON),
           lambda x: reference.reverse_kl(x, t.to(x.dtype)), s)


def test_reverse_kl_large_vocab():
    s, t = _logits(2, 50257, seed=7), _logits(2, 50257, seed=8)
    _check(lambda x: opd_kernels.reverse_kl(x, t, reduction="none", **ON),
           lambda x: reference.reverse_kl(x, t.to(x.dtype)), s)


def test_reverse_kl_teacher_minus_inf():
    """Teacher -inf where the student is -inf too: a finite KL and gradient. Teacher -inf where
    the student has mass: KL = +inf (documented), never NaN."""
    s, t = _logits(3, 200, seed=9), _logits(3, 200, seed=10)
    s[0, :50] = float("-inf")
    t[0, :50] = float("-inf")
    t[1, 150:] = float("-inf")              # teacher-only -inf where p = 0 is impossible here
    s[1, 150:] = float("-inf")
    s[2, :10] = float("-inf")               # student -inf, teacher finite: term 0
    _check(lambda x: opd_kernels.reverse_kl(x, t, reduction="none", **ON),
           lambda x: reference.reverse_kl(x, t.to(x.dtype)), s)
    t[2, 100] = float("-inf")               # student has mass there
    value = opd_kernels.reverse_kl(s, t, reduction="none", **ON)
    assert value[2] == float("inf") and torch.isfinite(value[:2]).all()


def test_reverse_kl_huge_logits():
    s, t = _logits(4, 300, seed=11), _logits(4, 300, seed=12)
    s[0] += 1e4
    t[0] += 1e4
    s[1] += 1e4                             # same shape, shifted: KL unchanged by the shift
    t[1] -= 1e4
    s[2, ::3] = 1e4
    t[2, ::3] = 1e4
    s[3, ::2] = -1e4
    t[3, 1::2] = -1e4
    _check(lambda x: opd_kernels.reverse_kl(x, t, temperature=0.5, reduction="none", **ON),
           lambda x: reference.reverse_kl(x, t.to(x.dtype), 0.5), s)


def _check_fp16(ours, ref, x):
    """fp16 input: errors against float64 no worse than PyTorch's own fp16 computation's plus
    1e-3 of the reference's magnitude; the gradient comes back in fp16."""
    value, grad = _grad(ours, x)
    ref_value, ref_grad = _grad(ref, x.double())
    torch_value, torch_grad = _grad(ref, x)
    assert grad.dtype == torch.float16
    for got, want, low in ((value, ref_value, torch_value), (grad, ref_grad, torch_grad)):
        ours_err = (got.double() - want).abs().max()
        torch_err = (low.double() - want).abs().max()
        assert ours_err <= torch_err + 1e-3 * want.abs().max(), (ours_err, torch_err)


def test_fp16_no_worse_than_torch(kernels):
    if kernels == "cpp":
        pytest.skip("the native kernels take fp32 and bf16; fp16 on the CPU runs the PyTorch path")
    s = _logits(4, 1000, seed=13, dtype=torch.float16)
    t = _logits(4, 1000, seed=14, dtype=torch.float16)
    tokens = torch.tensor([0, 5, 999, 500])
    _check_fp16(lambda x: opd_kernels.logsumexp(x, **ON), reference.logsumexp, s)
    _check_fp16(lambda x: opd_kernels.token_logprobs(x, tokens, **ON),
                lambda x: reference.token_logprobs(x, tokens), s)
    for objective, params in OBJECTIVE_CASES:
        ref = _per_position(objective, tokens, **params)
        _check_fp16(lambda x: opd_kernels.opd_loss(x, t, objective=objective, tokens=tokens,
                                                   reduction="none", **params, **ON),
                    lambda x: ref(x, t), s)


# ---- top-k statistics --------------------------------------------------------------------------

def _close_stats(stats, ref, mask=None):
    for name, expected in ref.tensors().items():
        actual = getattr(stats, name)
        if mask is not None:
            assert torch.isnan(actual[~mask]).all(), name
            actual, expected = actual[mask], expected[mask]
        _close(actual, expected)


def _tied(*shape, seed):
    """Logits on a coarse grid: many exact ties, so the top-k must break them by the lower id."""
    return torch.round(_logits(*shape, seed=seed, scale=1.5) * 2) / 2


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_topk_overlap(k):
    vocab = 200
    s, t = _tied(6, vocab, seed=15), _tied(6, vocab, seed=16)
    t[1] = s[1]                             # full overlap
    t[2] = -s[2]                            # (near) empty overlap: advantage NaN where empty
    stats = opd_kernels.topk_overlap(s, t, k=k, temperature=0.5, **ON)
    _close_stats(stats, reference.topk_overlap(s.double(), t.double(), k, 0.5))


def test_topk_overlap_k_equals_vocab_and_mask():
    s, t = _tied(2, 3, 7, seed=17), _tied(2, 3, 7, seed=18)
    mask = _masks((2, 3))["some"]
    stats = opd_kernels.topk_overlap(s, t, k=7, mask=mask, **ON)
    ref = reference.topk_overlap(s.double(), t.double(), 7)
    _close_stats(stats, ref, mask)
    assert stats.summary()["overlap"] == pytest.approx(1.0)
    none = opd_kernels.topk_overlap(s, t, k=2, mask=torch.zeros(2, 3, dtype=torch.bool), **ON)
    assert all(torch.isnan(v).all() for v in none.tensors().values())


def test_topk_overlap_split_rows_large_vocab(split_rows):
    s, t = _tied(2, 1000, seed=19), _tied(2, 1000, seed=20)
    stats = opd_kernels.topk_overlap(s, t, k=16, **ON)
    _close_stats(stats, reference.topk_overlap(s.double(), t.double(), 16))


def test_topk_overlap_vocab_50257():
    s, t = _logits(2, 50257, seed=21), _logits(2, 50257, seed=22)
    t[1] = s[1] + 0.1 * t[1]
    stats = opd_kernels.topk_overlap(s, t, k=16, **ON)
    _close_stats(stats, reference.topk_overlap(s.double(), t.double(), 16))


# ---- the objectives ----------------------------------------------------------------------------

@pytest.mark.parametrize("objective,params", OBJECTIVE_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mask_kind", ["none", "some", "all"])
@pytest.mark.parametrize("return_stats", [False, True])
def test_opd_loss(objective, params, mask_kind, return_stats):
    lead, vocab, k, tau = (2, 3), 300, 4, 2.0
    s, t = _tied(*lead, vocab, seed=23), _logits(*lead, vocab, seed=24)
    tokens = torch.randint(0, vocab, lead, generator=torch.Generator().manual_seed(25))
    mask = _masks(lead, seed=26)[mask_kind]
    if mask is not None:
        tokens = torch.where(mask, tokens, torch.full_like(tokens, -100))  # an ignore index
    up = _upstream(lead)

    def ours(x):
        out = opd_kernels.opd_loss(x, t, objective=objective, tokens=tokens, k=k, mask=mask,
                                   temperature=tau, reduction="none", return_stats=return_stats,
                                   **params, **ON)
        if return_stats:
            out, ours.stats = out
        return out

    value, grad = _check(
        ours, lambda x: reference.opd_loss(x, t.to(x.dtype), objective, tokens=tokens, k=k,
                                           mask=mask, temperature=tau, reduction="none", **params),
        s, up)
    if mask is not None:
        assert (value[~mask] == 0).all() and (grad[~mask] == 0).all()
    if return_stats:
        counted_tokens = tokens if mask is None else torch.where(mask, tokens, 0)
        _close_stats(ours.stats, reference.topk_overlap(s.double(), t.double(), k, tau,
                                                        tokens=counted_tokens),
                     mask if mask is not None else None)


@pytest.mark.parametrize("objective,params", OBJECTIVE_CASES, ids=CASE_IDS)
def test_softcap_teacher_inf_and_split_rows(objective, params, split_rows):
    """Soft-capping on either model (Gemma 2: 30; here small caps so it bites), a teacher with
    -inf logits, temperature, and rows split across programs (the mixture pass too)."""
    s, t = _logits(3, 700, seed=60, scale=6.0), _logits(3, 700, seed=61, scale=6.0)
    t[0, :40] = float("-inf")
    tokens = torch.tensor([3, 699, 350])
    caps = dict(student_softcap=4.0, teacher_softcap=7.0)
    ref = _per_position(objective, tokens, k=8, temperature=0.7, **caps, **params)
    _check(lambda x: opd_kernels.opd_loss(x, t, objective=objective, tokens=tokens, k=8,
                                          temperature=0.7, reduction="none", **caps, **params,
                                          **ON),
           lambda x: ref(x, t), s)


def test_softcap_statistics_and_single_model_ops():
    s, t = _logits(4, 300, seed=62, scale=8.0), _logits(4, 300, seed=63, scale=8.0)
    tokens = torch.tensor([0, 1, 2, 299])
    capped = lambda z, c: reference.softcapped(z, c)
    stats = opd_kernels.topk_overlap(s, t, k=8, tokens=tokens, student_softcap=5.0,
                                     teacher_softcap=3.0, **ON)
    _close_stats(stats, reference.topk_overlap(capped(s.double(), 5.0), capped(t.double(), 3.0), 8,
                                               tokens=tokens))
    _check(lambda x: opd_kernels.logsumexp(x, softcap=5.0, **ON),
           lambda x: reference.logsumexp(capped(x, 5.0)), s)
    _check(lambda x: opd_kernels.token_logprobs(x, tokens, softcap=5.0, **ON),
           lambda x: reference.token_logprobs(capped(x, 5.0), tokens), s)


@pytest.mark.parametrize("k", [1, 16, 64])
def test_topk_objective_ties_and_k(k):
    s, t = _tied(3, 100, seed=27), _logits(3, 100, seed=28)
    _, grad = _check(lambda x: opd_kernels.opd_loss(x, t, objective="topk", k=k, reduction="none",
                                                    **ON),
                     lambda x: _per_position("topk", k=k)(x, t), s)
    assert ((grad != 0).sum(-1) <= k).all()  # the gradient lives on the k selected ids


def test_sampled_split_rows_with_stats(split_rows):
    s, t = _logits(2, 1000, seed=29), _logits(2, 1000, seed=30)
    tokens = torch.tensor([3, 999])

    def ours(x):
        loss, ours.stats = opd_kernels.opd_loss(x, t, objective="sampled", tokens=tokens, k=16,
                                                reduction="none", return_stats=True, **ON)
        return loss

    _check(ours, lambda x: _per_position("sampled", tokens)(x, t), s)
    _close_stats(ours.stats, reference.topk_overlap(s.double(), t.double(), 16, tokens=tokens))


def test_strided_rows_and_empty_batch():
    """Row strides other than V (a slice of a wider buffer), a strided mask, and N = 0."""
    wide_s, wide_t = _logits(4, 300, seed=31), _logits(4, 300, seed=32)
    s, t = wide_s[:, :250], wide_t[:, 50:]
    mask = torch.tensor([[True, False], [True, True], [False, True], [True, True]])[:, 1]
    _check(lambda x: opd_kernels.reverse_kl(x, t, mask=mask, reduction="none", **ON),
           lambda x: reference.opd_loss(x, t.to(x.dtype), "full", mask=mask, reduction="none"), s)
    empty = torch.zeros(0, 5, 7)
    assert opd_kernels.reverse_kl(empty, empty, reduction="none", **ON).shape == (0, 5)
    assert opd_kernels.logsumexp(empty, **ON).shape == (0, 5)


def test_strided_tokens():
    """Token ids that are a strided view (a column of an [N, 2] buffer): the backward reads them
    by row, so they must be the same ids the forward used."""
    s, t = _logits(5, 60, seed=33), _logits(5, 60, seed=34)
    tokens = torch.randint(0, 60, (5, 2), generator=torch.Generator().manual_seed(35))[:, 1]
    assert not tokens.is_contiguous()
    _check(lambda x: opd_kernels.token_logprobs(x, tokens, **ON),
           lambda x: reference.token_logprobs(x, tokens), s)
    _check(lambda x: opd_kernels.opd_loss(x, t, objective="sampled", tokens=tokens,
                                          reduction="none", **ON),
           lambda x: _per_position("sampled", tokens)(x, t), s)
