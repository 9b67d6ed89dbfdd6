"""Argument checks of the public functions: bad input raises a clear error naming the argument."""
from __future__ import annotations

import math
from typing import Optional

import torch

REDUCTIONS = ("mean", "sum", "none")
# Activation dtypes a wider (fp32 master) weight may be paired with, as autocast pairs them.
_AUTOCAST_ACTIVATIONS = (torch.bfloat16, torch.float16)


def floating(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or "
                        f"float64), got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")


def same_device(**tensors) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def logits(name: str, t) -> None:
    floating(name, t)
    if t.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary (last dim 0)")


def logits_pair(student, teacher) -> None:
    logits("student_logits", student)
    logits("teacher_logits", teacher)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"vocab mismatch: student_logits has V={student.shape[-1]}, "
                         f"teacher_logits has V={teacher.shape[-1]}")
    if student.shape != teacher.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher.shape)} != student_logits shape "
                         f"{tuple(student.shape)}")
    same_device(student_logits=student, teacher_logits=teacher)


def temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {value!r}")
    return float(value)


def mask(m, lead: torch.Size, device: torch.device) -> Optional[torch.Tensor]:
    if m is None:
        return None
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = counted), got "
                        f"{getattr(m, 'dtype', type(m).__name__)}")
    _one_per_position("mask", m, lead, device)
    return m


def _one_per_position(name: str, t: torch.Tensor, lead: torch.Size, device: torch.device) -> None:
    if t.shape != lead:
        raise ValueError(f"{name} shape {tuple(t.shape)} != the positions' shape {tuple(lead)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}")


def tokens(t, lead: torch.Size, vocab: int, device: torch.device, counted: Optional[torch.Tensor],
           ignore_index: Optional[int] = None) -> tuple:
    """Integer ids of the positions' shape -> (ids as int64, the counted positions). A position
    whose id is ``ignore_index`` is not counted (combined with ``counted``, the mask); every
    counted id must lie in [0, vocab). The range check is the one host synchronization of a call,
    made here before any kernel runs."""
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor of token ids, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    _one_per_position("tokens", t, lead, device)
    if ignore_index is not None:
        kept = t != ignore_index
        counted = kept if counted is None else counted & kept
    checked = t if counted is None else t[counted]
    outside = (checked < 0) | (checked >= vocab)
    if checked.numel() and bool(outside.any()):
        bad = checked[outside][0]
        raise ValueError(f"tokens holds id {int(bad)} outside the vocabulary [0, {vocab})"
                         + ("" if ignore_index is None else f" (ignore_index is {ignore_index})"))
    return t.long(), counted


def k(value, vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"k must be an int, got {value!r}")
    if not 1 <= value <= vocab:
        raise ValueError(f"k must satisfy 1 <= k <= V = {vocab}, got k={value}")
    return value


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def linear(name_hidden: str, hidden, name_weight: str, weight) -> None:
    floating(name_hidden, hidden)
    floating(name_weight, weight)
    if weight.dim() != 2:
        raise ValueError(f"{name_weight} must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name_hidden} has hidden size {hidden.shape[-1]} but {name_weight} is "
                         f"[V, H] with H={weight.shape[1]}")
    if hidden.dtype != weight.dtype and not (hidden.dtype in _AUTOCAST_ACTIVATIONS
                                             and weight.dtype == torch.float32):
        raise TypeError(f"{name_hidden} is {hidden.dtype} but {name_weight} is {weight.dtype}: "
                        f"the two must match, or be bfloat16/float16 activations with a float32 "
                        f"weight (mixed precision)")
    same_device(**{name_hidden: hidden, name_weight: weight})


def bias(name: str, b, weight_name: str, weight) -> None:
    """None, or a floating vector of one entry a row of the weight, on its device."""
    if b is None:
        return
    floating(name, b)
    if b.shape != weight.shape[:1]:
        raise ValueError(f"{name} must have shape ({weight.shape[0]},) (one entry a row of "
                         f"{weight_name}), got {tuple(b.shape)}")
    same_device(**{weight_name: weight, name: b})


def softcap(name: str, value) -> Optional[float]:
    """None (no capping) or the cap c of c tanh(z / c): a positive finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be None or a positive finite number, got {value!r}")
    return float(value)


def ignore_index(value) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"ignore_index must be an int or None, got {value!r}")
    return value


def vocab_size(value, student_vocab: int, teacher_vocab: int) -> int:
    """The shared vocabulary: both weights' rows when they agree, else an explicit K <= both."""
    if value is None:
        if student_vocab != teacher_vocab:
            raise ValueError(f"vocab mismatch: student_weight has {student_vocab} rows, "
                             f"teacher_weight has {teacher_vocab}; pass vocab_size=K (K <= both) "
                             f"to compare the first K ids and ignore padding rows")
        return student_vocab
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= min(student_vocab, teacher_vocab):
        raise ValueError(f"vocab_size must be an int in [1, {min(student_vocab, teacher_vocab)}] "
                         f"(<= both weights' rows), got {value!r}")
    return value


def weight_grad_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"weight_grad_dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def served_teacher(ids, logprobs, token_logprob, logprobs_at, lead: torch.Size, vocab: int,
                   device: torch.device, counted: Optional[torch.Tensor], stats_k: Optional[int],
                   mass_tolerance: float):
    """A served teacher's answer: shapes and dtypes, then (one host synchronization) its values
    at the counted positions: ids in [0, vocab) and distinct in a row, log-probs not NaN and
    <= 0, the top-K mass <= 1 (within ``mass_tolerance``), and k <= K where the statistics
    compare the student's top-k with the teacher's. Returns K."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() \
            or ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor [..., K] of token ids, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    floating("teacher_logprobs", logprobs)
    if ids.dim() != len(lead) + 1 or ids.shape[:-1] != lead or ids.shape[-1] < 1:
        raise ValueError(f"teacher_ids shape {tuple(ids.shape)} must be the positions' shape "
                         f"{tuple(lead)} plus K >= 1")
    if logprobs.shape != ids.shape:
        raise ValueError(f"teacher_logprobs shape {tuple(logprobs.shape)} != teacher_ids shape "
                         f"{tuple(ids.shape)} (one log-prob for each of the K ids)")
    top_k = ids.shape[-1]
    if top_k > vocab:
        raise ValueError(f"teacher_ids has K={top_k} ids a position, more than the vocabulary {vocab}")
    same_device(teacher_ids=ids, teacher_logprobs=logprobs)
    if ids.device != device:
        raise ValueError(f"teacher_ids is on {ids.device} but the student is on {device}")
    if token_logprob is not None:
        floating("teacher_token_logprob", token_logprob)
        _one_per_position("teacher_token_logprob", token_logprob, lead, device)
    if logprobs_at is not None:
        floating("teacher_logprobs_at", logprobs_at)
        if logprobs_at.shape[:-1] != lead or logprobs_at.device != device:
            raise ValueError(f"teacher_logprobs_at shape {tuple(logprobs_at.shape)} must be the "
                             f"positions' shape {tuple(lead)} plus k, on {device}")
    if stats_k is not None and stats_k > top_k:
        raise ValueError(f"k={stats_k} > K={top_k}: the statistics compare the student's top-k "
                         f"with the teacher's, which needs k <= K served ids")
    pick = (lambda t: t.reshape(-1, *t.shape[len(lead):])) if counted is None else \
        (lambda t: t[counted])
    ids_c, lp_c = pick(ids), pick(logprobs).float()
    sorted_ids = ids_c.sort(-1).values
    problems = {
        "teacher_ids holds an id outside the vocabulary [0, %d)" % vocab:
            ((ids_c < 0) | (ids_c >= vocab)).any(),
        "teacher_ids repeats an id within a position (a different tokenizer, or a malformed answer)":
            (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(),
        "teacher_logprobs holds NaN or a value above 0": (lp_c.isnan() | (lp_c > 0)).any(),
        "teacher_logprobs' top-K mass exceeds 1 at a position (log-probs of another distribution?)":
            (torch.logsumexp(lp_c, -1) > math.log1p(mass_tolerance)).any(),
    }
    for name, t in (("teacher_token_logprob", token_logprob), ("teacher_logprobs_at", logprobs_at)):
        if t is not None:
            v = pick(t).float()
            problems[f"{name} holds NaN or a value above 0"] = (v.isnan() | (v > 0)).any()
    flags = torch.stack(list(problems.values())).tolist() if ids_c.numel() else []
    for message, bad in zip(problems, flags):
        if bad:
            raise ValueError(message)
    return top_k
