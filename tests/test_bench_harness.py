"""The benchmark harness on the CPU: a tiny run end to end, OOM as a result, absent peers,
the ops generated from the objectives' declarations, the baselines against the reference, the
roofline floors and the goal verdicts; the served-teacher ops likewise."""
import json
import sys

import pytest
import torch

from bench import __main__ as bench_main
from bench import baselines, correctness, registry, report, runner
from bench.impls import IMPLS, Impl, peer_status
from bench.registry import OPS, Case, ObjectiveOp
from bench.timing import Budget, measure
from bench.workloads import (Inputs, floor, fused_floor_flops, logits_floor_bytes, make_inputs,
                             objective_reads, served_answer_bytes, served_inputs)
import opd_kernels as O
from opd_kernels import objectives
from opd_kernels import reference as R
from opd_kernels.objectives import Need

TINY = registry.TINY
FAST = Budget(target_ms=0.0, min_reps=1, max_reps=1)


def tiny_config(impls, cases=None, **kw):
    cases = cases or [Case("reverse_kl", "logits", TINY, 4), Case("opd_topk", "fused", TINY, 4)]
    return runner.Config(cases=cases, impls=impls, device=torch.device("cpu"), dtype=torch.float32,
                         preset="cpu", budget=FAST, ceiling_copy_bytes=1 << 16,
                         ceiling_matmul_size=32, **kw)


def test_tiny_cpu_run_writes_json_and_markdown(tmp_path):
    ops = ("reverse_kl", "topk_overlap", "opd_sampled", "served_topk_K20")
    bench_main.main(["--cpu", "--models", "tiny", "--n", "4", "--ops", *ops, "--target-ms", "0",
                     "--min-reps", "1", "--no-png", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("cpu_*_cpu.json")
    payload = json.loads(path.read_text())
    jobs = {(r["op"], r["form"], r["mode"], r["impl"]): r for r in payload["rows"]}
    expected = {(op, form, mode, impl) for op in ops
                for form in registry.FORMS for mode in Case(op, form, TINY, 4).modes
                for impl in ("opd-cpp", "opd-torch", "eager")}
    assert set(jobs) == expected
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in jobs.values()), \
        [r["status"] for r in jobs.values() if r["status"] != "ok"]
    ours = jobs[("reverse_kl", "logits", "fwd+bwd", "opd-torch")]
    assert ours["speedup_vs"]["eager"] == pytest.approx(
        jobs[("reverse_kl", "logits", "fwd+bwd", "eager")]["median_ms"] / ours["median_ms"])
    assert payload["meta"]["ceilings"]["bandwidth_bytes_per_s"] > 0
    md = path.with_suffix(".md").read_text()
    assert "### logits form" in md and "### fused form" in md and "| opd_sampled | tiny | 4 |" in md
    assert "| served_topk_K20 | tiny | 4 |" in md


def _oom(case, mode, x, k, tau):
    def run():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return run


def test_oom_in_a_baseline_is_recorded_not_raised(monkeypatch):
    monkeypatch.setitem(IMPLS, "oom-baseline", Impl("oom-baseline", "pytorch", _oom))
    payload = runner.run(tiny_config(("opd-torch", "oom-baseline")), log=lambda *_: None)
    statuses = {(r["case"], r["mode"], r["impl"]): r["status"] for r in payload["rows"]}
    assert {s for (_, _, impl), s in statuses.items() if impl == "oom-baseline"} == {"OOM"}
    assert {s for (_, _, impl), s in statuses.items() if impl == "opd-torch"} == {"ok"}
    assert "OOM" in report.markdown(payload)


def test_measure_reports_errors_and_oom():
    def boom():
        raise ValueError("bad shape")
    assert measure(boom, lambda: None, torch.device("cpu"), FAST).status == "error: ValueError: bad shape"
    assert measure(lambda: _oom(None, None, None, 0, 1.0)(), lambda: None, torch.device("cpu"),
                   FAST).status == "OOM"


def test_absent_and_unusable_peers_are_listed(monkeypatch, tmp_path):
    (tmp_path / "liger_kernel").mkdir()
    (tmp_path / "liger_kernel" / "__init__.py").write_text("raise ImportError('needs CUDA')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "liger_kernel", raising=False)
    assert peer_status("liger_kernel").startswith("unusable: ImportError: needs CUDA")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert peer_status("cut_cross_entropy") == "absent"
    payload = runner.run(tiny_config(("opd-torch", "liger-fused-jsd", "cce")), log=lambda *_: None)
    assert payload["meta"]["peers"] == {"liger_kernel": "absent", "cut_cross_entropy": "absent",
                                        "trl": "absent"}
    assert payload["meta"]["impls"] == ["opd-torch"]
    assert {r["impl"] for r in payload["rows"]} == {"opd-torch"}
    assert "Peers: liger_kernel absent, cut_cross_entropy absent, trl absent." in \
        report.markdown(payload)


def test_priority_cases_get_every_implementation_first(monkeypatch):
    # The order is what is tested: an eager stand-in keeps inductor out of a quick test.
    monkeypatch.setitem(IMPLS, "compile", Impl("compile", "pytorch", IMPLS["eager"].build))
    first, second = Case("opd_topk", "fused", TINY, 4), Case("reverse_kl", "logits", TINY, 4)
    payload = runner.run(tiny_config(("opd-torch", "compile"), cases=[second, first],
                                     priority=frozenset([first])), log=lambda *_: None)
    order = [(r["op"], r["impl"]) for r in payload["rows"]]
    assert order == [("opd_topk", "opd-torch")] * 2 + [("opd_topk", "compile")] * 2 + \
        [("reverse_kl", "opd-torch")] * 2 + [("reverse_kl", "compile")] * 2


def test_time_budget_skips_instead_of_overrunning():
    payload = runner.run(tiny_config(("opd-torch",), time_budget_s=0.0), log=lambda *_: None)
    assert payload["rows"] and {r["status"] for r in payload["rows"]} == {"skipped: time budget"}


def test_one_op_per_registered_objective():
    """opd_<name> for every objective at its declared defaults; the parameters' ends as extra ops
    outside the presets; tokens and k read from the declarations."""
    generated = {op: o for op, o in OPS.items() if o is not None and o.teacher_k is None}
    defaults = {o.name: op for op, o in generated.items() if not o.params}
    assert defaults == {name: f"opd_{name}" for name in objectives.names()}
    assert set(registry.PRESET_OPS) == set(registry.STANDALONE) | set(defaults.values())
    beta = objectives.get("jsd").params["beta"]
    assert OPS["opd_jsd"].kwargs == {"beta": beta.default}
    assert OPS["opd_jsd_beta0"].kwargs == {"beta": 0.0} and OPS["opd_jsd_beta1"].kwargs == {"beta": 1.0}
    assert Need.MIXTURE in OPS["opd_jsd"].needs and Need.MIXTURE not in OPS["opd_jsd_beta0"].needs
    for op, o in generated.items():
        assert Case(op, "logits", TINY, 4).needs_tokens == (Need.TOKENS in o.spec.needs(o.kwargs))
    assert [op for op in generated if Case(op, "logits", TINY, 4).needs_tokens] == ["opd_sampled"]


SERVED = {op: o for op, o in OPS.items() if o is not None and o.teacher_k is not None}


def test_served_ops_for_every_served_objective_and_k():
    """served_<name>_K<K> for every objective that runs on a served teacher and each K; timed on
    the Qwen pair at N=8192 (quick and full, both forms) and on the CPU shapes."""
    assert {(o.name, o.teacher_k, o.params) for o in SERVED.values()} == {
        (name, teacher_k, ()) for name in objectives.names("served") for teacher_k in registry.SERVED_K}
    assert {op: (o.name, o.teacher_k) for op, o in SERVED.items()} == {
        f"served_{o.name}_K{o.teacher_k}": (o.name, o.teacher_k) for o in SERVED.values()}
    assert set(registry.SERVED_OPS) == set(SERVED) and not set(SERVED) & set(registry.PRESET_OPS)
    for name in ("quick", "full"):
        served = {(c.op, c.form, c.model, c.n) for c in registry.preset(name) if c.teacher_k}
        assert served == {(op, f, registry.QWEN, 8192) for op in SERVED for f in registry.FORMS}
    assert {(c.op, c.form) for c in registry.preset("cpu") if c.teacher_k} == {
        (op, f) for op in SERVED for f in registry.FORMS}


def _dense_pair(seed=0, n=6, vocab=97):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vocab, generator=g) * 3
    return Inputs(s, torch.randn(n, vocab, generator=g) + s, torch.randint(0, vocab, (n,), generator=g))


@pytest.mark.parametrize("op", list(SERVED))
def test_workload_serves_the_dense_teachers_answer(op):
    """The answer the workload takes from its dense teacher passes the library's checks and
    gives the loss the reference gives on that teacher (its top-K: k plays K)."""
    objective, tau, k = SERVED[op], 0.7, 5
    case, dense = Case(op, "logits", TINY, 6), _dense_pair()
    x = served_inputs(case, dense, k, tau)
    needs = objective.needs
    assert set(x.served) == {"teacher_ids", "teacher_logprobs"} \
        | ({"teacher_token_logprob"} if Need.TEACHER_AT_TOKENS in needs else set()) \
        | ({"teacher_logprobs_at"} if Need.SUPPORT in needs else set())
    assert x.teacher is None and x.served["teacher_ids"].shape == (6, objective.teacher_k)
    tokens = x.tokens if Need.TOKENS in needs else None
    ours = O.sparse_teacher_opd_loss(x.student, **x.served, objective=objective.name, tokens=tokens,
                                     k=k, temperature=tau, reduction="none", backend="torch")
    ref_k = objective.teacher_k if Need.TEACHER_TOPK in needs else k
    want = R.opd_loss(dense.student.double(), dense.teacher.double(), objective.name, tokens, ref_k,
                      None, tau, "none")
    torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-5)
    fused = make_inputs(Case(op, "fused", TINY, 6), torch.float32, torch.device("cpu"), False, k=k)
    assert fused.teacher is None and fused.teacher_weight is None
    O.fused_linear_sparse_teacher_opd_loss(fused.student, fused.student_weight, **fused.served,
                                           objective=objective.name, tokens=tokens, k=k)


@pytest.mark.parametrize("form", registry.FORMS)
@pytest.mark.parametrize("op", list(SERVED))
def test_served_baseline_matches_the_library(op, form):
    """The eager baseline (plain PyTorch on the materialized student logits and the answer)
    against the library: value and gradient of every student leaf."""
    case, tau, k = Case(op, form, TINY, 6), 0.7, 5
    x = make_inputs(case, torch.float32, torch.device("cpu"), True, k=k, temperature=tau)
    results = []
    for impl in ("opd-torch", "eager"):
        loss = IMPLS[impl].build(case, "fwd+bwd", x, k, tau)().mean()
        results.append((loss, torch.autograd.grad(loss, x.grad_leaves())))
    (ours, our_grads), (eager, eager_grads) = results
    torch.testing.assert_close(eager, ours, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_grads, our_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not IMPLS["compile"].applies(case, "fwd", tau)


def test_served_floors_follow_the_needs():
    """A served teacher costs no teacher read or product: the student's pass plus its answer
    (logits form), one student lm_head product plus the backward's (fused form)."""
    n, v, hs, ht, k = 8192, 151936, 1536, 3584, 16
    for op, o in SERVED.items():
        answer = served_answer_bytes(o, n, k)
        assert answer == n * (12 * o.teacher_k + 4 * (Need.TEACHER_AT_TOKENS in o.needs)
                              + 4 * k * (Need.SUPPORT in o.needs))
        dense_grad = o.name in ("sampled", "teacher_topk")  # shift terms: p at every id
        assert logits_floor_bytes(op, "fwd", n, v, 2, k) == 2 * n * v + answer
        assert logits_floor_bytes(op, "fwd+bwd", n, v, 2, k) == (6 if dense_grad else 4) * n * v + answer
        assert fused_floor_flops(op, "fwd", n, v, hs, ht, k) == 2 * n * v * hs
        sparse = {"topk": k, "teacher_topk_renormalized": o.teacher_k}.get(o.name)
        assert fused_floor_flops(op, "fwd+bwd", n, v, hs, ht, k) == (
            6 * n * v * hs if dense_grad else 2 * n * v * hs + 4 * n * sparse * hs)
    assert logits_floor_bytes("served_sampled_K20", "fwd", n, v, 2, k) < \
        logits_floor_bytes("opd_sampled", "fwd", n, v, 2, k) / 1.9
    # the served topk step: about the student's lm_head pass (the lse forward)
    ratio = fused_floor_flops("served_topk_K64", "fwd+bwd", n, v, hs, ht, k) / \
        fused_floor_flops("logsumexp", "fwd", n, v, hs, ht, k)
    assert 1 < ratio < 1.001


def test_a_new_objective_gets_ops_a_baseline_and_a_floor(monkeypatch):
    """Registering an objective is all it takes: its op, its eager baseline (its reference) and
    its roofline floor (from its needs) come with no bench code."""
    from opd_kernels.objectives import full

    class Scaled(type(full.OBJECTIVE)):
        name, summary = "toy_scaled", "2 KL(p || q), a test objective"
        params = {"scale": objectives.Param(2.0, 0.0, 4.0)}

        def reference(self, student, teacher, *, temperature=1.0, scale=2.0, **_):
            return scale * super().reference(student, teacher, temperature=temperature)

        def from_passes(self, r, scale=2.0):
            value, grad = super().from_passes(r)
            return scale * value, objectives.GradForm(shift=scale * grad.shift, reverse=scale)

    monkeypatch.setitem(objectives._discover(), "toy_scaled", Scaled())
    ops = registry.objective_ops()
    assert ops["opd_toy_scaled"] == ObjectiveOp("toy_scaled")
    assert ops["opd_toy_scaled_scale0"].kwargs == {"scale": 0.0}
    assert ops["opd_toy_scaled_scale4"].kwargs == {"scale": 4.0}
    monkeypatch.setattr(registry, "OPS", {**registry.OPS, **ops})
    monkeypatch.setattr(baselines, "OPS", registry.OPS)
    s, t = torch.randn(3, 11, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64)
    got = baselines.logits_op("opd_toy_scaled")(s, t, None, 4, 1.0)
    torch.testing.assert_close(got.double(), 2 * R.reverse_kl(s, t), rtol=1e-5, atol=1e-6)  # fp32
    assert objective_reads(ops["opd_toy_scaled"]) == objective_reads(OPS["opd_full"]) == (2, 2)


@pytest.mark.parametrize("op", [op for op in OPS if op not in registry.SERVED_OPS])
def test_baselines_match_reference(op):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 97, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(6, 97, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 97, (6,), generator=g)
    tau, k = 0.7, 5
    got = baselines.logits_op(op)(s, t, y, k, tau)
    if op == "topk_overlap":
        want = R.topk_overlap(s, t, k, tau).tensors().values()
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, equal_nan=True)
        return
    objective = OPS[op]
    if objective is not None:
        want = R.opd_loss(s, t, objective.name, y, k, None, tau, "none", **objective.kwargs)
    else:
        want = {"logsumexp": lambda: R.logsumexp(s, tau), "reverse_kl": lambda: R.reverse_kl(s, t, tau),
                "token_logprobs": lambda: R.token_logprobs(s, y, tau)}[op]()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), s)
    (want_grad,) = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_peers_time_the_objective_they_compute():
    """The KL peers apply to reverse_kl and to the objective that is that KL (its reference)."""
    from bench.impls import PEER_KL_OBJECTIVE

    s, t = torch.randn(3, 11, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64)
    torch.testing.assert_close(objectives.get(PEER_KL_OBJECTIVE).reference(s, t), R.reverse_kl(s, t))
    applies = IMPLS["liger-jsd"].applies
    assert {op for op in OPS if applies(Case(op, "logits", TINY, 4), "fwd", 1.0)} == \
        {"reverse_kl", f"opd_{PEER_KL_OBJECTIVE}"}


@pytest.mark.parametrize("op", ["opd_jsd_beta0", "opd_jsd", "opd_jsd_beta1", "opd_full"])
def test_trl_peer_computes_our_jsd(op):
    """TRL's ChunkedDivergenceFunction (its PyTorch fallback here) times the same loss as ours."""
    pytest.importorskip("trl")
    from bench.workloads import make_inputs

    case = Case(op, "fused", TINY, 6)
    assert IMPLS["trl-chunked-divergence"].applies(case, "fwd+bwd", 0.7)
    assert not IMPLS["trl-chunked-divergence"].applies(Case("opd_topk", "fused", TINY, 6), "fwd", 1.0)
    results = []
    for impl in ("trl-chunked-divergence", "opd-torch"):
        x = make_inputs(case, torch.float32, torch.device("cpu"), requires_grad=True)
        loss = IMPLS[impl].build(case, "fwd+bwd", x, 4, 0.7)()
        results.append((loss, torch.autograd.grad(loss, (x.student, x.student_weight))))
    (theirs, their_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_floors_follow_kernel_design():
    n, v = 16384, 151936
    # reverse KL forward + backward in bf16: 10 bytes an element; forward alone 4.
    assert logits_floor_bytes("reverse_kl", "fwd+bwd", n, v, 2, 16) == 10 * n * v
    assert logits_floor_bytes("reverse_kl", "fwd", n, v, 2, 16) == 4 * n * v
    assert logits_floor_bytes("opd_topk", "fwd+bwd", n, v, 2, 16) < \
        logits_floor_bytes("opd_full", "fwd+bwd", n, v, 2, 16)
    hs, ht, k, n = 1536, 3584, 16, 8192
    assert fused_floor_flops("opd_full", "fwd+bwd", n, v, hs, ht, k) == 2 * n * v * (hs + ht) + 4 * n * v * hs
    topk = fused_floor_flops("opd_topk", "fwd+bwd", n, v, hs, ht, k)
    assert 5 < fused_floor_flops("opd_full", "fwd+bwd", n, v, hs, ht, k) / topk < 8
    assert floor(Case("opd_full", "fused", registry.QWEN, n), "fwd", 2, k) == ("flops", 2 * n * v * (hs + ht))
    # from the declarations: forward KL and the jsd's endpoints move what the reverse KL does;
    # the jsd's mixture pass reads both again; sampled and topk_pg need the teacher's full pass
    # but their gradients read the student only.
    b = lambda op, mode="fwd+bwd": logits_floor_bytes(op, mode, n, v, 2, k)  # noqa: E731
    assert b("opd_forward_kl") == b("opd_jsd_beta0") == b("opd_jsd_beta1") == b("opd_full")
    assert b("opd_jsd", "fwd") == 2 * b("opd_full", "fwd") and b("opd_jsd") == 14 * n * v
    assert b("opd_sampled") == b("opd_topk_pg") == 8 * n * v
    f = lambda op: fused_floor_flops(op, "fwd", n, v, hs, ht, k)  # noqa: E731
    assert f("opd_jsd") == 2 * f("opd_full") and f("opd_topk_pg") == f("opd_full")


def test_presets_cover_every_op_and_form():
    quick, full = registry.preset("quick"), registry.preset("full")
    assert {(c.op, c.form) for c in quick} == {(op, f) for op in registry.PRESET_OPS + registry.SERVED_OPS
                                               for f in registry.FORMS}
    assert full[:len(quick)] == quick and len(set(full)) == len(full)
    assert {c.n for c in full if c.model == registry.QWEN} == set(registry.TOKEN_COUNTS)
    assert {c.model for c in full} == {registry.QWEN, registry.LLAMA, registry.GEMMA}


def _goal_payload(kl_fraction, full_ms, topk_ms, served_ms=1.2):
    def row(op, form, n, impl, ms, mode="fwd+bwd", **extra):
        return {"op": op, "form": form, "model": registry.QWEN.name, "n": n, "mode": mode,
                "impl": impl, "kind": "ours" if impl.startswith("opd") else "peer", "status": "ok",
                "median_ms": ms, "case": f"{op}/{form}/{n}", **extra}
    rows = [row("reverse_kl", "logits", 16384, "opd-triton", 1.0, fraction_of_floor=kl_fraction),
            row("reverse_kl", "logits", 16384, "eager", 9.0),
            row("opd_full", "fused", 8192, "opd-triton", full_ms, peak_extra_bytes=2**29),
            row("opd_topk", "fused", 8192, "opd-triton", topk_ms),
            row("logsumexp", "fused", 8192, "opd-triton", 1.0, mode="fwd"),
            row("served_topk_K20", "fused", 8192, "opd-triton", served_ms)]
    runner._speedups(rows)
    return {"meta": {"impls": ["opd-triton", "eager"]}, "rows": rows}


def test_goal_verdicts():
    verdicts = {g: (m, v) for g, m, _, v in report.goals(_goal_payload(0.85, 30.0, 10.0))}
    assert verdicts["reverse KL logits, N=16384, fwd+bwd: fraction of HBM floor"] == ("85%", "met")
    assert verdicts["reverse KL logits, N=16384, fwd+bwd: speedup vs eager"] == ("9.00x", "met")
    assert verdicts["reverse KL logits, N=16384, fwd+bwd: speedup vs liger-jsd"][0] == "not measured"
    assert verdicts["fused full, N=8192, fwd+bwd: peak extra memory"] == ("0.50 GiB", "met")
    assert verdicts["fused topk vs full, N=8192, fwd+bwd: speedup"] == ("3.00x", "met")
    served = "fused served topk (K={}), N=8192, fwd+bwd vs fused_linear_logsumexp fwd: time ratio"
    assert verdicts[served.format(20)] == ("1.20x", "met")
    assert verdicts[served.format(64)] == ("not measured", "–")
    slow = {g: v for g, _, _, v in report.goals(_goal_payload(0.5, 30.0, 20.0, served_ms=1.5))}
    assert slow[served.format(20)] == "not met"
    assert slow["reverse KL logits, N=16384, fwd+bwd: fraction of HBM floor"] == "not met"
    assert slow["fused topk vs full, N=8192, fwd+bwd: speedup"] == "not met"


def test_hopper_report_table():
    from bench.hopper_report import markdown

    rows = [{"kernel": "k[bf16]", "num_warps": 8, "num_stages": 3, "registers": 168, "spill_stores": 0,
             "spill_loads": 0, "shared_bytes": 98304, "hgmma": 12, "status": "ok", "compile_s": 1.0},
            {"kernel": "k[fp32]", "num_warps": 4, "num_stages": 2, "status": "error: X", "compile_s": 0.1}]
    md = markdown(rows, 90, "abc1234")
    assert "2 specializations: 1 compiled, 1 failed; 1 use HGMMA; 0 spill." in md
    assert "| k[bf16] | 8 | 3 | 168 | 0 | 0 | 98304 | 12 | 1.0 | ok |" in md
    assert "all_specs()` is empty" in markdown([], 90, "abc1234")


def test_correctness_check_runs_and_can_fail(capsys):
    assert correctness.main(["--device", "cpu", "--backend", "torch", "--dtypes", "fp32", "--n", "5",
                             "--vocab", "67", "--hidden", "8", "12", "--k", "3",
                             "--ops", "reverse_kl", "topk_overlap", "opd_topk", "opd_jsd",
                             "opd_jsd_beta0"]) == 0
    assert "0 failed" in capsys.readouterr().out
    ref = torch.tensor([1.0, float("nan"), 2.0])
    assert correctness.rel_error(ref + 1e-3, ref) == pytest.approx(1e-3 * 2 ** 0.5 / 5 ** 0.5, rel=1e-3)
    assert correctness.rel_error(torch.tensor([1.0, 0.0, 2.0]), ref) == float("inf")
    assert correctness.max_abs_error(torch.tensor([1.0, float("nan"), float("inf")]),
                                     torch.tensor([1.0, float("nan"), 2.0])) == float("inf")
