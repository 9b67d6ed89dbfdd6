"""The on-policy distillation loop.

Each step: take the next prompts in a seeded order, sample ``rollouts_per_prompt`` responses from
the student, score every response token with both models from their final hidden states
(opd_kernels.fused_linear_opd_loss; the teacher under no_grad), take one AdamW step on the token
mean, and log the kernels' top-k statistics with the reward, gradient norm, length and speed.

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

from .checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint, set_rng_state
from .loss import PairedModels, opd_loss_sum
from .rollout import Batch, generate
from opd_kernels import TopKStats


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


def _slices(batch: Batch, size: int):
    n = batch.input_ids.shape[0]
    size = size or n
    for start in range(0, n, size):
        part = slice(start, start + size)
        yield Batch(batch.input_ids[part], batch.attention_mask[part], batch.response_mask[part],
                    batch.prompt_len)


def _truncate_metrics(path: str, steps_done: int) -> None:
    """Drop lines of steps a resumed run will redo (they ran after the last checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= steps_done]
    with open(path, "w") as f:
        f.writelines(kept)


def train(cfg, pair: PairedModels, tokenizer, data: PromptSet, add_special_tokens: bool) -> int:
    """Runs steps until cfg.steps (or Ctrl-C); returns the number of steps done."""
    student = pair.student
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    checkpoints = os.path.join(cfg.output_dir, "checkpoints")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start = 0
    resumed = latest_checkpoint(checkpoints) if cfg.resume else None
    if resumed:
        state = load_trainer_state(resumed)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start = state["step"]
    _truncate_metrics(metrics_path, start)
    step = start
    with StopOnSigint() as stop, open(metrics_path, "a") as log:
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="opd", dynamic_ncols=True)
        for step in bar:
            began = time.time()
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in optimizer.param_groups:  # a function of the step: nothing to resume
                group["lr"] = lr
            idx = step_prompts(len(data.prompts), cfg.prompts_per_step, step, cfg.seed)
            idx = [i for i in idx for _ in range(cfg.rollouts_per_prompt)]
            batch, texts = generate(student, tokenizer, [data.prompts[i] for i in idx],
                                    cfg.max_new_tokens, cfg.temperature,
                                    add_special_tokens=add_special_tokens)
            rewards = [float(data.checker(t, data.answers[i])) for t, i in zip(texts, idx)
                       if data.checker is not None and data.answers[i] is not None]
            tokens = batch.response_tokens
            student.train()
            sums, stats = [], []  # (loss, KL, reward) of each micro-batch, on the device
            for part in _slices(batch, cfg.micro_batch_size):
                loss, part_stats, kl, token_reward = opd_loss_sum(
                    pair, part, objective=cfg.objective, k=cfg.k, temperature=cfg.temperature,
                    **cfg.objective_params)
                (loss / tokens).backward()
                sums.append(torch.stack([loss.detach().float(), kl.float(), token_reward.float()]))
                stats.append(part_stats)
            loss_sum, kl_sum, reward_sum = torch.stack(sums).sum(0).tolist()  # one sync a step
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.time() - began
            row = {"step": step + 1, "loss": loss_sum / tokens, "reverse_kl": kl_sum / tokens,
                   **TopKStats.cat(stats).summary(),
                   "token_reward": reward_sum / tokens,
                   "rollout_accuracy": float(np.mean(rewards)) if rewards else math.nan,
                   "grad_norm": grad_norm, "response_length": tokens / len(idx),
                   "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "lr": lr}
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(kl=f"{row['reverse_kl']:.3f}", overlap=f"{row['overlap']:.3f}",
                            reward=f"{row['token_reward']:.3f}", acc=f"{row['rollout_accuracy']:.2f}", gnorm=f"{grad_norm:.2f}",
                            len=f"{row['response_length']:.0f}", tok_s=f"{row['tokens_per_s']:.0f}")
            done = step + 1
            if stop.requested or done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                save_checkpoint(checkpoints, done, student, tokenizer, optimizer, cfg.keep_checkpoints)
            if stop.requested:
                return done
    return cfg.steps
