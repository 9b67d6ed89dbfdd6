"""The embedded demonstration: the arithmetic task, its tokenizer, and a teacher and a student
trained here by SFT and cached as safetensors checkpoints (made once, reused on later runs).

The gap is made honestly by training, not by handicapping the evaluation: the teacher is larger
and SFT'd to convergence; the student is smaller and stopped early, so it knows the scratchpad
format (it shares the teacher's thinking pattern) but still makes arithmetic and carry mistakes.
OPD then improves it on its own rollouts, without ever seeing a reference solution.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from . import task
from .checkpoint import save_model_dir
from .models import tiny_llama
from .sft import sft, text_pairs
from .tokenizer import build_char_tokenizer


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    layers: int
    heads: int
    sft_steps: int
    sft_batch: int
    sft_lr: float


@dataclass(frozen=True)
class DemoSpec:
    digits: int = 3
    teacher: ModelSpec = ModelSpec(hidden_size=96, layers=3, heads=4, sft_steps=600, sft_batch=32, sft_lr=3e-3)
    student: ModelSpec = ModelSpec(hidden_size=64, layers=2, heads=4, sft_steps=400, sft_batch=32, sft_lr=3e-3)
    sft_problems: int = 20000
    opd_problems: int = 4096
    cold_start_problems: int = 1024
    eval_problems: int = 512
    max_positions: int = 64
    seed: int = 1234


@dataclass
class DemoData:
    teacher_dir: str
    student_dir: str
    opd: list            # task.Problem, for OPD (prompts only are used)
    cold_start: list     # disjoint prompts for the optional cold start
    eval: list           # held out from everything above


def _key(spec: DemoSpec, which: str) -> str:
    blob = json.dumps({"spec": dataclasses.asdict(spec), "which": which, "alphabet": task.ALPHABET,
                       "template": task.PROMPT_TEMPLATE}, sort_keys=True)
    return f"{which}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def problem_sets(spec: DemoSpec) -> tuple:
    """(sft, opd, cold_start, eval) problem lists, pairwise disjoint."""
    sets, seen = [], frozenset()
    for i, count in enumerate((spec.eval_problems, spec.sft_problems, spec.opd_problems, spec.cold_start_problems)):
        drawn = task.problems(count, spec.digits, spec.seed + i, seen)
        seen = seen | {p.prompt for p in drawn}
        sets.append(drawn)
    evaluation, sft_set, opd, cold_start = sets
    return sft_set, opd, cold_start, evaluation


def sft_and_save(path: str, model_spec: ModelSpec, tokenizer, prompts: list, responses: list, *,
                 max_positions: int, init_seed: int, seed: int, desc: str) -> None:
    """A tiny Llama of ``model_spec``, initialized from ``init_seed``, SFT'd on the text pairs and
    saved (with the tokenizer) as a Hugging Face folder at ``path``."""
    torch.manual_seed(init_seed)
    model = tiny_llama(tokenizer, model_spec.hidden_size, model_spec.layers, model_spec.heads, max_positions)
    pairs = text_pairs(tokenizer, prompts, responses)
    sft(model, pairs, tokenizer.pad_token_id, steps=model_spec.sft_steps,
        batch_size=model_spec.sft_batch, lr=model_spec.sft_lr, seed=seed, desc=desc)
    save_model_dir(path, model, tokenizer)


def _train_and_cache(path: str, which: str, model_spec: ModelSpec, spec: DemoSpec, sft_set, tokenizer) -> None:
    sft_and_save(path, model_spec, tokenizer, [p.prompt for p in sft_set], [p.solution for p in sft_set],
                 max_positions=spec.max_positions, init_seed=spec.seed + (0 if which == "teacher" else 1),
                 seed=spec.seed, desc=f"sft {which}")


def vocab_size() -> int:
    """The embedded task's token ids (what --k is checked against before any training)."""
    return len(build_char_tokenizer(task.ALPHABET))


def prepare(cache_dir: str, spec: DemoSpec = DemoSpec()) -> DemoData:
    """Teacher and student checkpoints in ``cache_dir`` (trained now if absent) and the data."""
    cache_dir = os.path.expanduser(cache_dir)
    tokenizer = build_char_tokenizer(task.ALPHABET)
    sft_set, opd, cold_start, evaluation = problem_sets(spec)
    dirs = {}
    for which, model_spec in (("teacher", spec.teacher), ("student", spec.student)):
        dirs[which] = os.path.join(cache_dir, _key(spec, which))
        if not os.path.exists(os.path.join(dirs[which], "config.json")):
            _train_and_cache(dirs[which], which, model_spec, spec, sft_set, tokenizer)
    return DemoData(dirs["teacher"], dirs["student"], opd, cold_start, evaluation)
