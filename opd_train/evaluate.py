"""Held-out accuracy: greedy responses checked against reference answers."""
from __future__ import annotations

from .rollout import generate


def accuracy(model, tokenizer, prompts: list, answers: list, checker, *, max_new_tokens: int,
             batch_size: int = 256, add_special_tokens: bool = True) -> float:
    """Fraction of ``prompts`` whose greedy response ``checker(response, answer)`` accepts."""
    _, texts = generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, greedy=True,
                        batch_size=batch_size, add_special_tokens=add_special_tokens)
    return sum(bool(checker(t, a)) for t, a in zip(texts, answers)) / max(1, len(prompts))
