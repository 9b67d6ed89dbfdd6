"""Scoring the student's rollouts with a served teacher: vLLM's OpenAI-compatible completions.

One request per rollout, in the form verl's teacher uses
(``verl/experimental/teacher_loop/teacher_manager.py``, ``_get_teacher_sampling_params``: the
whole sequence as ``prompt`` token ids, ``max_tokens=1``, ``prompt_logprobs=K``,
``temperature=1.0``), POSTed to ``URL/v1/completions``::

    {"model": ..., "prompt": [ids], "max_tokens": 1, "prompt_logprobs": K, "temperature": 1.0}

The answer's shape is vLLM's own (``vllm/entrypoints/openai/completion/protocol.py``:
``CompletionResponse``, ``CompletionResponseChoice.prompt_logprobs: list[dict[int, Logprob] |
None]``; ``vllm/logprobs.py``: ``Logprob(logprob, rank, decoded_token)``): one entry per prompt
token, the first null (nothing predicts it), entry j the teacher's distribution after tokens
< j. vLLM builds an entry (``append_logprobs_for_next_position``) from the actual token j first,
with its rank in the whole vocabulary, then the top-K ranked 1..K: K entries when the actual
token is among the top-K, K + 1 otherwise. ``-inf`` comes as -9999.0
(``clamp_prompt_logprobs``). The log-probs are of the raw logits: temperature does not reach
prompt log-probs (the model runners apply no temperature to them; verl's comment says the same
and always sends 1.0), so a trainer that wants the teacher at another temperature must apply it
itself, and can do so exactly only over what it has (the top-K, not the tail).

Every answer is validated completely (``parse_completion``) and the batch is returned only when
every rollout's answer is whole: a step never trains on a partial or malformed answer.

The paper's eq. 5 needs the teacher's log-probs at the ids the *student* chose. vLLM cannot
score given ids per position (its ``logprob_token_ids`` / ``prompt_logprob_token_ids`` take one
fixed id list per request; per-position ids are only proposed upstream, vLLM RFC #56860 "Per-
position target token logprobs for prefill scoring"). ``TeacherClient.score_ids`` is the
fallback the math allows: it asks for the teacher's top-K and looks each student id up there
(and at the actual token, which vLLM always returns), raising ``MissingTeacherLogprob`` for an id
that is absent; it never makes a value up.
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


class TeacherServerError(RuntimeError):
    """The teacher server did not give a whole, well-formed answer after the last attempt (or
    refused the request outright: a 4xx, which no retry would change)."""


class _Abandoned(TeacherServerError):
    """A rollout not sent (or not retried) because another rollout of its batch failed."""


class MalformedAnswer(ValueError):
    """An answer that is not vLLM's completion format for the request sent."""


class MissingTeacherLogprob(LookupError):
    """A student id the teacher's answer has no log-prob for (beyond its top-K)."""


@dataclass
class TeacherTopK:
    """The teacher's answer for a batch, response positions only, right-padded to the longest
    response T (position t predicts response token t, i.e. column ``response_start + t``).
    Padded positions hold id 0 and log-prob 0.0 and are False in ``mask``."""

    ids: torch.Tensor             # int64 [B, T, K] the teacher's top-K ids, by rank
    logprobs: torch.Tensor        # fp32 [B, T, K] their log-probs, descending
    token_ids: torch.Tensor       # int64 [B, T] the response tokens themselves
    token_logprobs: torch.Tensor  # fp32 [B, T] the teacher's log-prob of each response token
    mask: torch.Tensor            # bool [B, T] True on real positions

    def map(self, fn) -> "TeacherTopK":
        return TeacherTopK(*(fn(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def rows(self, index: torch.Tensor, width: int) -> "TeacherTopK":
        """The answer for these rows, its first ``width`` positions (a micro-batch's)."""
        return self.map(lambda t: t.index_select(0, index.to(t.device))[:, :width])


def _reject_constant(name: str):
    raise MalformedAnswer(f"non-finite number {name} in the answer")


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise MalformedAnswer(f"duplicate keys in an answer object: {sorted(keys)}")
    return dict(pairs)


def _decode(body: bytes) -> dict:
    try:
        answer = json.loads(body, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:  # truncated or not JSON at all
        raise MalformedAnswer(f"the body is not JSON ({e}; {len(body)} bytes)") from e
    if not isinstance(answer, dict):
        raise MalformedAnswer("the body is not a JSON object")
    return answer


def parse_completion(answer: dict, sequence: Sequence[int], response_start: int, topk: int,
                     vocab_size: int) -> tuple:
    """(ids int64 [T, K], log-probs fp32 [T, K], token log-probs fp32 [T]) for the response
    positions of one rollout, from a decoded ``/v1/completions`` answer; ``MalformedAnswer`` on
    anything that is not a whole answer in vLLM's format for this sequence and K."""
    choices = answer.get("choices")
    if answer.get("object") != "text_completion" or not isinstance(choices, list) or len(choices) != 1:
        raise MalformedAnswer("not a completion with one choice")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise MalformedAnswer("the choice is not an object")
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != list(sequence):
        raise MalformedAnswer("the answer is for other prompt token ids than sent")
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(sequence):
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise MalformedAnswer(f"prompt_logprobs has {got} entries for {len(sequence)} prompt tokens")
    if entries[0] is not None:
        raise MalformedAnswer("the first prompt_logprobs entry is not null")
    ids, logprobs, token_logprobs = [], [], []
    for j in range(response_start, len(sequence)):
        where = f"prompt_logprobs[{j}]"
        entry = entries[j]
        if not isinstance(entry, dict):
            raise MalformedAnswer(f"{where} is missing ({entry!r})")
        by_rank = {}
        actual = None
        for key, value in entry.items():
            try:
                token = int(key)
            except ValueError:
                raise MalformedAnswer(f"{where}: key {key!r} is not a token id") from None
            if not 0 <= token < vocab_size:
                raise MalformedAnswer(f"{where}: id {token} outside the vocabulary [0, {vocab_size})")
            if not isinstance(value, dict):
                raise MalformedAnswer(f"{where}[{token}] is not a Logprob object")
            lp, rank = value.get("logprob"), value.get("rank")
            if type(lp) not in (int, float) or not math.isfinite(lp) or lp > 0:
                raise MalformedAnswer(f"{where}[{token}]: log-prob {lp!r} is not a finite number <= 0")
            if type(rank) is not int or rank < 1:
                raise MalformedAnswer(f"{where}[{token}]: rank {rank!r} is not an integer >= 1")
            if token == sequence[j]:
                actual = float(lp)
            if rank <= topk:
                if rank in by_rank:
                    raise MalformedAnswer(f"{where}: two ids of rank {rank}")
                by_rank[rank] = (token, float(lp))
            elif token != sequence[j]:  # only the actual token may lie beyond the top-K
                raise MalformedAnswer(f"{where}: id {token} of rank {rank} > K = {topk} is not the actual token")
        if actual is None:
            raise MalformedAnswer(f"{where}: no entry for the actual token {sequence[j]}")
        if len(by_rank) != topk:
            raise MalformedAnswer(f"{where}: {len(by_rank)} top-ranked ids, expected K = {topk}")
        ranked = [by_rank[r] for r in range(1, topk + 1)]
        if any(a[1] < b[1] for a, b in zip(ranked, ranked[1:])):
            raise MalformedAnswer(f"{where}: the top-K log-probs are not in descending rank order")
        ids.append([t for t, _ in ranked])
        logprobs.append([lp for _, lp in ranked])
        token_logprobs.append(actual)
    width = len(ids)
    return (torch.tensor(ids, dtype=torch.int64).reshape(width, topk),
            torch.tensor(logprobs, dtype=torch.float32).reshape(width, topk),
            torch.tensor(token_logprobs, dtype=torch.float32))


class TeacherClient:
    """Scores batches of rollouts at ``url`` (the server root, e.g. ``http://host:8000``).

    ``topk``: K, the ``prompt_logprobs`` asked for (the server's ``--max-logprobs`` must allow
    it); ``vocab_size``: the shared vocabulary (ids outside it are malformed). At most
    ``max_workers`` requests are in flight; each waits ``timeout_s`` at most to connect and for
    each read; a request is tried ``attempts`` times in all, ``backoff_s * 2**i`` seconds apart,
    on a connection error, a timeout, a 5xx or 429, or a malformed answer. A 4xx other than 429
    (a request the server refuses, e.g. K above its ``--max-logprobs``) is raised at once.
    """

    def __init__(self, url: str, *, topk: int, vocab_size: int, model: Optional[str] = None,
                 max_workers: int = 8, timeout_s: float = 120.0, attempts: int = 4,
                 backoff_s: float = 1.0, temperature: float = 1.0):
        if topk < 0 or vocab_size < 1 or max_workers < 1 or attempts < 1 or timeout_s <= 0:
            raise ValueError("TeacherClient needs topk >= 0, vocab_size >= 1, max_workers >= 1, "
                             "attempts >= 1 and timeout_s > 0")
        self.root = url.rstrip("/")
        self.endpoint = self.root + "/v1/completions"
        self.topk, self.vocab_size, self.model = topk, vocab_size, model
        self.max_workers, self.timeout_s = max_workers, timeout_s
        self.attempts, self.backoff_s, self.temperature = attempts, backoff_s, temperature

    def _post(self, sequence: list) -> dict:
        request = {"prompt": sequence, "max_tokens": 1, "prompt_logprobs": self.topk,
                   "temperature": self.temperature}
        if self.model is not None:
            request = {"model": self.model, **request}
        http_request = urllib.request.Request(
            self.endpoint, data=json.dumps(request).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(http_request, timeout=self.timeout_s) as response:
            return _decode(response.read())

    def _retried(self, url: str, call, abandon: Optional[threading.Event] = None):
        """``call()``, tried ``attempts`` times on the failures a retry can cure."""
        last_error = None
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            # another rollout of the batch failed: the batch is lost anyway
            if abandon is not None and abandon.is_set():
                raise _Abandoned("abandoned: another rollout of the batch had no answer")
            try:
                return call()
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read()[:500].decode(errors="replace")
                except (OSError, http.client.HTTPException):
                    detail = "(no readable body)"
                if 400 <= e.code < 500 and e.code != 429:
                    raise TeacherServerError(
                        f"teacher server {url} refused the request (HTTP {e.code}): {detail}") from e
                last_error = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, http.client.HTTPException, OSError, MalformedAnswer) as e:
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
        raise TeacherServerError(
            f"teacher server {url} gave no whole answer after {self.attempts} attempts; "
            f"last error: {last_error}")

    def _score_one(self, sequence: list, response_start: int, abandon: threading.Event) -> tuple:
        try:
            return self._retried(self.endpoint, lambda: parse_completion(
                self._post(sequence), sequence, response_start, self.topk, self.vocab_size), abandon)
        except TeacherServerError:
            # set here, not only by score() once it wakes: this worker's next rollout is not sent
            abandon.set()
            raise

    def models(self) -> list:
        """The ids of the models the server serves (``GET /v1/models``, retried as a score is)."""
        url = self.root + "/v1/models"

        def get():
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                data = _decode(response.read()).get("data")
            if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                     for m in data):
                raise MalformedAnswer("not a list of models with ids")
            return [m["id"] for m in data]

        return self._retried(url, get)

    def score(self, sequences: Sequence[Sequence[int]], response_starts: Sequence[int]) -> TeacherTopK:
        """The teacher's top-K at every response position of each rollout (``sequences[b]``: its
        prompt and response token ids, no padding; its response starts at ``response_starts[b]``,
        which must be >= 1: the first token has no prediction). Raises ``TeacherServerError`` if
        any rollout has no whole answer: then nothing of the batch is returned."""
        if len(sequences) != len(response_starts):
            raise ValueError("one response start per sequence")
        rows = [[int(t) for t in s] for s in sequences]
        for row, start in zip(rows, response_starts):
            if not 1 <= start < len(row):
                raise ValueError(f"response start {start} outside [1, {len(row)}) for a sequence "
                                 f"of {len(row)} tokens")
        abandon = threading.Event()
        with ThreadPoolExecutor(max_workers=min(self.max_workers, max(1, len(rows)))) as pool:
            futures = [pool.submit(self._score_one, row, start, abandon)
                       for row, start in zip(rows, response_starts)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):  # stop the others early
                abandon.set()
                for f in futures:
                    f.cancel()
        # the pool is left: every future has finished or was cancelled; the first real failure
        # is the one to report, not a rollout abandoned because of it
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, _Abandoned)), errors[0])
        answers = [f.result() for f in futures]
        lengths = [len(row) - start for row, start in zip(rows, response_starts)]
        shape = (len(rows), max(lengths, default=0))
        out = TeacherTopK(ids=torch.zeros(*shape, self.topk, dtype=torch.int64),
                          logprobs=torch.zeros(*shape, self.topk, dtype=torch.float32),
                          token_ids=torch.zeros(shape, dtype=torch.int64),
                          token_logprobs=torch.zeros(shape, dtype=torch.float32),
                          mask=torch.zeros(shape, dtype=torch.bool))
        for b, ((ids, logprobs, token_logprobs), row, start) in enumerate(zip(answers, rows, response_starts)):
            n = len(row) - start
            out.ids[b, :n], out.logprobs[b, :n] = ids, logprobs
            out.token_ids[b, :n] = torch.tensor(row[start:])
            out.token_logprobs[b, :n], out.mask[b, :n] = token_logprobs, True
        return out

    def score_ids(self, sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
                  ids: torch.Tensor) -> torch.Tensor:
        """The teacher's log-probs (fp32 [B, T, k]) at given ids (int64 [B, T, k], the layout of
        ``score``; padded positions are ignored and give 0.0), e.g. the student's own top-k for
        eq. 5. vLLM cannot score given ids, so this asks for the teacher's top-K and looks the ids
        up there (``lookup_ids``)."""
        return lookup_ids(self.score(sequences, response_starts), ids)


def lookup_ids(teacher: TeacherTopK, ids: torch.Tensor) -> torch.Tensor:
    """The log-probs (fp32 [B, T, k]) of ``teacher``'s answer at ``ids`` (int64 [B, T, k]), found
    among its top-K or at the actual token (which vLLM always returns); padded positions give
    0.0. ``MissingTeacherLogprob`` names the first id absent: no value is ever made up."""
    ids = ids.to(torch.int64)
    if ids.shape[:2] != teacher.mask.shape:
        raise ValueError(f"ids of shape {tuple(ids.shape)} for a batch of [B, T] = "
                         f"{tuple(teacher.mask.shape)}")
    topk = teacher.ids.shape[-1]
    in_topk = ids.unsqueeze(-1) == teacher.ids.unsqueeze(-2)               # [B, T, k, K]
    is_token = ids == teacher.token_ids.unsqueeze(-1)                      # [B, T, k]
    found = in_topk.any(-1) | is_token
    missing = (~found) & teacher.mask.unsqueeze(-1)
    if missing.any():
        b, t, i = (int(x) for x in missing.nonzero()[0])
        raise MissingTeacherLogprob(
            f"the teacher's answer has no log-prob for id {int(ids[b, t, i])} at rollout {b}, "
            f"response position {t}: vLLM returns only its top-K (K = {topk}) and the actual "
            f"token, and cannot score given ids (vLLM RFC #56860); raise K (and the server's "
            f"--max-logprobs) or use an objective that needs the teacher's top-K only")
    from_topk = (in_topk * teacher.logprobs.unsqueeze(-2)).sum(-1)
    from_token = teacher.token_logprobs.unsqueeze(-1).expand_as(from_topk)
    values = torch.where(in_topk.any(-1), from_topk, from_token)
    return torch.where(teacher.mask.unsqueeze(-1), values, torch.zeros_like(values))
