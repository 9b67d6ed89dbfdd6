"""A served teacher in the loop (``--teacher-server URL --teacher-topk K``): the client, checked
before any work, and the scoring of a batch of rollouts (teacher_client.py holds the protocol).

The whole step's batch is scored at once (one request a rollout, ``--teacher-workers`` in
flight), before any forward pass; the micro-batches then slice the answer (``Batch.rows``).
"""
from __future__ import annotations

import dataclasses

from .errors import UsageError
from .rollout import Batch
from .teacher_client import TeacherClient, TeacherServerError


def connect(cfg, vocab_size: int, probe: list) -> TeacherClient:
    """A client for ``cfg.teacher_server`` that has answered: the server names its model
    (``GET /v1/models``: vLLM's answer names it, but states neither its vocabulary nor its
    ``--max-logprobs``), then scores ``probe`` (token ids) at K, so that a server refusing K, down,
    or naming ids outside the student's ``vocab_size`` is a message before any work."""
    url = cfg.teacher_server
    if cfg.teacher_topk > vocab_size:
        raise UsageError(f"--teacher-topk {cfg.teacher_topk}: the student's vocabulary has only "
                         f"{vocab_size} ids")
    client = TeacherClient(url, topk=cfg.teacher_topk, vocab_size=vocab_size,
                           max_workers=cfg.teacher_workers, timeout_s=cfg.teacher_timeout_s,
                           attempts=cfg.teacher_attempts, backoff_s=cfg.teacher_backoff_s)
    try:
        models = client.models()
        if not models:
            raise UsageError(f"--teacher-server {url}: the server serves no model (GET /v1/models)")
        client.model = models[0]  # vLLM lists the served model first (LoRA adapters after it)
        client.score([probe], [1])
    except TeacherServerError as e:
        raise UsageError(f"--teacher-server {url}: {e}") from e
    print(f"served teacher: {client.model} at {url}, its top-{cfg.teacher_topk} a position (the ids "
          f"are the student tokenizer's: the teacher must share it); the diagnostics have no reverse "
          f"KL and the teacher's entropy is a lower bound (teacher_entropy_lower_bound)")
    return client


def score(client: TeacherClient, batch: Batch) -> Batch:
    """``batch`` with the served teacher's answer for every rollout (``TeacherServerError`` if
    any rollout has none: never a partial answer)."""
    ids = batch.input_ids.cpu()
    prompts = [n - r for n, r in zip(batch.lengths, batch.response_lengths)]
    sequences = [ids[b, batch.prompt_len - p:batch.prompt_len + r].tolist()
                 for b, (p, r) in enumerate(zip(prompts, batch.response_lengths))]
    answer = client.score(sequences, prompts)
    return dataclasses.replace(batch, teacher=answer.map(lambda t: t.to(batch.input_ids.device)))
