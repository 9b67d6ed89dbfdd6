"""The on-policy distillation loop.

Each step: take the next prompts in a seeded order, sample ``rollouts_per_prompt`` responses from
the student, score every response token with both models from their final hidden states
(opd_kernels.fused_linear_opd_loss; the teacher under no_grad) in micro-batches of a token
budget, take one AdamW step on the token mean, and log. Every ``diagnostics_every`` steps (and
on the last) the same pass also returns the kernels' statistics (exact reverse KL, both
entropies, the top-k overlap, the token reward); the other steps log the loss, gradient norm,
length and speed only, and with "topk" do no teacher lm_head product. Whatever a step logs
reaches the host in one copy (one synchronization a step, not one a micro-batch). Held-out
diagnostics (heldout.py) every ``eval_every`` steps.

Ctrl-C finishes the current step, checkpoints and stops (a second Ctrl-C stops at once).

On several processes (distributed.py) each takes its contiguous share of the step's rollouts,
sampled from a seed of (seed, step, rank); the gradient is the token mean over every process's
rollouts; the logged numbers are over all of them, written by the main process; a SIGINT to any
process stops all of them after the same step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from opd_kernels import TopKStats

from .batching import host_summary, shared_micro_batches
from . import served
from .checkpoint import (latest_checkpoint, model_dir, restore_sharded, rng_state, save_checkpoint,
                         save_sharded_checkpoint, set_rng_state)
from .distributed import SINGLE, World, global_norm, release, seed_of, seeded
from .errors import RunStopped
from .heldout import HeldOut
from .loss import PairedModels, opd_loss_sum
from .models import enable_checkpointing
from .rollout import generate
from .runlog import truncate_rows
from .teacher_client import MissingTeacherLogprob, TeacherServerError


@dataclass
class PromptSet:
    prompts: list                  # as the models see them (templated)
    answers: list                  # reference answer or None, per prompt
    checker: Optional[Callable]    # checker(response, answer) -> bool


def step_prompts(n_prompts: int, per_step: int, step: int, seed: int) -> list:
    """The prompt indices of ``step``: consecutive slices of per-epoch seeded permutations, so the
    data order is a function of (seed, step) and a resumed run sees the same prompts."""
    out, position = [], step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(position, n_prompts)
        order = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        take = min(per_step - len(out), n_prompts - offset)
        out.extend(order[offset:offset + take].tolist())
        position += take
    return out


class StopOnSigint:
    """First Ctrl-C: ask the loop to stop after the step; second: interrupt at once.
    ``announce``: say so (the main process of several)."""

    def __init__(self, announce: bool = True):
        self.requested, self.announce = False, announce

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            tqdm.write("interrupt: finishing this step, then checkpointing (Ctrl-C again to abort)")

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def diagnoses(cfg, done: int) -> bool:
    """Whether step ``done`` (1-based) logs the full diagnostics: the first, every
    ``diagnostics_every``-th and the last."""
    return done == 1 or done % cfg.diagnostics_every == 0 or done == cfg.steps


def _loss_and_stats(cfg, pair: PairedModels, batch, diagnostics: bool, tokens=None,
                    world: World = SINGLE) -> tuple:
    """Forward and backward of the step's micro-batches: (the loss summed over its tokens, the
    statistics of every position flattened to one axis, or None), both still on the device.
    ``tokens``: what each loss sum is divided by (default: the batch's response tokens; on
    several processes, all of theirs over their number, as FSDP averages their gradients)."""
    tokens = batch.response_tokens if tokens is None else tokens
    sums, parts = [], []
    for part in shared_micro_batches(batch, cfg.micro_batch_tokens, world):
        loss, stats = opd_loss_sum(pair, part, objective=cfg.objective, k=cfg.k,
                                   temperature=cfg.loss_temperature, diagnostics=diagnostics,
                                   **cfg.objective_params)
        (loss / tokens).backward()
        release(pair.teacher)  # its gathered head, kept for the backward, is no longer needed
        sums.append(loss.detach().float())
        if stats is not None:  # flattened: trimmed micro-batches have different widths
            parts.append(stats.map(lambda t: t.reshape(-1)))
    return torch.stack(sums).sum(), TopKStats.cat(parts) if parts else None


def _stopped(cfg, error: Exception, completed: tuple, saved: int, student, save_tokenizer, optimizer,
             wall_time: Callable[[], float]) -> RunStopped:
    """The served teacher failed: checkpoint the last step done (unless it is), and say how to go on."""
    step, rng = completed
    checkpoints = os.path.join(cfg.output_dir, "checkpoints")
    if step > saved:
        save_checkpoint(checkpoints, step, student, save_tokenizer, optimizer, keep=cfg.keep_checkpoints,
                        wall_time_s=wall_time(), rng=rng)
    kept = latest_checkpoint(checkpoints)
    advice = (f"--teacher-topk cannot change on --resume: start a new run from "
              f"{model_dir(kept) if kept else cfg.student} with a larger K, or another objective"
              if isinstance(error, MissingTeacherLogprob) else
              f"continue with: python -m opd_train --resume {cfg.output_dir} (add --teacher-server URL "
              f"if the server moved)")
    return RunStopped(f"step {step + 1}, the served teacher: {error}\nthe run is kept up to step {step}"
                      f"{f' ({kept})' if kept else ''}; {advice}")


def train(cfg, pair: PairedModels, tokenizer, data: PromptSet, add_special_tokens: bool, *,
          resumed: Optional[dict], save_tokenizer, heldout: Optional[HeldOut],
          wall_time: Callable[[], float], world: World = SINGLE) -> int:
    """Runs steps until cfg.steps (or Ctrl-C), from the trainer state ``resumed`` (None: from
    the start; on several processes, with the ``checkpoint`` folder it came from); returns the
    number of steps done. Checkpoints hold ``save_tokenizer`` (the student's own) and
    ``wall_time()``, the run's time so far."""
    student = pair.student
    if cfg.gradient_checkpointing:
        enable_checkpointing(student)
    release(student)  # a sharded model's parameters are then the sharded ones, which the optimizer steps
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    checkpoints = os.path.join(cfg.output_dir, "checkpoints")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start = 0
    if resumed is not None and world.launched:
        restore_sharded(resumed["checkpoint"], student, optimizer, world)
    elif resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        set_rng_state(resumed["rng"])
    if resumed is not None:
        start = resumed["step"]
    if world.main:
        truncate_rows(metrics_path, start)
    if heldout is not None:
        if world.main:
            truncate_rows(heldout.path, start)
        heldout.logged = {s for s in heldout.logged if s <= start}

    def checkpoint(step: int) -> None:
        if world.launched:
            save_sharded_checkpoint(checkpoints, step, student, save_tokenizer, optimizer, world=world,
                                    keep=cfg.keep_checkpoints, wall_time_s=wall_time())
        else:
            save_checkpoint(checkpoints, step, student, save_tokenizer, optimizer,
                            keep=cfg.keep_checkpoints, wall_time_s=wall_time())

    # The last step done with the RNG states at its end, and the last step checkpointed: what a
    # failure of the served teacher saves, so that --resume goes on as if nothing had happened.
    completed, saved = (start, None), start
    shown = {}
    log_file = open(metrics_path, "a") if world.main else contextlib.nullcontext()
    with StopOnSigint(announce=world.main) as stop, log_file as log:
        try:
            if heldout is not None and heldout.due(start):
                heldout.measure(start, pair, tokenizer, cfg, add_special_tokens)
            bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="opd",
                       dynamic_ncols=True, disable=not world.main)
            for step in bar:
                began = time.time()
                done = step + 1
                lr = cfg.lr * min(1.0, done / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
                for group in optimizer.param_groups:  # a function of the step: nothing to resume
                    group["lr"] = lr
                idx = step_prompts(len(data.prompts), cfg.prompts_per_step, step, cfg.seed)
                idx = [i for i in idx for _ in range(cfg.rollouts_per_prompt)]
                mine = world.share(idx)[0]  # exact: config checks that the rollouts split evenly
                with seeded(seed_of(cfg.seed, step, world.rank), cfg.device) if world.launched \
                        else contextlib.nullcontext():
                    batch, texts = generate(student, tokenizer, [data.prompts[i] for i in mine],
                                            cfg.max_new_tokens, cfg.sampling_temperature,
                                            add_special_tokens=add_special_tokens)
                rewards = [float(data.checker(t, data.answers[i])) for t, i in zip(texts, mine)
                           if data.checker is not None and data.answers[i] is not None]
                if pair.served is not None:  # the whole step's rollouts at once, before any forward
                    batch = served.score(pair.served, batch)
                # every process's response tokens and rewards (sums and counts): one collective
                counts = world.sum(torch.tensor([batch.response_tokens, sum(rewards), len(rewards)],
                                                dtype=torch.float64, device=cfg.device))
                student.train()
                loss_sum, stats = _loss_and_stats(cfg, pair, batch, diagnoses(cfg, done),
                                                  counts[0].float() / world.size if world.launched else None,
                                                  world)
                grad_norm = global_norm(torch.nn.utils.clip_grad_norm_(student.parameters(),
                                                                       cfg.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # the loss over every process's tokens, and whether any was asked to stop
                totals = world.sum(torch.stack([loss_sum.double(),
                                                torch.tensor(float(stop.requested), dtype=torch.float64,
                                                             device=loss_sum.device)]))
                (loss_sum, stopping, grad_norm, tokens, reward_sum, reward_count), diagnostics = \
                    host_summary([*totals, grad_norm, *counts], stats, world)  # the sync
                tokens = int(tokens)
                elapsed = time.time() - began
                row = {"step": done, "loss": loss_sum / tokens, **diagnostics,
                       "rollout_accuracy": reward_sum / reward_count if reward_count else math.nan,
                       "grad_norm": grad_norm, "response_length": tokens / len(idx),
                       "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "lr": lr}
                if world.main:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                shown.update({name: f"{row[key]:.3f}" for name, key in
                              (("kl", "reverse_kl"), ("overlap", "overlap"), ("reward", "token_reward"))
                              if key in row})
                bar.set_postfix(**shown, acc=f"{row['rollout_accuracy']:.2f}", gnorm=f"{grad_norm:.2f}",
                                len=f"{row['response_length']:.0f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if stopping or done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                    checkpoint(done)
                    saved = done
                if stopping:
                    return done
                completed = (done, rng_state())
                if heldout is not None and heldout.due(done):
                    heldout.measure(done, pair, tokenizer, cfg, add_special_tokens)
        except (TeacherServerError, MissingTeacherLogprob) as e:
            raise _stopped(cfg, e, completed, saved, student, save_tokenizer, optimizer, wall_time) from e
    return cfg.steps
