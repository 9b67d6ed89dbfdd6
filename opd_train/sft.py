"""Supervised fine-tuning on (prompt, response) pairs: the cross-entropy on response tokens only.

Used to make the embedded task's teacher and student, and for the recipe's off-policy cold start
(the student on teacher-generated responses).
"""
from __future__ import annotations

import math
import random

import torch
from tqdm.auto import tqdm


def encode_pairs(tokenizer, prompts: list, responses: list, device, add_special_tokens: bool = True):
    """Right-padded [prompt | response eos] ids, attention mask, and labels (-100 off-response)."""
    rows = []
    for prompt, response in zip(prompts, responses):
        p = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p, r))
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        attn[i, :n] = 1
    return ids.to(device), attn.to(device), labels.to(device)


def sft(model, tokenizer, prompts: list, responses: list, *, steps: int, batch_size: int, lr: float,
        seed: int, desc: str, warmup: int = 20, add_special_tokens: bool = True) -> float:
    """AdamW with linear warmup and cosine decay; returns the last step's loss."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for _ in bar:
        idx = [rng.randrange(len(prompts)) for _ in range(batch_size)]
        ids, attn, labels = encode_pairs(tokenizer, [prompts[i] for i in idx],
                                         [responses[i] for i in idx], device, add_special_tokens)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
    model.eval()
    return loss_value
