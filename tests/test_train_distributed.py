"""opd_train on two processes (gloo on CPU, FSDP2), on the tiny models of conftest: two processes'
steps equal one process's on the same global batch, an interrupted and resumed two-process run
ends with the weights of an uninterrupted one, and bad set-ups are clear errors, never a hang.

Each process is launched as torchrun launches it (its environment: MASTER_ADDR, RANK, ...), by
tests/rank_main.py; one test goes through torchrun itself."""
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from opd_kernels.backends import native
from opd_train import config, distributed, heldout, train
from opd_train.batching import micro_batches, shared_micro_batches
from opd_train.checkpoint import latest_checkpoint, model_dir
from opd_train.cli import INTERRUPTED, main
from opd_train.errors import UsageError
from opd_train.rollout import Batch
from two_ranks import free_port

RANK_MAIN = os.path.join(os.path.dirname(__file__), "rank_main.py")
TIMEOUT_S = 240  # a run here takes seconds; a hang fails the test instead of stalling the suite

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(root, out, *extra):
    return ["--student", str(root / "student"), "--teacher", str(root / "teacher"),
            "--prompts", str(root / "prompts.jsonl"), "--output-dir", str(out),
            "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "8",
            "--lr", "1e-2", "--k", "4", "--seed", "5", *extra]


def _environment(**extra) -> dict:
    # The native CPU kernels are built (or found unavailable) here, once, so that every process
    # of every run loads the same cached build and runs the same kernels: a bitwise comparison
    # of two runs needs the same path in both.
    native.available()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(RANK_MAIN)),
                                         env.get("PYTHONPATH", "")])
    return env


def _ranks(argvs: list, **extra) -> list:
    """[(exit status, stderr)] of one process per argv, joined as ranks 0.. of one group. Their
    output goes to files: a full pipe would block a process, and the others with it."""
    port, size = free_port(), len(argvs)
    logs = [tempfile.TemporaryFile("w+") for _ in argvs]
    procs = [subprocess.Popen([sys.executable, RANK_MAIN, *argv], stdout=subprocess.DEVNULL, stderr=log,
                              env=_environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                               WORLD_SIZE=str(size), RANK=str(rank), LOCAL_RANK=str(rank),
                                               LOCAL_WORLD_SIZE=str(size), **extra))
             for rank, (argv, log) in enumerate(zip(argvs, logs))]
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outcomes = []
    for code, log in zip(codes, logs):
        log.seek(0)
        outcomes.append((code, log.read()))
        log.close()
    return outcomes


def _weights(out):
    return load_file(os.path.join(model_dir(latest_checkpoint(str(out / "checkpoints"))), "model.safetensors"))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_step_like_one_on_the_same_global_batch(setup, tmp_path, monkeypatch,
                                                              one_torch_thread):
    """Greedy rollouts (the same global batch however it is split): each of two processes trains
    on half of the step's rollouts, the student sharded by FSDP2, one rollout a micro-batch
    (FSDP gathers the shards and reduce-scatters the gradient at each). The logged loss and
    gradient norm (before clipping: a wrong normalization shows there, where AdamW's update
    would hide it) and the weights after two clipped steps equal one process's, to fp32
    rounding (the gradient is summed in another order); so do the held-out accuracy and
    diagnostics, each process taking its share of the prompts (an odd count: one process pads
    its share, and the padding counts nowhere). The one process runs on one thread, as each of
    the two does (OMP_NUM_THREADS=1): the same GEMM summation order, so that no greedy choice
    between near-tied tokens goes another way."""
    common = ("--steps", "2", "--objective", "full", "--max-grad-norm", "0.05",
              "--micro-batch-tokens", "20", "--eval-file", str(setup / "eval.jsonl"),
              "--eval-max-prompts", "7")
    for module in (train, heldout):  # as rank_main does
        monkeypatch.setattr(module, "generate", functools.partial(module.generate, greedy=True))
    one = tmp_path / "one"
    assert main(_args(setup, one, *common)) == 0
    two = tmp_path / "two"
    outcomes = _ranks([_args(setup, two, *common)] * 2, OPD_TEST_GREEDY="1")
    assert [code for code, _ in outcomes] == [0, 0], outcomes[0][1][-3000:]

    for a, b in zip(_rows(one), _rows(two)):
        for key in ("loss", "grad_norm", "reverse_kl", "overlap", "response_length", "rollout_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    held = [[json.loads(line) for line in (out / heldout.FILE).read_text().splitlines()] for out in (one, two)]
    assert [r["step"] for r in held[0]] == [r["step"] for r in held[1]] == [0, 2]
    for a, b in zip(*held):
        for key in ("reverse_kl", "overlap", "student_entropy", "token_reward", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert _rows(one)[0]["grad_norm"] > 0.05  # the clipping acted
    expected, got = _weights(one), _weights(two)
    assert expected.keys() == got.keys()
    # AdamW's first steps move a weight by about lr = 1e-2 a step whatever its gradient's size,
    # so one with a gradient near 0 carries the rounding of a sum taken in another order: 2e-5
    # is 0.1% of the two steps' movement, which a wrong gradient changes by its whole size
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=2e-5, msg=name)
    start = load_file(str(setup / "student" / "model.safetensors"))
    assert not torch.equal(got["model.norm.weight"], start["model.norm.weight"])  # the root's train too
    one_eval, two_eval = (json.loads((out / "eval.json").read_text()) for out in (one, two))
    assert {k: one_eval[k] for k in ("student_before", "student_after", "teacher")} == \
        {k: two_eval[k] for k in ("student_before", "student_after", "teacher")}


def test_interrupted_and_resumed_on_two_processes_equals_uninterrupted(setup, tmp_path, capsys):
    """A SIGINT reaching one process during step 2 (of 4): both finish that step, checkpoint it
    (torch.distributed.checkpoint, each its shards and RNG state) and stop; --resume on two
    processes then ends with weights bitwise equal to an uninterrupted run's (the rollouts are
    sampled from seeds of (seed, step, rank), the shards and AdamW state restored exactly)."""
    common = ("--steps", "4", "--save-every", "3", "--objective", "sampled")
    straight, out = tmp_path / "straight", tmp_path / "interrupted"
    assert [code for code, _ in _ranks([_args(setup, straight, *common)] * 2)] == [0, 0]
    stopped = _ranks([_args(setup, out, *common)] * 2, OPD_TEST_SIGINT="2:1")
    assert [code for code, _ in stopped] == [INTERRUPTED] * 2, stopped[0][1][-3000:]
    assert latest_checkpoint(str(out / "checkpoints")).endswith("step-000002")
    # one process cannot take over a two-process run: said before any work
    assert main(["--resume", str(out)]) == 2
    assert "the run was made on 2 process(es), this is 1" in capsys.readouterr().err
    resumed = _ranks([["--resume", str(out)]] * 2)
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:]

    expected, got = _weights(straight), _weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in _rows(straight)]


class _BusierPeer(distributed.World):
    """A process of two whose peer needs two more micro-batches than it does."""

    def most(self, value: int) -> int:
        return value + 2


def test_micro_batches_as_many_as_asked():
    """Processes sharding a model run the same number of forwards: micro_batches splits into at
    least ``count`` pieces (at most one a row), each within the budget, every row once; a
    process takes as many as the busiest one needs."""
    lengths, responses = [9, 7, 7, 6, 5, 3], [4, 2, 3, 1, 2, 1]
    width = 12
    batch = Batch(torch.zeros(6, width, dtype=torch.long), torch.ones(6, width, dtype=torch.long),
                  torch.zeros(6, width, dtype=torch.bool), 8, responses, lengths)
    natural = len(micro_batches(batch, 40))
    for count in (natural, natural + 1, 6, 9):
        parts = micro_batches(batch, 40, count)
        assert len(parts) == min(max(count, natural), 6)
        assert sorted(n for p in parts for n in p.lengths) == sorted(lengths)
        assert all(p.input_ids.numel() <= 40 for p in parts)
    assert len(shared_micro_batches(batch, 40, _BusierPeer(size=2, launched=True))) == natural + 2
    assert len(shared_micro_batches(batch, 40, distributed.SINGLE)) == natural


@pytest.mark.parametrize("options, dropped, message", [
    (("--prompts-per-step", "3", "--rollouts-per-prompt", "1"), None,
     "--prompts-per-step 3 x --rollouts-per-prompt 1 = 3 rollouts a step do not split evenly over 2 processes"),
    (("--cold-start",), None, "--cold-start works in one process only"),
    (("--teacher-server", "http://localhost:8000"), "--teacher", "--teacher-server works in one process only"),
    (("--device", "cuda:1"), None,
     "--device cuda:1: under torchrun each process takes the GPU of its LOCAL_RANK"),
    ((), "--output-dir", "--output-dir DIR is required under torchrun"),
])
def test_options_that_cannot_work_on_two_processes(setup, tmp_path, options, dropped, message):
    """What a run on several processes refuses, checked on the command line's options (before
    resolve: before any file is touched); ``dropped``: an option (and its value) left out."""
    argv = _args(setup, tmp_path / "r", "--steps", "1", *options)
    if dropped:
        del argv[argv.index(dropped):argv.index(dropped) + 2]
    cfg, _ = config.from_args(argv)
    with pytest.raises(UsageError, match=re.escape(message)):
        distributed.check_options(cfg, distributed.World(rank=1, size=2, launched=True))
    distributed.check_options(cfg, distributed.SINGLE)  # one process takes them


def test_processes_given_different_options(setup, tmp_path):
    """Every process reaches the one check and stops there; the main process says what differs."""
    outcomes = _ranks([_args(setup, tmp_path / "r", "--steps", "1"),
                       _args(setup, tmp_path / "r", "--steps", "1", "--lr", "1e-3")])
    assert [code for code, _ in outcomes] == [2, 2]
    assert ("error: the processes were given different options (--lr: rank 0 0.01, rank 1 0.001)"
            in outcomes[0][1]) and "error" not in outcomes[1][1]
    assert not (tmp_path / "r").exists()


def test_one_process_failing_stops_every_process(setup, tmp_path):
    """A set-up error on one process only (its output folder is a file) stops all of them at the
    same point, the main process naming the one that failed."""
    (tmp_path / "file").write_text("")
    outcomes = _ranks([_args(setup, tmp_path / "r", "--steps", "1"),
                       _args(setup, tmp_path / "file", "--steps", "1")])
    assert [code for code, _ in outcomes] == [2, 2]
    assert f"error: rank 1: --output-dir {tmp_path / 'file'}: exists and is not a folder" in outcomes[0][1]


def test_torchrun_with_a_step_that_does_not_split(setup, tmp_path):
    """Through torchrun itself (its rendezvous and environment): a global batch that does not
    divide over the processes is the error on its output, and the launch fails."""
    argv = _args(setup, tmp_path / "r", "--steps", "1", "--prompts-per-step", "3",
                 "--rollouts-per-prompt", "1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                           "-m", "opd_train", *argv], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=_environment())
    assert proc.returncode != 0
    assert "error: --prompts-per-step 3 x --rollouts-per-prompt 1 = 3 rollouts a step do not split " \
           "evenly over 2 processes" in proc.stderr + proc.stdout


def test_the_embedded_default_on_two_processes(tmp_path):
    """``torchrun --nproc-per-node 2 -m opd_train`` as the README gives it (two steps, the demo
    models trained by rank 0 into an empty cache while the other waits): the run folder of one
    process, a sharded checkpoint with each rank's RNG state and a Hugging Face export."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                           "-m", "opd_train", "--steps", "2", "--output-dir", str(out),
                           "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=600, env=_environment())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    step = out / "checkpoints" / "step-000002"
    assert {p.name for p in step.iterdir()} >= {"dcp", "model", "rng-rank-0.pt", "rng-rank-1.pt"}
    exported = load_file(str(step / "model" / "model.safetensors"))
    assert exported and all(torch.isfinite(t).all() for t in exported.values())
    assert (out / "eval.json").exists() and (out / "diagnostics.png").exists()
