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
"""
from __future__ import annotations

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

from .batching import host_summary, micro_batches
from . import served
from .checkpoint import latest_checkpoint, model_dir, rng_state, save_checkpoint, set_rng_state
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
    """First Ctrl-C: ask the loop to stop after the step; second: interrupt at once."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
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


def _loss_and_stats(cfg, pair: PairedModels, batch, diagnostics: bool) -> tuple:
    """Forward and backward of the step's micro-batches: (the loss summed over its tokens, the
    statistics of every position flattened to one axis, or None), both still on the device."""
    tokens = batch.response_tokens
    sums, parts = [], []
    for part in micro_batches(batch, cfg.micro_batch_tokens):
        loss, stats = opd_loss_sum(pair, part, objective=cfg.objective, k=cfg.k,
                                   temperature=cfg.loss_temperature, diagnostics=diagnostics,
                                   **cfg.objective_params)
        (loss / tokens).backward()
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
          wall_time: Callable[[], float]) -> int:
    """Runs steps until cfg.steps (or Ctrl-C), from the trainer state ``resumed`` (None: from
    the start); returns the number of steps done. Checkpoints hold ``save_tokenizer`` (the
    student's own) and ``wall_time()``, the run's time so far."""
    student = pair.student
    if cfg.gradient_checkpointing:
        enable_checkpointing(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    checkpoints = os.path.join(cfg.output_dir, "checkpoints")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start = 0
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        set_rng_state(resumed["rng"])
        start = resumed["step"]
    truncate_rows(metrics_path, start)
    if heldout is not None:
        truncate_rows(heldout.path, start)
        heldout.logged = {s for s in heldout.logged if s <= start}
    # The last step done with the RNG states at its end, and the last step checkpointed: what a
    # failure of the served teacher saves, so that --resume goes on as if nothing had happened.
    completed, saved = (start, None), start
    shown = {}
    with StopOnSigint() as stop, open(metrics_path, "a") as log:
        try:
            if heldout is not None and heldout.due(start):
                heldout.measure(start, pair, tokenizer, cfg, add_special_tokens)
            bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="opd",
                       dynamic_ncols=True)
            for step in bar:
                began = time.time()
                done = step + 1
                lr = cfg.lr * min(1.0, done / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
                for group in optimizer.param_groups:  # a function of the step: nothing to resume
                    group["lr"] = lr
                idx = step_prompts(len(data.prompts), cfg.prompts_per_step, step, cfg.seed)
                idx = [i for i in idx for _ in range(cfg.rollouts_per_prompt)]
                batch, texts = generate(student, tokenizer, [data.prompts[i] for i in idx],
                                        cfg.max_new_tokens, cfg.sampling_temperature,
                                        add_special_tokens=add_special_tokens)
                rewards = [float(data.checker(t, data.answers[i])) for t, i in zip(texts, idx)
                           if data.checker is not None and data.answers[i] is not None]
                if pair.served is not None:  # the whole step's rollouts at once, before any forward
                    batch = served.score(pair.served, batch)
                tokens = batch.response_tokens
                student.train()
                loss_sum, stats = _loss_and_stats(cfg, pair, batch, diagnoses(cfg, done))
                grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                (loss_sum, grad_norm), diagnostics = host_summary([loss_sum, grad_norm], stats)  # the sync
                elapsed = time.time() - began
                row = {"step": done, "loss": loss_sum / tokens, **diagnostics,
                       "rollout_accuracy": float(np.mean(rewards)) if rewards else math.nan,
                       "grad_norm": grad_norm, "response_length": tokens / len(idx),
                       "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "lr": lr}
                log.write(json.dumps(row) + "\n")
                log.flush()
                shown.update({name: f"{row[key]:.3f}" for name, key in
                              (("kl", "reverse_kl"), ("overlap", "overlap"), ("reward", "token_reward"))
                              if key in row})
                bar.set_postfix(**shown, acc=f"{row['rollout_accuracy']:.2f}", gnorm=f"{grad_norm:.2f}",
                                len=f"{row['response_length']:.0f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if stop.requested or done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                    save_checkpoint(checkpoints, done, student, save_tokenizer, optimizer,
                                    keep=cfg.keep_checkpoints, wall_time_s=wall_time())
                    saved = done
                if stop.requested:
                    return done
                completed = (done, rng_state())
                if heldout is not None and heldout.due(done):
                    heldout.measure(done, pair, tokenizer, cfg, add_special_tokens)
        except (TeacherServerError, MissingTeacherLogprob) as e:
            raise _stopped(cfg, e, completed, saved, student, save_tokenizer, optimizer, wall_time) from e
    return cfg.steps
