"""The recipe's cold start: off-policy SFT of the student on one teacher response per held-out
prompt, before OPD.

The responses are kept as the teacher's own token ids (decoding and re-encoding can change them:
a tokenizer need not round-trip), each ending in the end-of-sequence token the teacher sampled.
A response cut off at --max-new-tokens has none, and appending one would teach the student to stop
mid-answer: like the paper, incomplete responses are dropped, and the count is reported.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from .errors import UsageError
from .rollout import generate
from .sft import sft

GENERATION_BATCH = 256


def teacher_pairs(teacher, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float,
                  add_special_tokens: bool) -> tuple:
    """([(prompt ids, response ids ending in eos)] of the complete responses, how many were cut off)."""
    pairs, dropped = [], 0
    for start in range(0, len(prompts), GENERATION_BATCH):
        batch, _ = generate(teacher, tokenizer, prompts[start:start + GENERATION_BATCH],
                            max_new_tokens, temperature, add_special_tokens=add_special_tokens)
        p = batch.prompt_len
        ids, attn, resp = (t.cpu() for t in (batch.input_ids, batch.attention_mask, batch.response_mask))
        for row, real, counted in zip(ids, attn, resp):
            response = row[p:][counted[p:]].tolist()
            if not response or response[-1] != tokenizer.eos_token_id:
                dropped += 1
                continue
            pairs.append((row[:p][real[:p].bool()].tolist(), response))
    return pairs, dropped


def cold_start(cfg, pair, tokenizer, prompts: list, add_special_tokens: bool) -> dict:
    """SFT the student; returns the counts of responses used and dropped."""
    pairs, dropped = teacher_pairs(pair.teacher, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.sampling_temperature,
                                   add_special_tokens=add_special_tokens)
    tqdm.write(f"cold start: {len(pairs)} teacher responses; {dropped} of {len(prompts)} dropped, "
               f"cut off at --max-new-tokens {cfg.max_new_tokens}")
    if not pairs:
        raise UsageError(f"cold start: every teacher response was cut off at --max-new-tokens "
                         f"{cfg.max_new_tokens}; raise it")
    sft(pair.student, pairs, tokenizer.pad_token_id, steps=cfg.cold_start_steps,
        batch_size=min(32, len(pairs)), lr=cfg.cold_start_lr, seed=cfg.seed, desc="cold start")
    return {"cold_start_responses": len(pairs), "cold_start_dropped": dropped}
