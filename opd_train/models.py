"""Building, loading and pairing causal LMs, and the one place that knows how logits are formed.

The OPD loss never sees logits: it takes final hidden states and the output-embedding weight
(``opd_kernels.fused_linear_opd_loss``). That is only right when the model's logits are exactly
``c tanh((scale * hidden @ W^T + b) / c)``. ``OutputHead`` records W, the scale (Cohere's
``logit_scale``, Granite's ``logits_scaling``, ``output_multiplier``), the output layer's bias b
if it has one and the final-logit soft-cap c (Gemma 2's ``final_logit_softcapping``); the loss
passes b and c to the kernels. Anything else (an unknown post-processing) is refused:
``verify_output_head`` checks the claim numerically against the model's own logits before
training starts.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .errors import UsageError


def tiny_llama(tokenizer, hidden_size: int, layers: int, heads: int, max_positions: int) -> LlamaForCausalLM:
    """A small Llama built from a config (no download), with tied input/output embeddings."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _is_hub_id(name: str) -> bool:
    """'org/name' or 'name'; anything else is meant as a local folder."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1


def load_model(name: str, dtype: torch.dtype, device: str):
    """(causal LM, tokenizer to batch with, the tokenizer as it came) from a local folder or a hub
    id, with a clear error. The one to batch with has a pad token; checkpoints save the other,
    so that a trained model's folder carries its own tokenizer settings."""
    path = os.path.expanduser(name)
    if not os.path.isdir(path) and not _is_hub_id(name):
        raise UsageError(f"model path not found: {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model {name!r}: {e}") from e
    working = tokenizer
    if tokenizer.pad_token is None:  # batched generation pads; the padding is masked out anyway
        working = copy.deepcopy(tokenizer)
        working.pad_token = working.eos_token
    return model.to(device), working, tokenizer


def check_same_tokenizer(student_tok, teacher_tok) -> None:
    """OPD compares distributions token by token: both tokenizers must map text to the same ids."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    shared = min(len(s_vocab), len(t_vocab))
    s_ids = {i: t for t, i in s_vocab.items() if i < shared}
    t_ids = {i: t for t, i in t_vocab.items() if i < shared}
    if s_ids != t_ids:
        differing = sorted(i for i in set(s_ids) | set(t_ids) if s_ids.get(i) != t_ids.get(i))
        raise UsageError(
            f"student and teacher tokenizers differ ({len(differing)} ids map to different "
            f"tokens, e.g. id {differing[0]}: {s_ids.get(differing[0])!r} vs "
            f"{t_ids.get(differing[0])!r}); on-policy distillation needs one shared vocabulary")


@dataclass
class OutputHead:
    """logits = softcap * tanh(z / softcap), z = (hidden * hidden_scale) @ weight[:vocab_size].T
    + bias[:vocab_size] (no bias: none added; softcap None: z itself)."""

    weight: torch.Tensor
    hidden_scale: float
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The materialized logits of ``hidden`` in fp32 (the probe and the tests only)."""
        z = (hidden.float() * self.hidden_scale) @ self.weight.float().T
        if self.bias is not None:
            z = z + self.bias.float()
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)


def output_head(model, name: str) -> OutputHead:
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise UsageError(f"{name}: the model has no output-embedding weight")
    bias = getattr(head, "bias", None)
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise UsageError(f"{name}: the output layer's bias is not a tensor ({type(bias).__name__})")
    scale = 1.0
    for attr, op in (("logit_scale", "mul"), ("output_multiplier", "mul"), ("logits_scaling", "div")):
        value = getattr(config, attr, None)
        if value is not None and type(value) in (int, float):
            scale = scale * value if op == "mul" else scale / value
    return OutputHead(weight=head.weight, hidden_scale=float(scale), bias=bias,
                      softcap=float(softcap) if softcap else None)


def final_hidden(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The decoder's last hidden state (after its final norm): what the lm_head multiplies."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def verify_output_head(model, head: OutputHead, input_ids, name: str) -> None:
    """Refuse a model whose logits are not what ``head`` says (a post-processing we do not
    know about would otherwise make the loss silently wrong)."""
    attention_mask = torch.ones_like(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    raw = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False).logits
    logits = raw.float()
    hidden = final_hidden(model, input_ids, attention_mask, position_ids).float()
    ours = head.logits(hidden)
    # the model's own dtype (bf16 under autocast, with fp32 weights) decides the tolerance
    tol = 1e-3 if raw.dtype == torch.float32 and head.weight.dtype == torch.float32 else 5e-2
    err = (ours - logits).abs().max().item() / max(1.0, logits.abs().max().item())
    if err > tol:
        raise UsageError(
            f"{name}: its logits are not hidden_states @ lm_head.weight^T as its config states "
            f"(scale {head.hidden_scale:g}, bias {head.bias is not None}, softcap {head.softcap}; relative error "
            f"{err:.3g}); a logit post-processing this trainer does not know would make the "
            "distillation loss wrong, so it refuses the model")


def enable_checkpointing(model) -> None:
    """Recompute the layers' activations in the backward (non-reentrant: it works under no_grad
    inputs and with the kernels' own autograd functions). transformers 5 renamed the switch."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
