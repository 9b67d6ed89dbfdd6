"""Held-out diagnostics: the student's rollouts on a fixed prompt set, sampled with a fixed seed,
scored by both models (reverse KL, top-k overlap ratio and masses, entropies, token reward).

A training step's diagnostics are measured on that step's own prompts, so with few prompts a
step they mostly show which prompts came up; these are measured on the same prompts with the
same random numbers every time, so they move only as the student does. The sampling runs under a
forked RNG: measuring leaves the training's random stream, hence its results, unchanged.
"""
from __future__ import annotations

import json

import torch

from opd_kernels import TopKStats

from . import served
from .batching import host_summary, micro_batches
from .loss import PairedModels, statistics
from .rollout import generate
from .runlog import read_rows

FILE = "heldout.jsonl"


class HeldOut:
    """Measures at step 0, every ``every`` steps and at ``steps``; rows go to ``path``."""

    def __init__(self, path: str, prompts: list, *, every: int, steps: int, seed: int):
        self.path, self.prompts, self.every, self.steps, self.seed = path, prompts, every, steps, seed
        self.logged = {r["step"] for r in read_rows(path)}

    def due(self, step: int) -> bool:
        return (bool(self.every) and (step % self.every == 0 or step == self.steps)
                and step not in self.logged)

    def measure(self, step: int, pair: PairedModels, tokenizer, cfg, add_special_tokens: bool) -> dict:
        device = next(pair.student.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            batch, _ = generate(pair.student, tokenizer, self.prompts, cfg.max_new_tokens,
                                cfg.sampling_temperature, add_special_tokens=add_special_tokens)
        if pair.served is not None:
            batch = served.score(pair.served, batch)
        was_training = pair.student.training
        pair.student.eval()
        parts = [statistics(pair, part, k=cfg.k, temperature=cfg.loss_temperature).map(lambda t: t.reshape(-1))
                 for part in micro_batches(batch, cfg.micro_batch_tokens)]
        pair.student.train(was_training)
        _, summary = host_summary([], TopKStats.cat(parts))
        row = {"step": step, **summary,
               "response_length": batch.response_tokens / len(self.prompts)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.logged.add(step)
        return row
