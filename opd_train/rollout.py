"""Sampling responses from a causal LM, and the batch layout the loss and SFT share.

A batch is [prompt | response]: prompts left-padded to a common column ``prompt_len`` (so every
response starts there), responses right-padded after their end-of-sequence token. Position ids
count real tokens only, the same in generation and in the training forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import GenerationConfig

from .distributed import is_sharded, release
from .teacher_client import TeacherTopK


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    response_mask: torch.Tensor   # [B, L] True on response tokens (their eos included)
    prompt_len: int               # column where every response starts
    response_lengths: list        # per row, on the host: its response tokens (eos included)
    lengths: list                 # per row, on the host: its real tokens (prompt + response)
    teacher: Optional[TeacherTopK] = None  # a served teacher's answer for the rows (served.py)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def response_tokens(self) -> int:
        return sum(self.response_lengths)

    def rows(self, index: list) -> "Batch":
        """The batch of these rows, trimmed to the columns any of them uses (left padding of the
        prompts, right padding after the responses): a micro-batch costs its own length only."""
        ids = torch.tensor(index, device=self.input_ids.device)
        prompt_real = [self.lengths[i] - self.response_lengths[i] for i in index]
        left = self.prompt_len - max(prompt_real)
        right = self.prompt_len + max(self.response_lengths[i] for i in index)
        cut = lambda t: t.index_select(0, ids)[:, left:right]  # noqa: E731
        teacher = None if self.teacher is None else self.teacher.rows(ids, right - self.prompt_len)
        return Batch(cut(self.input_ids), cut(self.attention_mask), cut(self.response_mask),
                     self.prompt_len - left, [self.response_lengths[i] for i in index],
                     [self.lengths[i] for i in index], teacher)


def response_mask_after(generated: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True up to and including the first eos of each row (all True where none was produced)."""
    is_eos = generated == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float,
             greedy: bool = False, batch_size: int = 0, add_special_tokens: bool = True) -> tuple:
    """Responses to ``prompts`` (one each; repeat a prompt for several rollouts): returns
    (Batch, decoded response texts). Sampling is from the full distribution at ``temperature``
    (no top-k / top-p truncation), as on-policy distillation assumes. Chat-templated prompts
    already hold their special tokens: pass ``add_special_tokens=False`` for them. A model
    sharded over processes decodes until every process is done (each decoding step gathers the
    shards: every process runs it)."""
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy,
        temperature=None if greedy else temperature, top_k=None, top_p=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    chunks = []
    step = batch_size or len(prompts)
    for start in range(0, len(prompts), step):
        enc = tokenizer(prompts[start:start + step], padding=True, padding_side="left",
                        return_tensors="pt", add_special_tokens=add_special_tokens).to(device)
        out = model.generate(**enc, generation_config=config, synced_gpus=is_sharded(model))
        # One copy to the host per chunk (decoding needs it anyway): the layout below, the
        # response lengths and the texts then cost no further device synchronization.
        out = out.cpu()
        width = enc["input_ids"].shape[1]
        chunks.append((out[:, :width], enc["attention_mask"].cpu(), out[:, width:]))
    model.train(was_training)
    release(model)  # the root's parameters, gathered for the decoding
    prompt_len = max(p.shape[1] for p, _, _ in chunks)
    resp_len = max(r.shape[1] for _, _, r in chunks)
    pad = tokenizer.pad_token_id
    rows_ids, rows_attn, rows_resp = [], [], []
    for p, prompt_attn, r in chunks:
        prompt_real = torch.nn.functional.pad(prompt_attn, (prompt_len - p.shape[1], 0), value=0).bool()
        p = torch.nn.functional.pad(p, (prompt_len - p.shape[1], 0), value=pad)
        r = torch.nn.functional.pad(r, (0, resp_len - r.shape[1]), value=pad)
        resp = response_mask_after(r, tokenizer.eos_token_id)
        rows_ids.append(torch.cat([p, r], 1))
        rows_attn.append(torch.cat([prompt_real, resp], 1).long())
        rows_resp.append(torch.cat([torch.zeros_like(p, dtype=torch.bool), resp], 1))
    ids, resp = torch.cat(rows_ids), torch.cat(rows_resp)
    texts = tokenizer.batch_decode([row[m] for row, m in zip(ids[:, prompt_len:], resp[:, prompt_len:])],
                                   skip_special_tokens=True)
    batch = Batch(ids.to(device), torch.cat(rows_attn).to(device), resp.to(device), prompt_len,
                  resp.sum(1).tolist(), torch.cat(rows_attn).sum(1).tolist())
    return batch, texts
