"""Held-out accuracy: greedy responses checked against reference answers."""
from __future__ import annotations

import torch

from .distributed import SINGLE, World
from .rollout import generate


def accuracy(model, tokenizer, prompts: list, answers: list, checker, *, max_new_tokens: int,
             batch_size: int = 256, add_special_tokens: bool = True, world: World = SINGLE) -> float:
    """Fraction of ``prompts`` whose greedy response ``checker(response, answer)`` accepts; on
    several processes, each answers its share of them."""
    mine, real = world.share(list(zip(prompts, answers)))
    _, texts = generate(model, tokenizer, [p for p, _ in mine], max_new_tokens, temperature=1.0,
                        greedy=True, batch_size=batch_size, add_special_tokens=add_special_tokens)
    correct = sum(bool(checker(t, a)) for t, (_, a) in zip(texts[:real], mine))
    return int(world.sum(torch.tensor([correct]))) / max(1, len(prompts))
