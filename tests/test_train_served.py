"""opd_train against a served teacher (--teacher-server): the vLLM-format test server
(opd_train.teacher_server) on 127.0.0.1 serving a tiny random-init teacher, end to end on CPU.
A run against it equals, step for step, a run whose teacher answers in-process (its top-K from
its own logits); each fault (down at start, a 500, a slow answer, a truncated body) is retried
or ends with a clear message, keeping the checkpoints, and --resume then finishes the run."""
import json
import math
import os
import socket

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd_train import config, served, task
from opd_train.checkpoint import latest_checkpoint, model_dir
from opd_train.cli import main
from opd_train.errors import UsageError
from opd_train.teacher_client import TeacherTopK
from opd_train.teacher_server import Fault, TeacherServer
from opd_train.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = len(build_char_tokenizer(task.ALPHABET))
# Requests a run makes, in order (for faults on a chosen one): connect's probe, the held-out
# diagnostics of step 0 (2 prompts), then 4 rollouts a step (2 prompts x 2 rollouts).
PROBE, HELDOUT, PER_STEP = 1, 2, 4
STEP_3 = PROBE + HELDOUT + 2 * PER_STEP + 1  # the first request of step 3


@pytest.fixture(scope="module")
def teacher(setup):
    return AutoModelForCausalLM.from_pretrained(str(setup / "teacher"), dtype=torch.float32).eval()


@pytest.fixture
def serve(teacher):
    """serve(faults=...) -> a started server (every id may be asked for), stopped after the test."""
    started = []

    def start(**options):
        started.append(TeacherServer(teacher, max_logprobs=-1, **options).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


class InProcessTeacher:
    """The client's answer computed in-process: the teacher's log_softmax of its fp32 logits, one
    unpadded sequence at a time (as the server computes them), its top-K at each response position."""

    def __init__(self, model, topk):
        self.model, self.topk = model, topk

    @torch.no_grad()
    def score(self, sequences, starts):
        width = max(len(s) - p for s, p in zip(sequences, starts))
        out = TeacherTopK(torch.zeros(len(sequences), width, self.topk, dtype=torch.int64),
                          torch.zeros(len(sequences), width, self.topk), torch.zeros(len(sequences), width,
                          dtype=torch.int64), torch.zeros(len(sequences), width),
                          torch.zeros(len(sequences), width, dtype=torch.bool))
        for b, (seq, start) in enumerate(zip(sequences, starts)):
            logprobs = torch.log_softmax(self.model(torch.tensor([seq])).logits[0].float(), -1)[start - 1:-1]
            n, tokens = len(seq) - start, torch.tensor(seq[start:])
            out.logprobs[b, :n], out.ids[b, :n] = logprobs.topk(self.topk)
            out.token_ids[b, :n], out.token_logprobs[b, :n] = tokens, logprobs.gather(1, tokens[:, None])[:, 0]
            out.mask[b, :n] = True
        return out


def _args(root, out, url, *extra):
    return ["--student", str(root / "student"), "--teacher-server", url,
            "--prompts", str(root / "prompts.jsonl"), "--eval-file", str(root / "eval.jsonl"),
            "--eval-diagnostics-prompts", "2", "--output-dir", str(out), "--prompts-per-step", "2",
            "--rollouts-per-prompt", "2", "--max-new-tokens", "8", "--lr", "1e-2", "--k", "4",
            "--seed", "5", "--steps", "3", "--teacher-timeout-s", "2", "--teacher-attempts", "3",
            "--teacher-backoff-s", "0.01", "--objective", "teacher_topk", *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    return load_file(os.path.join(model_dir(latest_checkpoint(str(out / "checkpoints"))), "model.safetensors"))


def _assert_same_run(a, b):
    assert [r["loss"] for r in _rows(a)] == [r["loss"] for r in _rows(b)]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.parametrize("objective, topk", [("topk", VOCAB), ("teacher_topk", 6), ("sampled", 6)])
def test_served_run_equals_in_process_sparse_teacher(setup, teacher, serve, tmp_path, monkeypatch,
                                                     objective, topk):
    server = serve()
    extra = ("--objective", objective, "--teacher-topk", str(topk))
    assert main(_args(setup, tmp_path / "served", server.url, *extra)) == 0
    assert server.requests == PROBE + 2 * HELDOUT + 3 * PER_STEP  # one request a rollout
    rows = _rows(tmp_path / "served")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    # diagnostics from what a served teacher gives: no reverse KL, the teacher's entropy a bound
    assert "reverse_kl" not in rows[0] and {"overlap", "teacher_entropy_lower_bound", "token_reward"} <= set(rows[0])
    heldout = [json.loads(line) for line in (tmp_path / "served" / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in heldout] == [0, 3] and "teacher_entropy_lower_bound" in heldout[0]
    results = json.loads((tmp_path / "served" / "eval.json").read_text())
    assert "student_after" in results and "teacher" not in results  # the server only scores

    monkeypatch.setattr(served, "connect", lambda cfg, vocab, probe: InProcessTeacher(teacher, topk))
    assert main(_args(setup, tmp_path / "in_process", server.url, *extra)) == 0
    _assert_same_run(tmp_path / "served", tmp_path / "in_process")


@pytest.mark.parametrize("fault", [Fault(status=500), Fault(delay_s=3.0), Fault(truncate=True)],
                         ids=["500", "slow", "truncated"])
def test_a_fault_mid_run_is_retried_and_changes_nothing(setup, serve, tmp_path, fault):
    clean = serve()
    assert main(_args(setup, tmp_path / "clean", clean.url)) == 0
    faulty = serve(faults=lambda n: fault if n == STEP_3 else None)
    assert main(_args(setup, tmp_path / "faulty", faulty.url)) == 0
    assert faulty.requests == clean.requests + 1
    _assert_same_run(tmp_path / "clean", tmp_path / "faulty")


def test_server_down_at_start(setup, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "run"
    assert main(_args(setup, out, url)) == 2
    err = capsys.readouterr().err
    assert f"--teacher-server {url}" in err and "after 3 attempts" in err and "Traceback" not in err
    assert not out.exists()  # nothing done: no run folder, no evaluation


def test_always_truncated_stops_keeping_the_checkpoint_and_resume_finishes(setup, serve, tmp_path, capsys):
    clean = serve()
    assert main(_args(setup, tmp_path / "clean", clean.url)) == 0
    out = tmp_path / "run"
    broken = serve(faults=lambda n: Fault(truncate=True) if n >= STEP_3 else None)
    # --save-every 0: only the failure's own checkpoint holds steps 1-2
    assert main(_args(setup, out, broken.url, "--save-every", "0")) == 1
    err = capsys.readouterr().err
    assert "step 3, the served teacher" in err and "after 3 attempts" in err and "IncompleteRead" in err
    assert f"--resume {out}" in err and "Traceback" not in err
    assert latest_checkpoint(str(out / "checkpoints")).endswith("step-000002")
    assert [r["step"] for r in _rows(out)] == [1, 2]
    # the server is back, elsewhere: --resume with its new URL ends as the uninterrupted run
    assert main(["--resume", str(out), "--teacher-server", serve().url]) == 0
    _assert_same_run(tmp_path / "clean", out)


def test_a_student_id_beyond_the_teachers_top_k_is_a_clear_message(setup, serve, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(setup, out, serve().url, "--objective", "topk", "--teacher-topk", "4")) == 1
    err = capsys.readouterr().err
    assert "no log-prob for id" in err and "--teacher-topk cannot change on --resume" in err
    assert "Traceback" not in err and not latest_checkpoint(str(out / "checkpoints"))


@pytest.mark.parametrize("extra, message", [
    (("--objective", "full"), "with --teacher-server use one of sampled, teacher_topk"),
    (("--temperature", "0.5"), "--loss-temperature 0.5: a served teacher's log-probs are of its raw logits"),
    (("--teacher-topk", "3"), "--k 4 > --teacher-topk 3"),
    (("--teacher-topk", "0"), "--teacher-topk must be >= 1"),
    (("--teacher", "T"), "--teacher-server replaces --teacher"),
    (("--cold-start",), "--cold-start samples responses from the teacher"),
    (("--prompt-template", "teacher"), "--prompt-template teacher needs the teacher's tokenizer"),
])
def test_options_are_checked_before_any_work(setup, tmp_path, extra, message):
    cfg, _ = config.from_args(_args(setup, tmp_path / "run", "http://localhost:8000", *extra))
    with pytest.raises(UsageError, match=message):
        config.resolve(cfg)


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://host:1", "http://host:x",
                                 "http://host:8000/v1", "http://host:8000/v1/completions"])
def test_the_url_must_be_a_server_root(setup, tmp_path, url):
    cfg, _ = config.from_args(_args(setup, tmp_path / "run", url))
    with pytest.raises(UsageError, match="--teacher-server"):
        config.resolve(cfg)


def test_served_options_need_a_server_and_k_fits_the_vocabulary(setup, serve, tmp_path, capsys):
    with pytest.raises(UsageError, match="--teacher-topk: options of a served teacher"):
        config.from_args(["--teacher-topk", "8"])
    cfg, _ = config.from_args(["--student", str(setup / "student"), "--teacher", str(setup / "teacher"),
                               "--prompts", str(setup / "prompts.jsonl"), "--objective", "teacher_topk",
                               "--output-dir", str(tmp_path / "dense")])
    with pytest.raises(UsageError, match="teacher_topk is for a served teacher's top-K answer"):
        config.resolve(cfg)
    assert main(_args(setup, tmp_path / "run", serve().url, "--teacher-topk", str(VOCAB + 1))) == 2
    assert f"--teacher-topk {VOCAB + 1}: the student's vocabulary has only {VOCAB} ids" in capsys.readouterr().err
