"""On-policy distillation in a plain ``transformers.Trainer``, and the pieces the TRL integration shares.

- ``divergence_loss``: the loss over the final hidden states and lm_heads of two causal LMs, with
  the arguments of TRL's ``_chunked_divergence_loss`` (mask, ``num_items_in_batch``, biases,
  logit scales, soft-capping, temperature), computed by ``fused_linear_opd_loss`` (which takes
  FSDP2's DTensor lm_heads as they are: gathered, their gradient averaged over the ranks as
  FSDP2 averages its own).
- ``check_pair``: the construction-time checks (objective, vocabularies, tokenizers, lm_heads).
- ``OPDTrainer``: a ``Trainer`` whose loss distills a frozen teacher into the model being trained,
  on the positions whose ``labels`` are not -100.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn
from transformers import Trainer

from .. import objectives
from ..api import fused_linear_opd_loss
from ..objectives import Need

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def logit_transform(config) -> tuple[float, Optional[float]]:
    """(logit scale, final-logit soft-cap) of a model, read from its config as TRL's
    ``DistillationTrainer._compute_loss`` reads them."""
    config = config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide the logits by `logits_scaling`, HyperCLOVA X multiplies them
        scaling = config.logits_scaling
        scale = scaling if config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), getattr(config, "final_logit_softcapping", None)


def divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                    teacher_lm_head_weight, completion_mask, *, objective="jsd",
                    num_items_in_batch=None, student_lm_head_bias=None, teacher_lm_head_bias=None,
                    student_logit_scale=1.0, teacher_logit_scale=1.0,
                    student_final_logit_softcapping=None, teacher_final_logit_softcapping=None,
                    temperature=1.0, tokens=None, k=16, vocab_size=None, return_stats=False,
                    **objective_params):
    """The distillation loss over [B, T, H] hidden states aligned to the predicted tokens.

    Reduced as TRL reduces: ``sum / num_items_in_batch`` when it is given (correct under gradient
    accumulation), else the mean over the local counted positions. Returns
    ``(loss, n_valid, stats)``, ``stats`` a ``TopKStats`` or None.
    """
    # logits = scale * (h W^T + b), then soft-capping, then the temperature (TRL's order): the
    # scale goes on the [B, T, H] hidden states and the bias, never on a [V, H] weight copy.
    if student_logit_scale != 1.0:
        student_hidden_states = student_hidden_states * student_logit_scale
        student_lm_head_bias = None if student_lm_head_bias is None else \
            student_lm_head_bias * student_logit_scale
    if teacher_logit_scale != 1.0:
        teacher_hidden_states = teacher_hidden_states * teacher_logit_scale
        teacher_lm_head_bias = None if teacher_lm_head_bias is None else \
            teacher_lm_head_bias * teacher_logit_scale
    mask = completion_mask != 0
    out = fused_linear_opd_loss(
        student_hidden_states, student_lm_head_weight, teacher_hidden_states.detach(),
        teacher_lm_head_weight.detach(), objective=objective, tokens=tokens, k=k, mask=mask,
        temperature=temperature, reduction="sum", return_stats=return_stats, vocab_size=vocab_size,
        student_bias=student_lm_head_bias,
        teacher_bias=None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach(),
        student_softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping, **objective_params)
    loss, stats = out if return_stats else (out, None)
    n_valid = mask.sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)  # a fully masked rank gives 0, not 0 / 0
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, n_valid, stats


def _rows(weight: torch.Tensor) -> int:
    # Under DeepSpeed ZeRO-3 a parameter is an empty shard; `ds_shape` keeps its real shape.
    return getattr(weight, "ds_shape", weight.shape)[0]


def check_pair(student, teacher, *, objective, objective_params: dict, k: int,
               tokenizer=None, teacher_tokenizer=None) -> Optional[int]:
    """Fail at construction rather than train on a wrong loss. Returns the ``vocab_size`` to
    compare (None: the lm_heads have the same rows)."""
    chosen = objectives.get(objective)  # an unknown name raises, listing the known ones
    params = chosen.check_params(objective_params)  # e.g. beta outside [0, 1]
    heads = {}
    for role, model in (("student", student), ("teacher", teacher)):
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"the {role}'s output embedding is {type(head).__name__}, not an "
                             f"nn.Linear: the fused loss reads lm_head.weight directly, so a head "
                             f"that computes anything else would be silently skipped")
        if head.weight.dtype not in _WEIGHT_DTYPES:
            raise TypeError(f"the {role}'s lm_head weight is {head.weight.dtype} (quantized?); the "
                            f"fused loss needs a float32, bfloat16, float16 or float64 weight")
        softcap = logit_transform(model.config)[1]
        if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                    or not softcap > 0):
            raise ValueError(f"the {role}'s final_logit_softcapping={softcap!r} cannot be "
                             f"honored: it must be a positive number (or None for no capping)")
        heads[role] = head.weight
    if heads["student"].device != heads["teacher"].device:
        raise ValueError(f"the student lm_head is on {heads['student'].device} but the teacher's "
                         f"is on {heads['teacher'].device}: place both on the same device")
    if tokenizer is not None and teacher_tokenizer is not None \
            and tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError("the student's and the teacher's tokenizers differ: the loss compares "
                         "the two next-token distributions id by id, which needs one vocabulary "
                         "(use a cross-tokenizer method such as TRL's GOLD instead)")
    student_rows, teacher_rows = _rows(heads["student"]), _rows(heads["teacher"])
    vocab_size = min(student_rows, teacher_rows)
    if Need.SUPPORT in chosen.needs(params) and not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, {vocab_size}] for objective={objective!r}, got {k}")
    if student_rows == teacher_rows:
        return None
    # Differently padded lm_heads (e.g. Qwen2.5 0.5B: 151936 rows, 7B: 152064): compare the shared
    # first rows, provided every real token id lies in them.
    if tokenizer is None or len(tokenizer) > vocab_size:
        raise ValueError(f"the lm_heads have {student_rows} (student) and {teacher_rows} (teacher) "
                         f"rows; that is only padding if the tokenizer's {len(tokenizer) if tokenizer else '?'} "
                         f"ids fit in the first {vocab_size}, which they do not (pass the tokenizer)")
    return vocab_size


def _hidden_states(model, unwrapped, input_ids, attention_mask) -> torch.Tensor:
    """The backbone's final hidden states [B, L, H], from a forward through ``model`` (the
    DDP/FSDP wrapper, so its hooks fire) that projects one position only (``logits_to_keep=1``)."""
    captured = {}

    def keep(module, args, output):  # returns None: the forward's own output is left as it is
        captured["hidden"] = output.last_hidden_state

    hook = unwrapped.base_model.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return captured["hidden"]


class OPDTrainer(Trainer):
    """A ``transformers.Trainer`` that distills ``teacher_model`` (frozen) into ``model``.

    The loss is ``opd_kernels.fused_linear_opd_loss`` over both models' final hidden states and
    lm_heads at the positions whose next-token ``labels`` are not -100 (the labels, shifted as the
    causal-LM loss shifts them, are also the ``tokens`` of ``objective="sampled"``). Gradient
    accumulation is normalized by the Trainer's ``num_items_in_batch``. With ``log_stats`` the
    top-k statistics (``TopKStats.summary()``) are logged as ``opd/<name>``; for ``topk`` they cost
    the teacher's lm_head product the objective itself does not need.
    """

    # The loss is divided by num_items_in_batch, the token count of the whole accumulated batch
    loss_is_scaled_for_ga = True

    def __init__(self, model, teacher_model, args=None, *, objective: str = "topk", k: int = 16,
                 temperature: float = 1.0, objective_params: Optional[dict] = None,
                 log_stats: bool = True, teacher_processing_class=None, **trainer_kwargs):
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        super().__init__(model=model, args=args, **trainer_kwargs)
        if is_deepspeed_zero3_enabled():
            raise ValueError("OPDTrainer does not gather ZeRO-3 partitioned lm_heads; use "
                             "opd_kernels.integrations.trl.OPDDistillationTrainer (TRL's "
                             "gathering) or FSDP2")
        if "logits_to_keep" not in inspect.signature(self.model.forward).parameters:
            raise ValueError(f"{type(self.model).__name__}.forward has no logits_to_keep: its "
                             f"forward would materialize the [B, L, V] logits the fused loss avoids")
        self.teacher_model = self.accelerator.prepare_model(teacher_model.eval(),
                                                            evaluation_mode=True)
        self.teacher_model.requires_grad_(False)
        unwrap = self.accelerator.unwrap_model
        self.objective, self.k, self.temperature = objective, k, temperature
        self.objective_params = dict(objective_params or {})
        self.log_stats = log_stats
        self.vocab_size = check_pair(unwrap(self.model), unwrap(self.teacher_model),
                                     objective=objective, objective_params=self.objective_params,
                                     k=k, tokenizer=self.processing_class,
                                     teacher_tokenizer=teacher_processing_class)
        # Count num_items_in_batch over labels[..., 1:], the positions this loss counts
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._stats_window = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("OPDTrainer needs `labels` in each batch (-100 = not distilled): they "
                             "say which positions count and are the tokens of 'sampled'")
        labels = inputs["labels"]
        unwrap = self.accelerator.unwrap_model
        student, teacher = unwrap(model), unwrap(self.teacher_model)
        student_hidden = _hidden_states(model, student, inputs["input_ids"],
                                        inputs.get("attention_mask"))
        with torch.no_grad():
            teacher_hidden = _hidden_states(self.teacher_model, teacher, inputs["input_ids"],
                                            inputs.get("attention_mask"))
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's tokens and DDP averages the gradients
            num_items_in_batch = num_items_in_batch / self.accelerator.num_processes
        tokens = labels[:, 1:]
        student_scale, student_softcap = logit_transform(student.config)
        teacher_scale, teacher_softcap = logit_transform(teacher.config)
        student_head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
        loss, _, stats = divergence_loss(
            student_hidden[:, :-1], teacher_hidden[:, :-1].to(student_hidden.device),
            student_head.weight, teacher_head.weight, tokens != -100, objective=self.objective,
            num_items_in_batch=num_items_in_batch, student_lm_head_bias=student_head.bias,
            teacher_lm_head_bias=teacher_head.bias, student_logit_scale=student_scale,
            teacher_logit_scale=teacher_scale, student_final_logit_softcapping=student_softcap,
            teacher_final_logit_softcapping=teacher_softcap, temperature=self.temperature,
            tokens=tokens, k=self.k, vocab_size=self.vocab_size, return_stats=self.log_stats,
            **self.objective_params)
        if stats is not None and model.training:
            self._stats_window.append(stats.summary())
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        # Means over the micro-batches since the last log (NaN ones, e.g. no counted position, skipped)
        for name in self._stats_window[0] if self._stats_window else ():
            values = [s[name] for s in self._stats_window if s[name] == s[name]]
            if values:
                logs[f"opd/{name}"] = sum(values) / len(values)
        self._stats_window.clear()
        super().log(logs, start_time)
