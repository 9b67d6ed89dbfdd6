"""Supervised fine-tuning on (prompt ids, response ids) pairs: the cross-entropy on response
tokens only.

Used to make the embedded task's teacher and student, and for the recipe's off-policy cold start
(the student on teacher-generated responses, their token ids exactly as the teacher sampled them).
"""
from __future__ import annotations

import math
import random

import torch
from tqdm.auto import tqdm

# The warmup is this many steps at most, and a tenth of a short run: a 20-step warmup under a
# cosine decay would keep a short cold start from ever reaching its learning rate.
MAX_WARMUP = 20


def encode_pairs(pairs: list, pad_id: int, device):
    """Right-padded [prompt | response] ids, attention mask, and labels (-100 off-response)."""
    length = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        attn[i, :n] = 1
    return ids.to(device), attn.to(device), labels.to(device)


def text_pairs(tokenizer, prompts: list, responses: list, add_special_tokens: bool = True) -> list:
    """(prompt ids, response ids + eos) of text pairs, the prompt encoded as generation encodes it."""
    return [(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"],
             tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            for p, r in zip(prompts, responses)]


def schedule(steps: int):
    """The learning-rate factor of step s: linear warmup, then cosine decay to 0 at ``steps``."""
    warmup = min(MAX_WARMUP, max(1, steps // 10))
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))


def sft(model, pairs: list, pad_id: int, *, steps: int, batch_size: int, lr: float, seed: int,
        desc: str) -> float:
    """AdamW over random batches of ``pairs`` (prompt ids, response ids); returns the last loss."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps))
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for _ in bar:
        idx = [rng.randrange(len(pairs)) for _ in range(batch_size)]
        ids, attn, labels = encode_pairs([pairs[i] for i in idx], pad_id, device)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
    model.eval()
    return loss_value
