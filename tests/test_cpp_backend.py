"""What is specific to the native CPU backend (csrc/, backends/cpp_logits.py, cpp_fused.py): its
custom ops (torch.library.opcheck, torch.compile), bf16 inputs against the float64 oracle, the
registry's choice, the fallback when the extension cannot be built, and its memory. The
objectives, edge cases and bad input run on it in the backend-parametrized suites
(test_triton_logits.py, test_triton_fused_objectives.py, test_edge_cases.py, test_errors.py,
test_served_teacher.py)."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import opd_kernels as O
from bench import cpu_native
from opd_kernels import backends, objectives, reference
from opd_kernels.backends import cpp_fused, logits_form, native

OPS = native.ops()
needs_native = pytest.mark.skipif(OPS is None, reason="the native extension could not be built")


def _logits(n, v, seed, dtype=torch.float32):
    return (torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


# ---- the custom ops --------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    s, t = _logits(5, 300, 0, dtype), _logits(5, 300, 1, dtype)
    # no NaN in the outputs (opcheck's comparison takes NaN for a mismatch): every row counted,
    # and a teacher close to the student, so that S and T always meet
    tokens, mask = torch.tensor([0, 3, 299, 7, 1]), torch.ones(5, dtype=torch.bool)
    near = (s.float() * 1.3 + 0.1 * t.float()).to(dtype)
    for args in [(s, None, None, None, 0, 1.0, 0.0, 0.0), (s, near, tokens, mask, 4, 0.7, 0.0, 3.0),
                 (s[:, :200], None, None, None, 200, 2.0, 5.0, 0.0)]:
        torch.library.opcheck(OPS.row_pass.default, args)
    fields, _ = OPS.row_pass(s, t, None, mask, 0, 0.7, 0.0, 0.0)
    torch.library.opcheck(OPS.mixture.default, (s, t, fields, mask, 0.7, 0.0, 0.0, 0.3))
    shift, scale = torch.randn(5), torch.rand(5)
    for teacher, w in [(t, (1.0, 0.0, 0.0)), (t, (0.0, -1.0, 0.0)), (t, (0.0, 0.0, 0.7)), (None, (0.0,) * 3)]:
        out = torch.empty(5, 300, dtype=dtype)
        torch.library.opcheck(OPS.dense_grad.default,
                              (s, teacher, fields, shift, scale, mask, 0.7, 0.0, 0.0, *w, 0.3, out))
    for form, k, caps in [(objectives.get("full").row_grad_form({}), 0, (0.0, 0.0)),
                          (objectives.get("jsd").row_grad_form({"beta": 0.3}), 4, (5.0, 3.0))]:
        out = torch.empty(5, 300, dtype=dtype)
        torch.library.opcheck(OPS.row_pass_grad.default, (
            s.float(), near.float(), tokens, mask, k, 0.7, *caps, logits_form.shift_coefficients(form),
            form.reverse, form.forward, form.mixture, form.beta, scale, out))


@needs_native
def test_ops_name_their_bad_arguments():
    s = _logits(3, 10, 0)
    with pytest.raises(RuntimeError, match="teacher must match"):
        OPS.row_pass(s, _logits(3, 11, 1), None, None, 0, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="student must be float32 or bfloat16"):
        OPS.row_pass(s.half(), None, None, None, 0, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="mask must be a contiguous \\[3\\] tensor"):
        OPS.row_pass(s, None, None, torch.ones(2, dtype=torch.bool), 0, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="tokens must lie in \\[0, 10\\)"):
        OPS.row_pass(s, None, torch.tensor([0, 10, 1]), None, 0, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="k must lie in \\[0, 10\\]"):
        OPS.row_pass(s, None, None, None, 11, 1.0, 0.0, 0.0)
    coefs, scale, out = torch.zeros(len(logits_form.FIELDS) + 3), torch.ones(3), torch.empty(3, 10)
    form = lambda coefs=coefs, out=out, mixture=0.0, beta=0.5: (coefs, 1.0, 0.0, mixture, beta, scale, out)
    with pytest.raises(RuntimeError, match="student and teacher must be float32 logits"):
        OPS.row_pass_grad(s.bfloat16(), s.bfloat16(), None, None, 0, 1.0, 0.0, 0.0, *form())
    with pytest.raises(RuntimeError, match="shift_coefs must be a contiguous \\[19\\] tensor"):
        OPS.row_pass_grad(s, s, None, None, 0, 1.0, 0.0, 0.0, *form(coefs=coefs[:5]))
    with pytest.raises(RuntimeError, match="out must be a \\[rows, vocab\\] tensor"):
        OPS.row_pass_grad(s, s, None, None, 0, 1.0, 0.0, 0.0, *form(out=out[:, :5]))
    with pytest.raises(RuntimeError, match="beta must lie strictly inside \\(0, 1\\), got 1"):
        OPS.row_pass_grad(s, s, None, None, 0, 1.0, 0.0, 0.0, *form(mixture=0.5, beta=1.0))


@needs_native
def test_torch_compile_holds_the_ops():
    """A compiled graph holds the ops (fullgraph: no break around them), and a compiled
    forward+backward through the public loss equals the eager one."""
    s, t = _logits(4, 500, 2), _logits(4, 500, 3)
    lse = torch.compile(lambda z: OPS.row_pass(z, None, None, None, 0, 1.0, 0.0, 0.0)[0][0],
                        backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(lse(s), torch.logsumexp(s, -1))

    def step(x):
        loss = O.opd_loss(x, t, objective="jsd", beta=0.3, backend="cpp")
        loss.backward()
        return loss.detach(), x.grad

    compiled = torch.compile(step, backend="aot_eager")
    eager_loss, eager_grad = step(s.clone().requires_grad_())
    loss, grad = compiled(s.clone().requires_grad_())
    assert torch.equal(loss, eager_loss) and torch.equal(grad, eager_grad)


@needs_native
@pytest.mark.parametrize("objective,params", [("full", {}), ("forward_kl", {}), ("jsd", {"beta": 0.3})])
@pytest.mark.parametrize("k,caps,out_dtype", [(0, (0.0, 0.0), torch.float32),
                                              (4, (5.0, 4.0), torch.float32),
                                              (0, (0.0, 6.0), torch.bfloat16)])
def test_row_pass_grad_against_float64(objective, params, k, caps, out_dtype):
    """The row pass and a RowGradForm's gradient in one op: fields and ids equal to row_pass's,
    the JSD's mixture sums and the gradient (written over the teacher's logits in fp32) to the
    float64 ones on rows of three blocks whose max moves in the later blocks (each block's exps
    have their own center), a masked row, a temperature and soft-caps."""
    n, v, tau = 5, 2500, 0.7
    ramp = torch.linspace(0.0, 9.0, v)
    # a teacher near the student: far apart, the JSD's gradient cancels to fp32 noise in any
    # kernel (log p - log m - J_p with p >> q everywhere p matters)
    s = _logits(n, v, 8) + ramp
    t = 0.7 * s + _logits(n, v, 9)
    tokens, mask = torch.tensor([0, 2499, 1024, 7, 3]), torch.tensor([True, True, False, True, True])
    scale = torch.rand(n, generator=torch.Generator().manual_seed(10)) + 0.5
    form = objectives.get(objective).row_grad_form(params)
    fields, ids = OPS.row_pass(s, t, tokens, mask, k, tau, *caps)
    teacher = t.clone()  # fp32: the gradient goes over it, as on the fused-linear path
    out = teacher if out_dtype == torch.float32 else torch.empty(n, v, dtype=out_dtype)
    got_fields, got_ids, mixture = OPS.row_pass_grad(
        s, teacher, tokens, mask, k, tau, *caps, logits_form.shift_coefficients(form), form.reverse,
        form.forward, form.mixture, form.beta, scale, out)
    assert torch.equal(got_fields.nan_to_num(), fields.nan_to_num()) and torch.equal(got_ids, ids)
    capped = lambda z, c: z.double() if c == 0 else c * torch.tanh(z.double() / c)
    x_s, x_t = capped(s, caps[0]) / tau, capped(t, caps[1]) / tau
    log_p, log_q = x_s.log_softmax(-1), x_t.log_softmax(-1)
    beta = params.get("beta", 0.5)
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
    kl = lambda log_a, log_b: (log_a.exp() * (log_a - log_b)).sum(-1)
    r = objectives.PassResults(lse_s=torch.zeros(n), reverse_kl=kl(log_p, log_q),
                               forward_kl=kl(log_q, log_p), mixture_student=kl(log_p, log_m),
                               mixture_teacher=kl(log_q, log_m))
    if form.mixture:
        want = torch.stack([r.mixture_student, r.mixture_teacher]) * mask
        assert ((mixture.double() - want).abs().max() / want.abs().max()) < 2e-5
    truth = form.at(r).materialize(x_s, x_t) * scale.double()[:, None]
    if caps[0]:
        truth = truth * (1 - (capped(s, caps[0]) / caps[0]) ** 2)
    truth[~mask] = 0
    err = (out.double() - truth).abs().max() / truth.abs().max()
    assert err < (2e-5 if out_dtype == torch.float32 else 2**-8), err


@needs_native
@pytest.mark.parametrize("objective,params,fused", [("full", {}, True), ("forward_kl", {}, True),
                                                    ("jsd", {"beta": 1.0}, True),
                                                    ("jsd", {"beta": 0.3}, True),
                                                    ("sampled", {}, False)])
def test_gradient_in_forward_takes_row_pass_grad_where_the_form_allows(monkeypatch, objective,
                                                                      params, fused):
    """The fused-linear gradient in the forward takes the one-read kernel for an objective with
    a RowGradForm and the separate reads otherwise, with the same gradients."""
    calls = []
    kernels = cpp_fused.KERNELS
    counted = lambda *a: calls.append(1) or kernels.row_pass_grad(*a)
    monkeypatch.setattr(cpp_fused, "KERNELS", kernels._replace(row_pass_grad=counted))
    g = torch.Generator().manual_seed(11)
    hs, ws = torch.randn(6, 16, generator=g), torch.randn(1500, 16, generator=g)
    ht, wt = torch.randn(6, 8, generator=g), torch.randn(1500, 8, generator=g)
    tokens = torch.randint(0, 1500, (6,), generator=g)
    h = hs.clone().requires_grad_()
    O.fused_linear_opd_loss(h, ws, ht, wt, objective=objective, tokens=tokens, backend="cpp",
                            **params).backward()
    assert bool(calls) == fused
    h64 = hs.double().requires_grad_()
    reference.opd_loss(h64 @ ws.double().T, ht.double() @ wt.double().T, objective, tokens=tokens,
                       **params).backward()
    assert ((h.grad.double() - h64.grad).abs().max() / h64.grad.abs().max()) < 2e-5


# ---- bf16 against the float64 oracle -----------------------------------------------------------

@pytest.mark.parametrize("objective,params", [(n, {}) for n in objectives.names() if n != "jsd"]
                         + [("jsd", {"beta": 0.3})])
@needs_native
def test_bf16_logits_against_float64(objective, params):
    """bf16 logits are read exactly (fp32 accumulation): the values to fp32 accuracy of the
    float64 oracle on the same bf16 numbers; the gradient comes back in bf16: one rounding
    (2^-8 relative), or, for a form with a dense and a sparse part (sampled, topk_pg), each part
    rounded and their sum rounded again, as on the Triton kernels (terms near the largest
    gradient element: up to 4 roundings of it)."""
    both_parts = objective in ("sampled", "topk_pg")
    s, t = _logits(6, 700, 4, torch.bfloat16), _logits(6, 700, 5, torch.bfloat16)
    tokens = torch.tensor([0, 5, 699, 100, 3, 8])
    x = s.clone().requires_grad_()
    value = O.opd_loss(x, t, objective=objective, tokens=tokens, k=8, reduction="none",
                       backend="cpp", **params)
    value.sum().backward()
    x64 = s.double().requires_grad_()
    truth = reference.opd_loss(x64, t.double(), objective, tokens=tokens, k=8, reduction="none",
                               **params)
    truth.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    scale = lambda r: r.abs().max().clamp(min=1e-12)
    assert ((value.double() - truth).abs().max() / scale(truth)) < 2e-5
    roundings = 4 if both_parts else 1
    assert ((x.grad.double() - x64.grad).abs().max() / scale(x64.grad)) < roundings * 2**-8


@needs_native
def test_bf16_fused_linear_against_float64():
    g = torch.Generator().manual_seed(6)
    hs, ws = torch.randn(9, 32, generator=g).bfloat16(), (torch.randn(400, 32, generator=g) * 0.3).bfloat16()
    ht, wt = torch.randn(9, 16, generator=g).bfloat16(), (torch.randn(400, 16, generator=g) * 0.3).bfloat16()
    for reduction in ("none", "mean"):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = O.fused_linear_opd_loss(h, w, ht, wt, objective="full", reduction=reduction,
                                       backend="cpp")
        loss.sum().backward()
        h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
        truth = reference.opd_loss(h64 @ w64.T, ht.double() @ wt.double().T, "full",
                                   reduction=reduction)
        truth.sum().backward()
        assert h.grad.dtype == w.grad.dtype == torch.bfloat16
        torch.testing.assert_close(loss.double(), truth, rtol=2e-5, atol=1e-6)
        for ours, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
            assert ((ours.double() - want).abs().max() / want.abs().max()) < 8e-3


@needs_native
@pytest.mark.parametrize("objective", ["full", "sampled"])
def test_fused_linear_weight_grad_in_float64(objective):
    """weight_grad_dtype=float64 on the gradient-in-forward path (dW summed in float64, the
    sampled objective's sparse part too): the gradients match the float64 oracle."""
    g = torch.Generator().manual_seed(7)
    hs, ws = torch.randn(7, 16, generator=g), torch.randn(300, 16, generator=g) * 0.3
    ht, wt = torch.randn(7, 8, generator=g), torch.randn(300, 8, generator=g) * 0.3
    tokens = torch.randint(0, 300, (7,), generator=g)
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = O.fused_linear_opd_loss(h, w, ht, wt, objective=objective, tokens=tokens,
                                   weight_grad_dtype=torch.float64, backend="cpp")
    loss.backward()
    h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    reference.opd_loss(h64 @ w64.T, ht.double() @ wt.double().T, objective, tokens=tokens).backward()
    for ours, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert ((ours.double() - want).abs().max() / want.abs().max()) < 2e-5


# ---- the registry ------------------------------------------------------------------------------

@needs_native
def test_auto_picks_the_native_backend_for_cpu_fp32_and_bf16():
    z = torch.randn(2, 8)
    for form in ("logits", "fused_linear"):
        assert backends.resolve("auto", form, [z]).name == "cpp"
        assert backends.resolve("auto", form, [z.bfloat16()]).name == "cpp"
        assert backends.resolve("auto", form, [z.double()]).name == "torch"
    assert backends.resolve("auto", "logits", [z.half()]).name == "torch"
    with pytest.raises(TypeError, match="backend='cpp' takes"):
        backends.resolve("cpp", "logits", [z.double()])


# ---- no extension: the warning and the PyTorch path --------------------------------------------

FALLBACK = textwrap.dedent("""
    import warnings
    import torch
    import opd_kernels as O
    from opd_kernels import backends
    s, t = torch.randn(3, 50), torch.randn(3, 50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = [backends.resolve("auto", form, [s]).name for form in ("logits", "fused_linear")]
        loss = O.reverse_kl(s, t)
        try:
            O.reverse_kl(s, t, backend="cpp")
            forced = "ran"
        except ValueError as error:
            forced = str(error)
    ours = [str(w.message) for w in caught if "native CPU kernels" in str(w.message)]
    torch.testing.assert_close(loss, O.reverse_kl(s, t, backend="torch"))
    print(repr((chosen, len(ours), ours[0] if ours else "", forced)))
""")


@pytest.mark.parametrize("how", ["disabled", "no compiler"])
def test_without_the_extension_a_warning_and_the_pytorch_path(how, tmp_path):
    env = dict(os.environ)
    if how == "disabled":
        env[native.DISABLE_ENV] = "1"
    else:  # a fresh extension cache and a compiler that does not exist
        env.update(TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-c++"))
    out = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    chosen, warned, message, forced = eval(out.stdout.strip().splitlines()[-1])
    assert chosen == ["torch", "torch"]
    assert warned == 1 and "the PyTorch path runs instead" in message
    assert "backend='cpp' needs the native CPU kernels" in forced


# ---- memory ------------------------------------------------------------------------------------

@needs_native
def test_fused_full_forward_backward_grows_the_resident_size_by_under_64_mib():
    """At N = 2048, V = 65536, H = 64 (one [N, V] fp32 tensor: 512 MiB), under the allocator a
    user's process has (glibc's defaults, no tuning variable): the chunk buffers and dW only."""
    assert cpu_native.rss_growth_mib("cpp") < 64
