"""pytest-benchmark files for the CPU path: ``pytest bench/ --benchmark-only``.

The cases of ``python -m bench --cpu`` (small fp32 shapes), our "torch" backend against eager
PyTorch, one benchmark group per case and mode so that pytest-benchmark compares the two.
"""
import pytest
import torch

from bench.impls import CPU_IMPLS, IMPLS
from bench.registry import preset
from bench.runner import clear_grads, training_step
from bench.workloads import make_inputs

JOBS = [(case, mode) for case in preset("cpu") for mode in case.modes]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case, mode", JOBS, ids=[f"{c.op}-{c.form}-{c.n}-{m}" for c, m in JOBS])
def test_cpu_path(benchmark, case, mode, impl):
    if not IMPLS[impl].applies(case, mode, 1.0):
        pytest.skip(f"{impl} has no {case.op} {mode}")
    inputs = make_inputs(case, torch.float32, torch.device("cpu"), requires_grad=mode == "fwd+bwd")
    fn = IMPLS[impl].build(case, mode, inputs, 16, 1.0)
    benchmark.group = f"{case.label} {mode}"
    benchmark.extra_info.update(op=case.op, form=case.form, n=case.n, vocab=case.model.vocab)
    reset = clear_grads(inputs)
    step = training_step(fn, mode)
    benchmark.pedantic(step, setup=reset, rounds=5, warmup_rounds=1)
