"""Held-out diagnostics: the student's rollouts on a fixed prompt set, sampled with a fixed seed,
scored by both models (reverse KL, top-k overlap ratio and masses, entropies, token reward).

A training step's diagnostics are measured on that step's own prompts, so with few prompts a
step they mostly show which prompts came up; these are measured on the same prompts with the
same random numbers every time, so they move only as the student does. The sampling runs under a
forked RNG: measuring leaves the training's random stream, hence its results, unchanged. On
several processes each samples its share of the prompts (seeded by the seed and its rank) and
the main process writes the rows.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from opd_kernels import TopKStats

from . import served
from .batching import host_summary, shared_micro_batches
from .distributed import SINGLE, World, release, seed_of, seeded
from .loss import PairedModels, statistics
from .rollout import generate
from .runlog import read_rows

FILE = "heldout.jsonl"


class HeldOut:
    """Measures at step 0, every ``every`` steps and at ``steps``; rows go to ``path``."""

    def __init__(self, path: str, prompts: list, *, every: int, steps: int, seed: int,
                 world: World = SINGLE):
        self.path, self.prompts, self.every, self.steps, self.seed = path, prompts, every, steps, seed
        self.world = world
        # what the main process read: every process must agree on which steps measure
        self.logged = world.from_main({r["step"] for r in read_rows(path)} if world.main else None)

    def due(self, step: int) -> bool:
        return (bool(self.every) and (step % self.every == 0 or step == self.steps)
                and step not in self.logged)

    def measure(self, step: int, pair: PairedModels, tokenizer, cfg, add_special_tokens: bool) -> dict:
        world = self.world
        prompts, real = world.share(self.prompts)
        seed = seed_of(self.seed, world.rank) if world.launched else self.seed
        with seeded(seed, str(next(pair.student.parameters()).device)):
            batch, _ = generate(pair.student, tokenizer, prompts, cfg.max_new_tokens,
                                cfg.sampling_temperature, add_special_tokens=add_special_tokens)
        if pair.served is not None:
            batch = served.score(pair.served, batch)
        if real < len(prompts):  # the share's padding rows count nowhere
            batch = dataclasses.replace(batch, response_mask=batch.response_mask & (
                torch.arange(len(prompts), device=batch.response_mask.device) < real)[:, None])
        was_training = pair.student.training
        pair.student.eval()
        parts = []
        for part in shared_micro_batches(batch, cfg.micro_batch_tokens, world):
            parts.append(statistics(pair, part, k=cfg.k, temperature=cfg.loss_temperature)
                         .map(lambda t: t.reshape(-1)))
            release(pair.teacher)
        release(pair.student)  # gathered by a forward that no backward follows
        pair.student.train(was_training)
        tokens = world.sum(torch.tensor([float(sum(batch.response_lengths[:real]))]))
        (tokens,), summary = host_summary([tokens], TopKStats.cat(parts), world)
        row = {"step": step, **summary, "response_length": tokens / len(self.prompts)}
        if world.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.logged.add(step)
        return row
