"""The fused-linear kernels on every objective and model quirk, on each backend that has them (the
Triton kernels, interpreted on CPU, and the native CPU backend, cpp_fused, in chunks of two rows),
against the float64 reference on the materialized logits ``reference.linear_logits(h, W, K, b)``:
values and the student's gradients (hidden, weight, bias) for both gradient paths (recomputed in
the backward; computed in the forward for reduction "mean"/"sum"), soft-capping and lm_head
biases on either model, mixed precision (fp16 activations, fp32 weights) and the statistics'
optional fields."""
import pytest
import torch

import opd_kernels
from opd_kernels import reference
from test_triton_fused_linear import _inputs, _mask

ON = {}  # the keyword choosing the backend under test (set by the ``kernels`` fixture)


@pytest.fixture(autouse=True, params=["triton", "cpp"])
def kernels(request, monkeypatch):
    ON["backend"] = request.param
    if request.param == "cpp":  # chunks of two rows: the chunks' results are merged in every test
        monkeypatch.setattr("opd_kernels.backends.cpp_fused.SCRATCH_BYTES", 2 * 2 * 4 * 320)
    return request.param


OBJECTIVES = [("full", {}), ("forward_kl", {}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.3}),
              ("jsd", {"beta": 1.0}), ("sampled", {}), ("topk", {}), ("topk_pg", {})]
RTOL = 2e-5


def _grads(fn, params: dict, upstream):
    """Value and the gradients of sum(upstream * fn(**params)) w.r.t. every tensor in params."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in params.items()}
    value = fn(**leaves)
    (value.double() * upstream).sum().backward()
    return value.detach().double(), {name: t.grad for name, t in leaves.items()}


def _compare(ours, truth, rtol=RTOL):
    (value, grads), (value_ref, grads_ref) = ours, truth
    scale = lambda t: t.abs().max().clamp(min=1e-12)
    assert ((value - value_ref).abs().max() / scale(value_ref)).item() <= rtol, "value"
    for name, g in grads.items():
        err = ((g.double() - grads_ref[name]).abs().max() / scale(grads_ref[name])).item()
        assert err <= rtol, f"d/d{name}: max error {err:.2e} of the largest magnitude"


def _case(objective, params, *, n=5, vocab=300, hs=32, ht=48, reduction="none",
          grad_in_forward=True, mask="some", tau=0.7, student_softcap=None, teacher_softcap=None,
          student_bias=False, teacher_bias=False, seed=0, vocab_size=None):
    """(ours, truth): value and gradients of the same loss from the kernels and from float64
    (``vocab_size``: the ids scored, below the lm_heads' rows: padding)."""
    x = _inputs(n, vocab, hs, ht, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    student = dict(h=x["student_hidden"], w=x["student_weight"])
    if student_bias:
        student["b"] = torch.randn(vocab, generator=g)
    b_t = torch.randn(vocab, generator=g) if teacher_bias else None
    ht_, wt, y, m = x["teacher_hidden"], x["teacher_weight"], x["tokens"], _mask(mask, n)
    if vocab_size is not None:
        y = y % vocab_size
    upstream = x["upstream"] if reduction == "none" else torch.tensor(2.5, dtype=torch.float64)
    common = dict(tokens=y, k=4, mask=m, temperature=tau, reduction=reduction,
                  student_softcap=student_softcap, teacher_softcap=teacher_softcap, **params)

    def ours(h, w, b=None):
        return opd_kernels.fused_linear_opd_loss(
            h, w, ht_, wt, objective=objective, student_bias=b, teacher_bias=b_t,
            grad_in_forward=grad_in_forward, vocab_size=vocab_size, **ON, **common)

    def ref(h, w, b=None):
        z_t = reference.linear_logits(ht_.double(), wt.double(), vocab_size,
                                      None if b_t is None else b_t.double())
        return reference.opd_loss(reference.linear_logits(h, w, vocab_size, b), z_t, objective,
                                  **common)

    return (_grads(ours, student, upstream),
            _grads(ref, {k: v.double() for k, v in student.items()}, upstream))


@pytest.mark.parametrize("reduction,grad_in_forward", [("none", True), ("mean", True), ("sum", False)])
@pytest.mark.parametrize("objective,params", OBJECTIVES)
def test_every_objective_matches_reference(objective, params, reduction, grad_in_forward):
    _compare(*_case(objective, params, reduction=reduction, grad_in_forward=grad_in_forward))


@pytest.mark.parametrize("reduction,grad_in_forward", [("none", True), ("mean", True), ("sum", False)])
@pytest.mark.parametrize("objective,params", [("full", {}), ("jsd", {"beta": 0.3}), ("sampled", {}),
                                              ("topk", {})])
def test_padded_lm_heads(objective, params, reduction, grad_in_forward):
    """vocab_size below the lm_heads' rows: the padding rows are never scored, and their
    gradient (weight and bias) is zero, in the weight's own shape."""
    _compare(*_case(objective, params, reduction=reduction, grad_in_forward=grad_in_forward,
                    vocab_size=291, student_bias=True))


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("objective,params,quirks", [
    ("full", {}, dict(student_softcap=4.0)),
    ("jsd", {"beta": 0.3}, dict(teacher_softcap=3.0, student_bias=True)),
    ("sampled", {}, dict(student_softcap=5.0, teacher_bias=True, student_bias=True)),
    ("topk", {}, dict(student_softcap=4.0, teacher_softcap=3.0, student_bias=True, teacher_bias=True)),
    ("topk_pg", {}, dict(student_softcap=4.0, teacher_bias=True)),
    ("forward_kl", {}, dict(student_softcap=4.0, teacher_softcap=6.0, student_bias=True)),
])
def test_softcap_and_bias_on_either_model(objective, params, quirks, grad_in_forward):
    """Caps small enough to bend the logits (|u| reaches ~8 here), biases of scale 1. (A cap far
    below the logits, e.g. 2 here, saturates the top-k ids: 1 - (z / c)^2 then cancels in fp32
    to ~1e-4 relative, on every backend that takes the derivative from the capped value.)"""
    _compare(*_case(objective, params, reduction="mean", grad_in_forward=grad_in_forward, **quirks))


@pytest.mark.parametrize("reduction,grad_in_forward", [("none", True), ("sum", True), ("sum", False)])
@pytest.mark.parametrize("objective", ["full", "jsd", "topk", "sampled"])
def test_mixed_precision_fp16_activations_fp32_weights(objective, reduction, grad_in_forward):
    """fp16 hidden states with fp32 weight and bias: the products in fp16 with fp32 accumulation
    (the reference runs in float64 on the fp16-rounded weight and bias), the weight and bias
    gradients in fp32 and not rounded to fp16 on the way."""
    x = _inputs(6, 320, 32, 48, seed=3)
    g = torch.Generator().manual_seed(4)
    h, w, b = x["student_hidden"].half(), x["student_weight"], torch.randn(320, generator=g)
    ht, wt, y = x["teacher_hidden"].half(), x["teacher_weight"], x["tokens"]
    upstream = x["upstream"] if reduction == "none" else torch.tensor(1.5, dtype=torch.float64)
    common = dict(objective=objective, tokens=y, k=4, reduction=reduction)

    def ours(h, w, b):
        return opd_kernels.fused_linear_opd_loss(h, w, ht, wt, student_bias=b,
                                                 grad_in_forward=grad_in_forward,
                                                 **ON, **common)

    def ref(h, w, b):
        rounded = lambda t: t.half().double()
        return reference.opd_loss(reference.linear_logits(h, rounded(w), None, rounded(b)),
                                  reference.linear_logits(ht.double(), rounded(wt)), **common)

    value, grads = _grads(ours, dict(h=h, w=w, b=b), upstream)
    assert grads["w"].dtype == torch.float32 and grads["b"].dtype == torch.float32
    assert grads["h"].dtype == torch.float16
    # an fp16 rounding of the summed gradient would leave it equal to its fp16 rounding
    assert not torch.equal(grads["w"], grads["w"].half().float())
    truth = _grads(ref, dict(h=h.double(), w=w.double(), b=b.double()), upstream)
    # the value to fp32 accuracy: the products are those of the fp16-rounded weight exactly
    assert ((value - truth[0]).abs().max() / truth[0].abs().max()).item() <= 1e-5
    # dL/du is stored in fp16 for the GEMMs: ~1e-3 of the largest magnitude
    _compare((value, grads), truth, rtol=3e-3)


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("objective,with_tokens", [("full", True), ("jsd", False),
                                                   ("sampled", True), ("topk", True)])
def test_return_stats_fields(objective, with_tokens, grad_in_forward):
    """The optional fields: the full reverse KL wherever the pair pass ran (not for "topk", which
    reads the teacher at k ids; its statistics add single-model passes only), both log-probs of
    the tokens where they were given; NaN at uncounted rows like every field."""
    x = _inputs(5, 300, 32, 48, seed=6)
    m = _mask("some", 5)
    y = x["tokens"] if with_tokens or objective == "sampled" else None
    h = x["student_hidden"].clone().requires_grad_()
    loss, stats = opd_kernels.fused_linear_opd_loss(
        h, x["student_weight"], x["teacher_hidden"], x["teacher_weight"], objective=objective,
        tokens=y, k=4, mask=m, temperature=0.8, return_stats=True, student_softcap=6.0,
        grad_in_forward=grad_in_forward, **ON)
    loss.backward()
    z_s = reference.softcapped(reference.linear_logits(x["student_hidden"].double(),
                                                       x["student_weight"].double()), 6.0)
    z_t = reference.linear_logits(x["teacher_hidden"].double(), x["teacher_weight"].double())
    truth = reference.topk_overlap(z_s, z_t, 4, 0.8, tokens=y)
    expected = {"reverse_kl": True, "student_logprob": y is not None,
                "teacher_logprob": y is not None}
    for name, present in expected.items():
        assert (getattr(stats, name) is not None) == present, name
    for name, ours in stats.tensors().items():
        assert torch.isnan(ours[~m]).all(), name
        want = getattr(truth, name)[m].float()
        ok = ~torch.isnan(want)
        torch.testing.assert_close(ours[m][ok], want[ok], rtol=1e-4, atol=1e-5, msg=name)


def test_statistics_with_tokens_bias_and_softcap():
    x = _inputs(4, 300, 32, 48, seed=8)
    b_s = torch.randn(300, generator=torch.Generator().manual_seed(2))
    stats = opd_kernels.fused_linear_topk_overlap(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], k=4,
        tokens=x["tokens"], student_bias=b_s, teacher_softcap=3.0, **ON)
    z_s = reference.linear_logits(x["student_hidden"].double(), x["student_weight"].double(),
                                  None, b_s.double())
    z_t = reference.softcapped(reference.linear_logits(x["teacher_hidden"].double(),
                                                       x["teacher_weight"].double()), 3.0)
    truth = reference.topk_overlap(z_s, z_t, 4, tokens=x["tokens"])
    assert stats.student_logprob is not None and stats.reverse_kl is not None
    for name, ours in stats.tensors().items():
        want = getattr(truth, name).float()
        ok = ~torch.isnan(want)
        torch.testing.assert_close(ours[ok], want[ok], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("softcap,bias", [(None, True), (3.0, False)])
def test_logsumexp_and_token_logprobs_with_bias_and_softcap(softcap, bias):
    x = _inputs(5, 300, 32, seed=9)
    b = torch.randn(300, generator=torch.Generator().manual_seed(3)) if bias else None
    y = x["tokens"]
    for fn, ref in (
        (lambda h, w, b=None: opd_kernels.fused_linear_logsumexp(h, w, bias=b, softcap=softcap,
                                                                 temperature=0.7, **ON),
         lambda h, w, b=None: reference.logsumexp(
             reference.softcapped(reference.linear_logits(h, w, None, b), softcap), 0.7)),
        (lambda h, w, b=None: opd_kernels.fused_linear_token_logprobs(
            h, w, y, bias=b, softcap=softcap, temperature=0.7, **ON),
         lambda h, w, b=None: reference.token_logprobs(
             reference.softcapped(reference.linear_logits(h, w, None, b), softcap), y, 0.7)),
    ):
        params = dict(h=x["student_hidden"], w=x["student_weight"], **({"b": b} if bias else {}))
        _compare(_grads(fn, params, x["upstream"]),
                 _grads(ref, {k: v.double() for k, v in params.items()}, x["upstream"]))
