"""The objectives layer (opd_kernels.objectives) and the PyTorch path of the public API.

(a) every objective's ``from_passes`` on ``reference.pass_results`` against its own float64
    ``reference`` (values) and against autograd of it (gradients, via GradForm.materialize);
(b) closed forms between objectives, TRL's JSD written out, the policy-gradient derivation;
(c) gradcheck through the public API (backend="torch"), soft-capping, lm_head biases;
(d) the public API on the torch backend against the oracle (masks, ignore_index, reductions,
    padded vocabularies, mixed precision, statistics);
(e) a user-defined Objective through opd_loss; (f) bad input names the argument.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import opd_kernels as O
from opd_kernels import backends, objectives
from opd_kernels import reference as R
from opd_kernels.backends import Backend, Capabilities
from opd_kernels.objectives import GradForm, Need, Objective, Param, PassResults
from opd_kernels.stats import TopKStats

D = torch.float64
INF = math.inf
TAU = 0.7
K = 3


def cases():
    """(name, params) of every registered objective; the JSD at both endpoints and inside."""
    out = []
    for name in objectives.names():
        if name == "jsd":
            out += [(name, {"beta": b}) for b in (0.0, 0.3, 1.0)]
        else:
            out.append((name, {}))
    return out


CASES = cases()
IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CASES]


def rand(*shape, scale=3.0, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=D) * scale).to(dtype)


def ids(shape, vocab, seed=2):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_every_objective_is_covered():
    assert {"full", "forward_kl", "jsd", "sampled", "topk", "topk_pg"} <= set(objectives.names())
    for name in objectives.names():
        assert objectives.get(name).name == name


# ---- (a) from_passes against the reference ---------------------------------------------------

V = 10


def hard_rows():
    """Rows that stress the math: ordinary; logits near +-1e4; a teacher -inf where the student
    is -inf too (finite for every objective); a teacher -inf where the student has small mass
    outside its top-k (KL(p || q) = +inf there, the others finite)."""
    zs, zt = rand(5, V), rand(5, V, seed=1)
    zs[1] = torch.linspace(1e4, -1e4, V, dtype=D)[torch.randperm(V, generator=torch.Generator().manual_seed(5))]
    zt[1] = 1e4 - 3.0 * torch.arange(V, dtype=D)
    zt[1, 4] = -1e4
    zs[2, [1, 3, 6]] = -INF                  # both models exclude ids 1, 3, 6
    zt[2, [1, 3, 6]] = -INF
    zs[3] = torch.arange(V, dtype=D) * 0.5   # top-3 = ids 9, 8, 7
    zt[3, 0] = -INF                          # id 0: p > 0, outside the student's top-k
    tokens = torch.tensor([4, 2, 0, 8, 5])
    return zs, zt, tokens


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_from_passes_equals_reference_values(name, params):
    obj = objectives.get(name)
    zs, zt, tokens = hard_rows()
    needs = obj.needs(obj.check_params(params))
    r = R.pass_results(zs, zt, needs, tokens=tokens, k=K, temperature=TAU, **params)
    value, form = obj.from_passes(r, **params)
    expected = obj.reference(zs, zt, tokens=tokens, k=K, temperature=TAU, **params)
    assert isinstance(form, GradForm) and value.dtype == D
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(expected[:3]).all()
    if name == "full" or params.get("beta") == 1.0:
        assert expected[3].item() == INF
    else:
        assert math.isfinite(expected[3].item())


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_from_passes_gradient_equals_autograd_of_reference(name, params):
    obj = objectives.get(name)
    zs, zt, tokens = hard_rows()
    finite = torch.isfinite(obj.reference(zs, zt, tokens=tokens, k=K, temperature=TAU, **params))
    zs, zt, tokens = zs[finite], zt[finite], tokens[finite]
    assert zs.shape[0] >= 4
    zs.requires_grad_()
    value = obj.reference(zs, zt, tokens=tokens, k=K, temperature=TAU, **params)
    (expected,) = torch.autograd.grad(value.sum(), zs)
    needs = obj.needs(obj.check_params(params))
    r = R.pass_results(zs.detach(), zt, needs, tokens=tokens, k=K, temperature=TAU, **params)
    _, form = obj.from_passes(r, **params)
    grad = form.materialize(zs.detach() / TAU, zt / TAU) / TAU
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
    # the sparse-only objectives declare no full pass and keep the gradient at k ids a row
    if not form.dense:
        assert Need.TEACHER_FULL not in needs and form.sparse_ids.shape == (zs.shape[0], K)


def test_needs_follow_the_parameters():
    jsd = objectives.get("jsd")
    assert Need.MIXTURE in jsd.needs({"beta": 0.3})
    assert Need.MIXTURE not in jsd.needs({"beta": 0.0}) and Need.MIXTURE not in jsd.needs({"beta": 1.0})
    assert objectives.get("topk").needs({}) == {Need.SUPPORT}
    assert Need.TOKENS in objectives.get("sampled").needs({})
    assert Need.TEACHER_FULL in objectives.get("topk_pg").needs({})


# ---- (b) closed forms --------------------------------------------------------------------------

def ref(name, zs, zt, **kw):
    return objectives.get(name).reference(zs, zt, temperature=TAU, **kw)


def test_forward_kl_is_reverse_kl_with_the_arguments_swapped():
    zs, zt = rand(4, 9), rand(4, 9, seed=1)
    torch.testing.assert_close(ref("forward_kl", zs, zt), ref("full", zt, zs), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ref("forward_kl", zs, zt), ref("full", zs, zt))


@pytest.mark.parametrize("beta, same_as", [(0.0, "forward_kl"), (1.0, "full")])
def test_jsd_endpoints_are_the_kls(beta, same_as):
    zs, zt = rand(4, 9).requires_grad_(), rand(4, 9, seed=1)
    jsd, kl = ref("jsd", zs, zt, beta=beta), ref(same_as, zs, zt)
    torch.testing.assert_close(jsd, kl, rtol=0, atol=0)
    torch.testing.assert_close(*(torch.autograd.grad(v.sum(), zs)[0] for v in (jsd, kl)))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_symmetry(beta):
    zs, zt = rand(4, 9), rand(4, 9, seed=1)
    torch.testing.assert_close(ref("jsd", zs, zt, beta=beta), ref("jsd", zt, zs, beta=1.0 - beta),
                               rtol=1e-12, atol=1e-12)


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss, per position (reduction="none", summed over V)."""
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=log_p.dtype)
        log_m = torch.logsumexp(torch.stack([log_p + torch.log(1 - b), log_q + torch.log(b)]), dim=0)
        kl_teacher = F.kl_div(log_m, log_q, reduction="none", log_target=True)
        kl_student = F.kl_div(log_m, log_p, reduction="none", log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_jsd_equals_trl(beta):
    zs, zt = rand(5, 11).requires_grad_(), rand(5, 11, seed=1)
    ours, trl = ref("jsd", zs, zt, beta=beta), trl_generalized_jsd(zs, zt, beta, TAU)
    torch.testing.assert_close(ours, trl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(*(torch.autograd.grad(v.sum(), zs)[0] for v in (ours, trl)),
                               rtol=1e-10, atol=1e-12)


def test_jsd_inner_gradient_formula():
    beta = 0.3
    zs, zt = rand(3, 8).requires_grad_(), rand(3, 8, seed=1)
    (grad,) = torch.autograd.grad(ref("jsd", zs, zt, beta=beta).sum(), zs)
    log_p, log_q = R.log_softmax(zs.detach(), TAU), R.log_softmax(zt, TAU)
    log_m = torch.log(beta * log_q.exp() + (1 - beta) * log_p.exp())
    p = log_p.exp()
    j_p = (p * (log_p - log_m)).sum(-1, keepdim=True)
    torch.testing.assert_close(grad, (1 - beta) / TAU * p * (log_p - log_m - j_p), rtol=1e-10, atol=1e-12)


def test_topk_pg_gradient_is_the_policy_gradient():
    zs, zt = rand(4, 12).requires_grad_(), rand(4, 12, seed=1)
    (grad,) = torch.autograd.grad(ref("topk_pg", zs, zt, k=K).sum(), zs)
    log_p, log_q = R.log_softmax(zs.detach(), TAU), R.log_softmax(zt, TAU)
    p = log_p.exp()
    for row in range(4):
        support = torch.argsort(zs[row].detach(), descending=True)[:K]
        w = p[row, support] / p[row, support].sum()
        reward = log_q[row, support] - log_p[row, support]
        # L = -sum_S w r log p  =>  dL/dz_u = (1/tau) (-w_u r_u [u in S] + (sum_S w r) p_u)
        expected = (w * reward).sum() * p[row]
        expected[support] -= w * reward
        torch.testing.assert_close(grad[row], expected / TAU, rtol=1e-10, atol=1e-12)
        value = -(w * reward * log_p[row, support]).sum()
        torch.testing.assert_close(ref("topk_pg", zs, zt, k=K)[row].detach(), value)


# ---- (c) gradcheck through the public API -------------------------------------------------------

def frozen_surrogate(name, zs0, zt, tokens, k, tau, student_cap=None, teacher_cap=None):
    """For the policy-gradient objectives (detached rewards and weights), the function whose
    gradient their loss has: the detached factors frozen at zs0, as a function of the logits."""
    cap = lambda z: R.softcapped(z, student_cap)
    log_p0, log_q = R.log_softmax(cap(zs0), tau), R.log_softmax(R.softcapped(zt, teacher_cap), tau)
    if name == "sampled":
        at = tokens[:, None]
    else:
        at = R.topk_ids(cap(zs0), k)
    coef = (log_q - log_p0).gather(-1, at)
    if name == "topk_pg":
        coef = coef * torch.softmax(log_p0.gather(-1, at), -1)
    return lambda z: -(coef * R.log_softmax(cap(z), tau).gather(-1, at)).sum(-1).mean()


def checked(loss_fn, surrogate):
    """gradcheck the backward of ``loss_fn`` against finite differences of ``surrogate`` (the
    forward's value is swapped for the surrogate's, outside autograd)."""
    if surrogate is None:
        return loss_fn
    return lambda z: loss_fn(z) + (surrogate(z) - loss_fn(z)).detach()


@pytest.mark.parametrize("softcap", [None, "student", "teacher"])
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_gradcheck_logits(name, params, softcap):
    zs, zt = rand(3, 7).requires_grad_(), rand(3, 7, seed=1)
    tokens = torch.tensor([1, 6, 3])
    caps = {"student_softcap": 2.5 if softcap == "student" else None,
            "teacher_softcap": 2.0 if softcap == "teacher" else None}
    fn = lambda z: O.opd_loss(z, zt, objective=name, tokens=tokens, k=K, temperature=TAU,
                              backend="torch", **caps, **params)
    surrogate = None
    if name in ("sampled", "topk_pg"):
        surrogate = frozen_surrogate(name, zs.detach(), zt, tokens, K, TAU, caps["student_softcap"],
                                     caps["teacher_softcap"])
    assert torch.autograd.gradcheck(checked(fn, surrogate), (zs,))
    if softcap is not None:  # the cap changes the value
        plain = O.opd_loss(zs, zt, objective=name, tokens=tokens, k=K, temperature=TAU,
                           backend="torch", **params)
        assert not torch.allclose(fn(zs), plain)


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_gradcheck_fused_linear_with_biases_and_softcap(name, params):
    hs = rand(3, 4, scale=1.0).requires_grad_()
    ws, bs = rand(8, 4, seed=1).requires_grad_(), rand(8, seed=2).requires_grad_()
    ht, wt, bt = rand(3, 5, seed=3, scale=1.0), rand(8, 5, seed=4), rand(8, seed=5)
    tokens = torch.tensor([1, 6, 3])
    options = dict(objective=name, tokens=tokens, k=K, temperature=TAU, student_softcap=4.0,
                   teacher_bias=bt, backend="torch", **params)
    fn = lambda h, w, b: O.fused_linear_opd_loss(h, w, ht, wt, student_bias=b, **options)
    if name in ("sampled", "topk_pg"):
        zt = R.linear_logits(ht, wt, bias=bt)
        s = frozen_surrogate(name, R.linear_logits(hs, ws, bias=bs).detach(), zt, tokens, K, TAU, 4.0)
        fn = (lambda loss, s: lambda h, w, b: loss(h, w, b) + (
            s(R.linear_logits(h, w, bias=b)) - loss(h, w, b)).detach())(fn, s)
    assert torch.autograd.gradcheck(fn, (hs, ws, bs))
    # the biases change the value (of both models)
    no_bias = O.fused_linear_opd_loss(hs, ws, ht, wt, **{**options, "teacher_bias": None})
    assert not torch.allclose(no_bias, fn(hs, ws, bs))


# ---- (d) the public API on the torch backend against the oracle ----------------------------------

def masks(lead):
    some = torch.rand(lead, generator=torch.Generator().manual_seed(3)) > 0.4
    some.view(-1)[0] = True
    return {"none": None, "some": some, "all_out": torch.zeros(lead, dtype=torch.bool),
            "all_in": torch.ones(lead, dtype=torch.bool)}


def grads(out, inputs, upstream=None):
    return torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize("mask_kind", ["none", "some", "all_out", "all_in"])
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_api_matches_oracle_masks_and_leading_dims(name, params, mask_kind):
    lead, vocab = (2, 3), 9
    zs, zt = rand(*lead, vocab).requires_grad_(), rand(*lead, vocab, seed=1)
    tokens = ids(lead, vocab)
    mask = masks(lead)[mask_kind]
    if mask_kind in ("some", "all_out"):  # garbage in an uncounted position: never read
        mask = mask.clone()
        mask[0, 1] = False
        zt[0, 1, :] = -INF
        zt[0, 1, 0] = math.nan
        tokens[0, 1] = -7
    loss = O.opd_loss(zs, zt, objective=name, tokens=tokens, k=K, mask=mask, temperature=TAU,
                      backend="torch", **params)
    expected = R.opd_loss(zs, zt, name, tokens, K, mask, TAU, **params)
    assert loss.dtype == D and loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    (g,) = grads(loss, zs)
    torch.testing.assert_close(g, grads(expected, zs)[0], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(g).all()
    if mask_kind == "all_out":
        assert loss.item() == 0.0 and (g == 0).all()


@pytest.mark.parametrize("form", ["logits", "fused_linear"])
def test_only_the_student_gets_a_gradient(form):
    hs, ws = rand(3, 4).requires_grad_(), rand(8, 4, seed=1).requires_grad_()
    ht, wt = rand(3, 5, seed=2).requires_grad_(), rand(8, 5, seed=3).requires_grad_()
    tokens = torch.tensor([1, 7, 3])
    for name, params in CASES:
        if form == "logits":
            zs, zt = R.linear_logits(hs, ws), R.linear_logits(ht, wt)
            loss = O.opd_loss(zs, zt, objective=name, tokens=tokens, k=K, backend="torch", **params)
            inputs, teacher = (zs, zt), (zt,)
        else:
            loss = O.fused_linear_opd_loss(hs, ws, ht, wt, objective=name, tokens=tokens, k=K,
                                           backend="torch", **params)
            inputs, teacher = (hs, ws, ht, wt), (ht, wt)
        got = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        assert all(g.abs().sum() > 0 for g in got[:len(inputs) - len(teacher)]), name
        assert all((g == 0).all() for g in got[len(inputs) - len(teacher):]), name


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_api_reductions_and_per_position_upstream_gradient(name, params, reduction):
    zs, zt = rand(6, 9).requires_grad_(), rand(6, 9, seed=1)
    tokens = ids((6,), 9)
    mask = torch.tensor([True, True, False, True, False, True])
    out = O.opd_loss(zs, zt, objective=name, tokens=tokens, k=K, mask=mask, temperature=1.3,
                     reduction=reduction, backend="torch", **params)
    expected = R.opd_loss(zs, zt, name, tokens, K, mask, 1.3, reduction, **params)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if reduction == "none":
        assert out.shape == (6,) and (out[~mask] == 0).all()
    upstream = torch.linspace(-2, 3, out.numel(), dtype=D).reshape(out.shape)
    torch.testing.assert_close(grads(out, zs, upstream)[0], grads(expected, zs, upstream)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_api_temperature(tau):
    zs, zt = rand(4, 9).requires_grad_(), rand(4, 9, seed=1)
    for name, params in CASES:
        tokens = ids((4,), 9)
        out = O.opd_loss(zs, zt, objective=name, tokens=tokens, k=K, temperature=tau,
                         backend="torch", **params)
        expected = R.opd_loss(zs, zt, name, tokens, K, None, tau, **params)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads(out, zs)[0], grads(expected, zs)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ignore_index", [-100, 50])
@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_api_ignore_index_combined_with_mask(name, params, ignore_index):
    zs, zt = rand(6, 9).requires_grad_(), rand(6, 9, seed=1)
    tokens = ids((6,), 9)
    tokens[[1, 4]] = ignore_index               # ignored positions may hold out-of-range ids
    mask = torch.tensor([True, True, True, False, True, True])
    tokens[3] = 1000                            # and so may masked-out ones
    counted = mask & (tokens != ignore_index)
    kw = dict(objective=name, tokens=tokens, k=K, mask=mask, reduction="none", backend="torch", **params)
    if ignore_index != -100:
        kw["ignore_index"] = ignore_index
    out = O.opd_loss(zs, zt, **kw)
    expected = R.opd_loss(zs, zt, name, torch.where(counted, tokens, 0), K, counted, 1.0, "none", **params)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (out[~counted] == 0).all() and (out[counted] != 0).all()
    mean = O.opd_loss(zs, zt, **{**kw, "reduction": "mean"})
    torch.testing.assert_close(mean, expected.sum() / 3)
    (g,) = grads(mean, zs)
    assert (g[~counted] == 0).all() and torch.isfinite(g).all()
    stats = O.topk_overlap(zs, zt, k=K, tokens=tokens, mask=mask, backend="torch",
                           **({} if ignore_index == -100 else {"ignore_index": ignore_index}))
    assert torch.equal(stats.mask, counted) and torch.isnan(stats.student_logprob[~counted]).all()


def test_ignore_index_none_counts_every_id():
    zs, zt = rand(3, 9), rand(3, 9, seed=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        O.opd_loss(zs, zt, objective="sampled", tokens=torch.tensor([0, -100, 2]), ignore_index=None,
                   backend="torch")


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
@pytest.mark.parametrize("form", ["logits", "fused_linear"])
def test_api_no_positions(name, params, form):
    if form == "logits":
        zs = torch.zeros(0, 7, dtype=D, requires_grad=True)
        call = lambda **kw: O.opd_loss(zs, torch.zeros(0, 7, dtype=D), objective=name,
                                       tokens=torch.zeros(0, dtype=torch.long), k=K, backend="torch",
                                       **params, **kw)
    else:
        zs = torch.zeros(0, 4, dtype=D, requires_grad=True)
        call = lambda **kw: O.fused_linear_opd_loss(
            zs, rand(7, 4), torch.zeros(0, 3, dtype=D), rand(7, 3, seed=1), objective=name,
            tokens=torch.zeros(0, dtype=torch.long), k=K, backend="torch", **params, **kw)
    mean = call()
    assert mean.item() == 0.0 and (grads(mean, zs)[0] == 0).all()
    assert call(reduction="sum").item() == 0.0
    assert call(reduction="none").shape == (0,)
    loss, stats = call(return_stats=True)
    assert stats.overlap.shape == (0,) and math.isnan(stats.summary()["overlap"])


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_fused_linear_differently_padded_vocabularies(name, params):
    hs, ws = rand(2, 3, 6, scale=1.0).requires_grad_(), rand(13, 6, seed=1, scale=0.5).requires_grad_()
    bs = rand(13, seed=6).requires_grad_()
    ht, wt, bt = rand(2, 3, 5, seed=2, scale=1.0), rand(16, 5, seed=3, scale=0.5), rand(16, seed=7)
    tokens = ids((2, 3), 11)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    loss = O.fused_linear_opd_loss(hs, ws, ht, wt, objective=name, tokens=tokens, k=K, mask=mask,
                                   temperature=TAU, vocab_size=11, student_bias=bs, teacher_bias=bt,
                                   backend="torch", **params)
    expected = R.opd_loss(R.linear_logits(hs, ws, 11, bs), R.linear_logits(ht, wt, 11, bt), name,
                          tokens, K, mask, TAU, **params)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    g, g_ref = grads(loss, (hs, ws, bs)), grads(expected, (hs, ws, bs))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (g[1][11:] == 0).all() and (g[2][11:] == 0).all()  # the padding rows get nothing


@pytest.mark.parametrize("name, params", CASES, ids=IDS)
def test_fused_linear_mixed_precision(name, params):
    h16 = rand(5, 8, scale=1.0, dtype=torch.float16).requires_grad_()
    w32 = rand(12, 8, seed=1, scale=0.4, dtype=torch.float32).requires_grad_()
    b32 = rand(12, seed=2, dtype=torch.float32).requires_grad_()
    ht16, wt32 = rand(5, 6, seed=3, dtype=torch.float16), rand(12, 6, seed=4, scale=0.4, dtype=torch.float32)
    tokens = ids((5,), 12)
    loss = O.fused_linear_opd_loss(h16, w32, ht16, wt32, objective=name, tokens=tokens, k=K,
                                   temperature=TAU, student_bias=b32, backend="torch", **params)
    assert loss.dtype == torch.float32
    # the oracle: autocast's product, i.e. the weight and bias rounded to fp16, in float64
    w_r = w32.detach().half().double().requires_grad_()
    b_r = b32.detach().half().double().requires_grad_()
    h_r = h16.detach().double().requires_grad_()
    expected = R.opd_loss(R.linear_logits(h_r, w_r, bias=b_r), R.linear_logits(ht16.double(), wt32.half().double()),
                          name, tokens, K, None, TAU, **params)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    g_h, g_w, g_b = grads(loss, (h16, w32, b32))
    e_h, e_w, e_b = grads(expected, (h_r, w_r, b_r))
    assert g_w.dtype == torch.float32 and g_b.dtype == torch.float32 and g_h.dtype == torch.float16
    torch.testing.assert_close(g_w.double(), e_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_b.double(), e_b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_h.double(), e_h, rtol=2e-3, atol=1e-4)


def test_return_stats_new_fields():
    lead, vocab = (2, 4), 11
    zs, zt = rand(*lead, vocab), rand(*lead, vocab, seed=1)
    tokens = ids(lead, vocab)
    mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    for name, params in CASES:
        _, stats = O.opd_loss(zs, zt, objective=name, tokens=tokens, k=K, mask=mask, temperature=TAU,
                              return_stats=True, backend="torch", **params)
        assert stats.student_logprob is not None and stats.teacher_logprob is not None
        for field, expected in [("reverse_kl", R.reverse_kl(zs, zt, TAU)),
                                ("student_logprob", R.token_logprobs(zs, tokens, TAU)),
                                ("teacher_logprob", R.token_logprobs(zt, tokens, TAU))]:
            value = getattr(stats, field)
            assert value.shape == lead and value.dtype == torch.float32
            torch.testing.assert_close(value[mask], expected[mask].float())
            assert torch.isnan(value[~mask]).all()
        ref_stats = R.topk_overlap(zs, zt, K, TAU, tokens=tokens)
        for field, value in stats.tensors().items():
            torch.testing.assert_close(value[mask], getattr(ref_stats, field)[mask].float(), equal_nan=True)
    # without tokens the log-probs are absent, the reverse KL is not
    _, stats = O.opd_loss(zs, zt, objective="topk", k=K, return_stats=True, backend="torch")
    assert stats.student_logprob is None and stats.teacher_logprob is None
    assert stats.reverse_kl is not None and "student_logprob" not in stats.tensors()


def test_topk_stats_cat():
    zs, zt = rand(7, 9), rand(7, 9, seed=1)
    tokens = ids((7,), 9)
    whole = O.topk_overlap(zs, zt, k=K, tokens=tokens, backend="torch")
    a = O.topk_overlap(zs[:3], zt[:3], k=K, tokens=tokens[:3], backend="torch")
    b = O.topk_overlap(zs[3:], zt[3:], k=K, tokens=tokens[3:], backend="torch")
    joined = TopKStats.cat([a, b])
    assert joined.tensors().keys() == whole.tensors().keys()
    for name, value in whole.tensors().items():
        torch.testing.assert_close(getattr(joined, name), value, equal_nan=True)
    assert joined.mask is None or joined.mask.all()
    mask = torch.tensor([True, False, True, True, True, False, True])
    a = O.topk_overlap(zs[:3], zt[:3], k=K, mask=mask[:3], backend="torch")
    b = O.topk_overlap(zs[3:], zt[3:], k=K, mask=mask[3:], backend="torch")
    whole = O.topk_overlap(zs, zt, k=K, mask=mask, backend="torch")
    assert torch.equal(TopKStats.cat([a, b]).mask, mask)
    assert TopKStats.cat([a, b]).summary() == pytest.approx(whole.summary(), nan_ok=True)
    # a part without a mask counts all its positions
    c = O.topk_overlap(zs[3:], zt[3:], k=K, backend="torch")
    mixed = TopKStats.cat([a, c])
    assert torch.equal(mixed.mask, torch.tensor([True, False, True, True, True, True, True]))
    assert not math.isnan(mixed.summary()["overlap"])


def test_summary_both_aggregations_of_the_masses():
    nan = math.nan
    t = lambda *v: torch.tensor(v, dtype=torch.float32)
    stats = TopKStats(overlap=t(0.5, 0.0, 1.0, 0.25), student_mass=t(0.8, 0.0, 0.9, 0.5),
                      teacher_mass=t(0.6, 0.0, 1.0, 0.4), overlap_advantage=t(-0.1, nan, -0.3, 7.0),
                      student_entropy=t(1, 2, 3, 4), teacher_entropy=t(2, 2, 2, 2),
                      entropy_gap=t(1, 0, 1, 2), mask=torch.tensor([True, True, True, False]))
    s = stats.summary()
    assert s["student_mass"] == pytest.approx((0.8 + 0.0 + 0.9) / 3)
    assert s["teacher_mass"] == pytest.approx((0.6 + 0.0 + 1.0) / 3)
    assert s["student_mass_shared"] == pytest.approx((0.8 + 0.9) / 2)
    assert s["teacher_mass_shared"] == pytest.approx((0.6 + 1.0) / 2)
    assert s["overlap"] == pytest.approx(0.5)
    assert s["overlap_advantage"] == pytest.approx(-0.2)
    assert s["empty_overlap_fraction"] == pytest.approx(1 / 3)
    assert s["student_entropy"] == pytest.approx(2.0)
    assert "reverse_kl" not in s
    # S ∩ T non-empty is read from the overlap: a position where the student has no mass on a
    # non-empty S ∩ T (NaN advantage) is not an empty overlap
    zs = torch.tensor([[0.0, -INF, -INF, -INF], [3.0, 2.0, 1.0, 0.0]], dtype=D)
    zt = torch.tensor([[0.0, 5.0, 4.0, -1.0], [0.0, 1.0, 2.0, 3.0]], dtype=D)
    s = O.topk_overlap(zs, zt, k=2, backend="torch")      # row 0: S = {0, 1}, T = {1, 2}
    assert s.overlap.tolist() == [0.5, 0.0] and s.student_mass[0].item() == 0.0
    summary = s.summary()
    assert summary["empty_overlap_fraction"] == 0.5
    assert summary["teacher_mass_shared"] == pytest.approx(s.teacher_mass[0].item())
    assert summary["student_mass_shared"] == 0.0
    empty = stats.map(lambda x: x)
    empty.mask = torch.zeros(4, dtype=torch.bool)
    assert all(math.isnan(v) for v in empty.summary().values())


# ---- (e) a user-defined objective ----------------------------------------------------------------

class ScaledReverseKL(Objective):
    """scale * KL(p || q): a dense objective declared outside the package."""

    name = "scaled_full"
    summary = "scale KL(p || q)"
    params = {"scale": Param(2.0, 0.0, 10.0)}

    def reference(self, student, teacher, *, temperature=1.0, scale=2.0, **_):
        return scale * R.reverse_kl(student, teacher, temperature)

    def from_passes(self, r, scale=2.0):
        return scale * r.reverse_kl, GradForm(shift=-scale * r.reverse_kl, reverse=scale)


class HalfTopK(Objective):
    """Half the top-k KL: an objective that reads the teacher at the student's top-k only (the
    k-sparse path of the torch backend runs its from_passes, not its reference)."""

    name = "half_topk"
    summary = "KL over S / 2"
    base_needs = frozenset({Need.SUPPORT})

    def reference(self, student, teacher, *, k=16, temperature=1.0, **_):
        return 0.5 * objectives.get("topk").reference(student, teacher, k=k, temperature=temperature)

    def from_passes(self, r):
        value, form = objectives.get("topk").from_passes(r)
        return 0.5 * value, GradForm(sparse_ids=form.sparse_ids, sparse_values=0.5 * form.sparse_values)


def test_user_objective_runs_through_opd_loss():
    zs, zt = rand(2, 3, 9).requires_grad_(), rand(2, 3, 9, seed=1)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    full = O.opd_loss(zs, zt, objective="full", mask=mask, temperature=TAU, backend="torch")
    (g_full,) = grads(full, zs)
    full = full.detach()
    for scale in (2.0, 3.5):
        kw = {} if scale == 2.0 else {"scale": scale}
        ours = O.opd_loss(zs, zt, objective=ScaledReverseKL(), mask=mask, temperature=TAU,
                          backend="torch", **kw)
        torch.testing.assert_close(ours, scale * full)
        torch.testing.assert_close(grads(ours, zs)[0], scale * g_full)
    module = O.OPDLoss(objective=ScaledReverseKL(), scale=3.0, temperature=TAU, backend="torch")
    torch.testing.assert_close(module(zs, zt, mask=mask), 3.0 * full)
    assert "scaled_full" in repr(module) and "scale=3.0" in repr(module)
    with pytest.raises(ValueError, match="scale"):
        O.opd_loss(zs, zt, objective=ScaledReverseKL(), scale=-1.0, backend="torch")


@pytest.mark.parametrize("form", ["logits", "fused_linear"])
def test_user_sparse_objective_runs_its_from_passes(form, monkeypatch):
    calls = []
    original = HalfTopK.from_passes
    monkeypatch.setattr(HalfTopK, "from_passes", lambda self, r: calls.append(1) or original(self, r))
    hs, ws = rand(4, 5, scale=1.0).requires_grad_(), rand(9, 5, seed=1).requires_grad_()
    ht, wt = rand(4, 3, seed=2, scale=1.0), rand(9, 3, seed=3)
    if form == "logits":
        run = lambda obj: O.opd_loss(R.linear_logits(hs, ws), R.linear_logits(ht, wt), objective=obj,
                                     k=K, backend="torch")
    else:
        run = lambda obj: O.fused_linear_opd_loss(hs, ws, ht, wt, objective=obj, k=K, backend="torch")
    ours, topk = run(HalfTopK()), run("topk")
    assert calls
    torch.testing.assert_close(ours, 0.5 * topk)
    for a, b in zip(grads(ours, (hs, ws)), grads(topk, (hs, ws))):
        torch.testing.assert_close(a, 0.5 * b)


# ---- (f) bad input names the argument -------------------------------------------------------------

zs4, zt4 = torch.randn(4, 10), torch.randn(4, 10)
hs4, ws4, ht4, wt4 = torch.randn(4, 6), torch.randn(10, 6), torch.randn(4, 3), torch.randn(10, 3)


@pytest.mark.parametrize("call, error, words", [
    (lambda: O.opd_loss(zs4, zt4, objective="jsd", beta=1.5), ValueError, "beta of objective 'jsd'"),
    (lambda: O.opd_loss(zs4, zt4, objective="jsd", beta=-0.1), ValueError, "beta of objective 'jsd'"),
    (lambda: O.opd_loss(zs4, zt4, objective="jsd", beta="0.5"), ValueError, "beta of objective 'jsd'"),
    (lambda: O.opd_loss(zs4, zt4, objective="jsd", beta=True), ValueError, "beta of objective 'jsd'"),
    (lambda: O.opd_loss(zs4, zt4, objective="jsd", beta=math.nan), ValueError, "beta of objective 'jsd'"),
    (lambda: O.OPDLoss(objective="jsd", beta=2), ValueError, "beta of objective 'jsd'"),
    (lambda: O.opd_loss(zs4, zt4, objective="full", beta=0.5), ValueError, "objective 'full' takes no parameters; got beta"),
    (lambda: O.opd_loss(zs4, zt4, objective="jsd", gamma=0.5), ValueError, "objective 'jsd' takes beta; got gamma"),
    (lambda: O.opd_loss(zs4, zt4, student_softcap=0.0), ValueError, "student_softcap must be"),
    (lambda: O.opd_loss(zs4, zt4, teacher_softcap=-30.0), ValueError, "teacher_softcap must be"),
    (lambda: O.opd_loss(zs4, zt4, student_softcap=math.nan), ValueError, "student_softcap must be"),
    (lambda: O.opd_loss(zs4, zt4, teacher_softcap=math.inf), ValueError, "teacher_softcap must be"),
    (lambda: O.opd_loss(zs4, zt4, student_softcap=True), ValueError, "student_softcap must be"),
    (lambda: O.logsumexp(zs4, softcap=False), ValueError, "softcap must be"),
    (lambda: O.fused_linear_opd_loss(hs4, ws4, ht4, wt4, teacher_softcap="30"), ValueError, "teacher_softcap must be"),
    (lambda: O.fused_linear_opd_loss(hs4, ws4, ht4, wt4, student_bias=torch.randn(9)), ValueError, "student_bias must have shape"),
    (lambda: O.fused_linear_opd_loss(hs4, ws4, ht4, wt4, teacher_bias=torch.randn(10, 1)), ValueError, "teacher_bias must have shape"),
    (lambda: O.fused_linear_opd_loss(hs4, ws4, ht4, wt4, student_bias=torch.randn(10, device="meta")), ValueError, "student_bias is on meta"),
    (lambda: O.fused_linear_opd_loss(hs4, ws4, ht4, wt4, teacher_bias=torch.arange(10)), TypeError, "teacher_bias must be a floating"),
    (lambda: O.fused_linear_logsumexp(hs4, ws4, bias=torch.randn(3)), ValueError, "bias must have shape"),
    (lambda: O.opd_loss(zs4, zt4, objective="nope"), ValueError, "objective must be one of"),
    (lambda: O.opd_loss(zs4, zt4, objective=None), ValueError, "objective must be one of"),
    (lambda: O.OPDLoss(objective="nope"), ValueError, "objective must be one of"),
    (lambda: O.opd_loss(zs4, zt4, objective="sampled"), ValueError, "objective='sampled' needs tokens"),
    (lambda: O.fused_linear_opd_loss(hs4, ws4, ht4, wt4, objective="sampled"), ValueError, "objective='sampled' needs tokens"),
    (lambda: O.opd_loss(zs4, zt4, tokens=torch.tensor([0, 1, 2, 3]), ignore_index=1.5), TypeError, "ignore_index must be"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        call()


class _NoMixture(Backend):
    name = "torch"
    capabilities = Capabilities(forms=frozenset({"logits", "fused_linear"}), devices=frozenset({"cpu"}),
                                dtypes=frozenset({torch.float32, torch.float64}),
                                quantities=frozenset(Need) - {Need.MIXTURE})

    def loss(self, call):
        raise AssertionError("resolve should have refused the call")


def test_backend_lacking_a_need_refuses_naming_objective_and_backend(monkeypatch):
    fake = _NoMixture()
    monkeypatch.setattr(backends, "_find", lambda name, form: fake)
    with pytest.raises(ValueError, match=r"objective 'jsd' needs a second pass.*backend='torch' \(logits\)"):
        O.opd_loss(zs4, zt4, objective="jsd", beta=0.3, backend="torch")
    with pytest.raises(ValueError, match=r"objective 'jsd' needs .*backend='triton' \(fused_linear\)"):
        backends.resolve("triton", "fused_linear", [hs4], objective=objectives.get("jsd"),
                         needs=objectives.get("jsd").needs({"beta": 0.5}))
    # the endpoints are plain KLs: no mixture pass needed, so the backend is taken
    assert backends.resolve("torch", "logits", [zs4], objective=objectives.get("jsd"),
                            needs=objectives.get("jsd").needs({"beta": 1.0})) is fake
