"""The served-teacher client against a vLLM-format server on 127.0.0.1 (opd_train.teacher_server,
in-process, a tiny random-init Llama): its log-probs equal the in-process teacher's, bounded
concurrency changes nothing, and each fault (server down, a 500, a slow answer, a truncated or
malformed body) is retried or ends in a clear error, never in a partial answer."""
import copy
import json
import socket
import time
import urllib.request

import pytest
import torch

from opd_train import task
from opd_train.models import tiny_llama
from opd_train.teacher_client import (MalformedAnswer, MissingTeacherLogprob, TeacherClient,
                                      TeacherServerError, _decode, parse_completion)
from opd_train.teacher_server import Fault, TeacherServer
from opd_train.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 5
# short waits: each fault test costs well under a second
FAST = dict(timeout_s=2.0, attempts=3, backoff_s=0.01)


@pytest.fixture(scope="module")
def teacher():
    tok = build_char_tokenizer(task.ALPHABET)
    torch.manual_seed(0)
    return tiny_llama(tok, 32, 2, 2, 64).eval(), tok


@pytest.fixture(scope="module")
def rollouts(teacher):
    """8 rollouts of different prompt and response lengths."""
    vocab = teacher[0].config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [int(n) for n in torch.randint(1, 8, (8,), generator=g)]
    responses = [int(n) for n in torch.randint(1, 12, (8,), generator=g)]
    sequences = [torch.randint(0, vocab, (p + r,), generator=g).tolist() for p, r in zip(prompts, responses)]
    return sequences, prompts


@pytest.fixture
def serve(teacher):
    """serve(faults=..., max_logprobs=...) -> a started server, stopped after the test."""
    started = []

    def start(**options):
        server = TeacherServer(*teacher, max_logprobs=8, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _client(server, **options):
    return TeacherClient(server.url, topk=K, vocab_size=server.vocab_size, model="teacher",
                         **{**FAST, **options})


@pytest.fixture(scope="module")
def reference(teacher, rollouts):
    """The in-process teacher: log_softmax of its logits in fp32, top-K at each response position."""
    model, _ = teacher
    out = []
    with torch.no_grad():
        for seq, start in zip(*rollouts):
            logprobs = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)[start - 1:-1]
            top = logprobs.topk(K)
            token = logprobs.gather(1, torch.tensor(seq[start:])[:, None])[:, 0]
            out.append((top.indices, top.values, token))
    return out


def _assert_equals_reference(result, rollouts, reference):
    sequences, starts = rollouts
    longest = max(len(s) - p for s, p in zip(sequences, starts))
    assert result.ids.shape == (len(sequences), longest, K) and result.ids.dtype == torch.int64
    assert result.logprobs.dtype == result.token_logprobs.dtype == torch.float32
    for b, (seq, start) in enumerate(zip(sequences, starts)):
        n = len(seq) - start
        ids, logprobs, token = reference[b]
        assert result.mask[b].tolist() == [True] * n + [False] * (longest - n)
        assert torch.equal(result.ids[b, :n], ids)
        torch.testing.assert_close(result.logprobs[b, :n], logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.token_logprobs[b, :n], token, rtol=0, atol=1e-5)
        assert result.token_ids[b, :n].tolist() == seq[start:]
        assert not result.logprobs[b, n:].any() and not result.ids[b, n:].any()


def test_logprobs_equal_the_in_process_teacher(serve, rollouts, reference):
    server = serve()
    _assert_equals_reference(_client(server).score(*rollouts), rollouts, reference)
    assert server.requests == len(rollouts[0])


def test_bounded_concurrency_gives_the_same_answer(serve, rollouts):
    # the first requests slow enough to overlap even on a loaded machine
    server = serve(faults=lambda n: Fault(delay_s=0.6) if n <= 3 else None)
    parallel = _client(server, max_workers=3).score(*rollouts)
    assert 2 <= server.peak_in_flight <= 3
    serial = _client(server, max_workers=1).score(*rollouts)
    for field in ("ids", "logprobs", "token_ids", "token_logprobs", "mask"):
        assert torch.equal(getattr(parallel, field), getattr(serial, field)), field


def test_answer_format_is_vllms(serve, rollouts):
    server = serve()
    seq = rollouts[0][0]
    request = {"model": "teacher", "prompt": seq, "max_tokens": 1, "prompt_logprobs": K, "temperature": 1.0}
    answer = json.loads(urllib.request.urlopen(urllib.request.Request(
        server.url + "/v1/completions", data=json.dumps(request).encode())).read())
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
    assert isinstance(answer["created"], int) and answer["model"] == "teacher"
    assert answer["usage"] == {"prompt_tokens": len(seq), "completion_tokens": 1,
                               "total_tokens": len(seq) + 1, "prompt_tokens_details": None}
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(seq) and entries[0] is None
    for j, entry in enumerate(entries[1:], start=1):
        # the actual token first, then the top-K by rank; K or K + 1 entries
        assert next(iter(entry)) == str(seq[j])
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:K] == list(range(1, K + 1)) and len(entry) in (K, K + 1)
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())


def test_temperature_does_not_reach_prompt_logprobs(serve, rollouts):
    """As in vLLM: prompt log-probs are of the raw logits, whatever the request's temperature."""
    server = serve()
    at_one = _client(server).score(*rollouts)
    at_half = _client(server, temperature=0.5).score(*rollouts)
    assert torch.equal(at_one.logprobs, at_half.logprobs) and torch.equal(at_one.ids, at_half.ids)


def test_k_above_max_logprobs_is_refused_at_once(serve, rollouts):
    server = serve()
    client = TeacherClient(server.url, topk=9, vocab_size=server.vocab_size, max_workers=1, **FAST)
    with pytest.raises(TeacherServerError, match="HTTP 400.*Requested prompt logprobs of 9, which is "
                                                 "greater than max allowed: 8"):
        client.score(*rollouts)
    # no retry of the refusal, and the rest of the batch abandoned (the one worker may already
    # have sent the next rollout when the first failed)
    assert server.requests <= 2


def test_server_down_at_start(rollouts):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = TeacherClient(f"http://127.0.0.1:{port}", topk=K, vocab_size=22, **FAST)
    began = time.monotonic()
    with pytest.raises(TeacherServerError) as e:
        client.score(*rollouts)
    assert time.monotonic() - began < 2
    message = str(e.value)
    assert f"http://127.0.0.1:{port}/v1/completions" in message
    assert "after 3 attempts" in message and "refused" in message.lower()


def test_a_500_mid_batch_is_retried(serve, rollouts, reference):
    server = serve(faults=lambda n: Fault(status=500) if n == 4 else None)
    _assert_equals_reference(_client(server, max_workers=1).score(*rollouts), rollouts, reference)
    assert server.requests == len(rollouts[0]) + 1


def test_a_500_on_every_try_is_a_clear_error(serve, rollouts):
    server = serve(faults=lambda n: Fault(status=500) if n >= 2 else None)
    with pytest.raises(TeacherServerError, match="after 3 attempts; last error: HTTP 500.*injected fault"):
        _client(server, max_workers=1).score(*rollouts)


def test_a_slow_answer_past_the_timeout_is_retried(serve, rollouts, reference):
    server = serve(faults=lambda n: Fault(delay_s=1.0) if n == 1 else None)
    _assert_equals_reference(_client(server, timeout_s=0.3).score(*rollouts), rollouts, reference)


def test_always_slow_is_a_clear_error(serve, rollouts):
    server = serve(faults=lambda n: Fault(delay_s=0.6))
    with pytest.raises(TeacherServerError, match="after 2 attempts; last error: .*timed out"):
        _client(server, timeout_s=0.2, attempts=2, max_workers=8).score(*rollouts)


def test_a_truncated_body_is_retried(serve, rollouts, reference):
    server = serve(faults=lambda n: Fault(truncate=True) if n == 2 else None)
    _assert_equals_reference(_client(server, max_workers=1).score(*rollouts), rollouts, reference)
    assert server.requests == len(rollouts[0]) + 1


@pytest.mark.parametrize("fault, cause", [
    (Fault(truncate=True), "IncompleteRead"),
    (Fault(body=b'{"object": "text_completion", "choices": [{"prompt_logprobs": [null'), "not JSON"),
    (Fault(body=b'{"object": "text_completion", "choices": []}'), "one choice"),
])
def test_a_body_that_stays_bad_is_a_clear_error(serve, rollouts, fault, cause):
    server = serve(faults=lambda n: fault)
    with pytest.raises(TeacherServerError, match=f"after 3 attempts; last error: .*{cause}"):
        _client(server).score(*rollouts)


@pytest.fixture(scope="module")
def one_answer(teacher, rollouts):
    """One real answer (decoded JSON) for rollout 0, to break in the tests below."""
    with TeacherServer(*teacher, max_logprobs=8) as server:
        seq = rollouts[0][0]
        request = {"prompt": seq, "max_tokens": 1, "prompt_logprobs": K}
        body = urllib.request.urlopen(urllib.request.Request(
            server.url + "/v1/completions", data=json.dumps(request).encode())).read()
        return json.loads(body), seq, rollouts[1][0], server.vocab_size


def _first_response_entry(answer, start):
    return answer["choices"][0]["prompt_logprobs"][start]


def _break_missing_position(answer, start):
    answer["choices"][0]["prompt_logprobs"][-1] = None


def _break_fewer_entries(answer, start):
    answer["choices"][0]["prompt_logprobs"].pop()


def _break_k(answer, start):
    entry = _first_response_entry(answer, start)
    actual = str(answer["_seq"][start])
    del entry[next(t for t in entry if t != actual and entry[t]["rank"] <= K)]


def _break_id_range(answer, start):
    entry = _first_response_entry(answer, start)
    token = next(t for t in entry if entry[t]["rank"] == 1)
    entry["999"] = entry.pop(token)


def _break_positive(answer, start):
    entry = _first_response_entry(answer, start)
    next(v for v in entry.values() if v["rank"] == 2)["logprob"] = 0.5


def _break_order(answer, start):
    entry = _first_response_entry(answer, start)
    by_rank = {v["rank"]: v for v in entry.values()}
    by_rank[1]["logprob"], by_rank[2]["logprob"] = by_rank[2]["logprob"] - 1, by_rank[1]["logprob"]


def _break_actual(answer, start):
    seq = answer["_seq"]
    entry = _first_response_entry(answer, start)
    if str(seq[start]) in entry and entry[str(seq[start])]["rank"] > K:
        del entry[str(seq[start])]
    else:  # the actual token is in the top-K: rename it to an id absent from the entry
        absent = next(str(t) for t in range(len(entry) + 2) if str(t) not in entry)
        entry[absent] = entry.pop(str(seq[start]))


def _break_first(answer, start):
    answer["choices"][0]["prompt_logprobs"][0] = {}


@pytest.mark.parametrize("breaker, message", [
    (_break_missing_position, "is missing"),
    (_break_fewer_entries, "entries for"),
    (_break_k, "expected K = 5"),
    (_break_id_range, "outside the vocabulary"),
    (_break_positive, "not a finite number <= 0"),
    (_break_order, "descending rank order"),
    (_break_actual, "actual token"),
    (_break_first, "first prompt_logprobs entry"),
])
def test_malformed_answers_are_refused(one_answer, breaker, message):
    answer, seq, start, vocab = one_answer
    assert parse_completion(answer, seq, start, K, vocab)[0].shape == (len(seq) - start, K)
    broken = copy.deepcopy(answer)
    broken["_seq"] = seq
    breaker(broken, start)
    with pytest.raises(MalformedAnswer, match=message):
        parse_completion(broken, seq, start, K, vocab)


@pytest.mark.parametrize("text, message", [
    ('{"a": 1, "a": 2}', "duplicate keys"),
    ('{"a": NaN}', "non-finite"),
    ('{"a": -Infinity}', "non-finite"),
])
def test_duplicate_ids_and_non_finite_numbers_are_refused(text, message):
    with pytest.raises(MalformedAnswer, match=message):
        _decode(text.encode())


def test_score_ids_looks_the_ids_up_or_says_which_is_missing(serve, rollouts):
    server = serve()
    client = _client(server)
    teacher = client.score(*rollouts)
    # ids the teacher answered for: its top-K reversed, and the actual token
    ids = torch.cat([teacher.ids.flip(-1), teacher.token_ids.unsqueeze(-1)], -1)
    got = client.score_ids(*rollouts, ids)
    want = torch.cat([teacher.logprobs.flip(-1), teacher.token_logprobs.unsqueeze(-1)], -1)
    assert torch.equal(got, want * teacher.mask.unsqueeze(-1))
    # an id outside the teacher's top-K and not the actual token: a clear error, no value made up
    b, t = 0, 0
    outside = next(i for i in range(server.vocab_size)
                   if i not in teacher.ids[b, t].tolist() and i != int(teacher.token_ids[b, t]))
    ids[b, t, 0] = outside
    with pytest.raises(MissingTeacherLogprob, match=f"no log-prob for id {outside} at rollout 0, "
                                                    "response position 0.*RFC #56860"):
        client.score_ids(*rollouts, ids)
