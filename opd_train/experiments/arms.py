"""One arm of an experiment: an ordinary ``python -m opd_train`` run (cli.run) of the world's
student and one of its teachers on the world's prompt files, in the arm's own folder, and what
the comparison reads from it afterwards (accuracies, held-out diagnostics, and the measurements
a run does not make itself: a second benchmark, the student's entropy along its responses).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import cli, heldout
from ..checkpoint import STEP_PREFIX, model_dir
from ..config import Config, resolve
from ..evaluate import accuracy
from ..loss import statistics
from ..models import load_model
from ..rollout import generate
from ..runlog import read_rows
from ..task import check_reference
from .world import RECIPES, TEMPLATES, World

# The embedded demonstration's learning rate and warmup for models this small
# (config.EMBEDDED_DEFAULTS; on the same-pattern arm 3e-4 gained 14 points to 1e-3's 20), at the
# paper's temperature 1.
TEMPERATURE, LR, WARMUP_STEPS = 1.0, 1e-3, 20
# Parts of a response (by position / length) that the student's entropy is averaged over.
RESPONSE_PARTS = 4


@dataclass(frozen=True)
class Scale:
    """How much an experiment runs: the full one, or the seconds-long one of the tests."""
    opd_steps: int
    prompts_per_step: int
    rollouts_per_prompt: int
    eval_every: int
    diagnostics_prompts: int
    cold_start_steps: int
    sft_steps: Optional[int] = None   # None: each recipe's own


# A cold start of 150 steps left the student in its own pattern (10% held-out after it, with the
# backward teacher): switching the order of the lookups is a new skill, the teachers took ~1000
# SFT steps to learn theirs.
FULL = Scale(opd_steps=150, prompts_per_step=16, rollouts_per_prompt=4, eval_every=25,
             diagnostics_prompts=64, cold_start_steps=600)
QUICK = Scale(opd_steps=2, prompts_per_step=2, rollouts_per_prompt=2, eval_every=1,
              diagnostics_prompts=4, cold_start_steps=2, sft_steps=2)


@dataclass(frozen=True)
class Arm:
    label: str
    teacher: str = "teacher"          # a key of world.RECIPES
    template: str = "teacher"         # a key of world.TEMPLATES: the prompts' wording, OPD and eval
    objective: str = "topk"
    k: int = 16
    cold_start: bool = False
    items: tuple = ()                 # entities per question; () = the world's
    benchmark: bool = False           # also grade on held-out questions over the known entities only
    entropy_by_position: bool = False  # the student's entropy by response part, at each checkpoint


def model_dirs(world: World, names, scale: Scale, cache_dir: str) -> dict:
    """The model folder of each recipe name, trained now unless cached."""
    dirs = {}
    for name in names:
        recipe = RECIPES[name]
        if scale.sft_steps is not None:
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, sft_steps=scale.sft_steps))
        dirs[name] = world.model_dir(name, cache_dir, recipe)
    return dirs


def _write_prompts(path: str, world: World, questions: list) -> None:
    with open(path, "w") as f:
        for q in questions:
            f.write(json.dumps({"prompt": world.prompt(q), "answer": q.answer}) + "\n")


def _templated(arm: Arm, world: World, questions: list) -> list:
    return [TEMPLATES[arm.template].format(prompt=world.prompt(q)) for q in questions]


def _checkpoints(run_dir: str) -> list:
    """(step, model folder) of the run's checkpoints, in step order."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.startswith(STEP_PREFIX))
    return [(int(n[len(STEP_PREFIX):]), model_dir(os.path.join(folder, n))) for n in names]


def _benchmark(cfg: Config, arm: Arm, world: World, questions: list, models: dict) -> dict:
    """Greedy accuracy of each model folder of ``models`` on ``questions``."""
    prompts, answers = _templated(arm, world, questions), [q.answer for q in questions]
    out = {}
    for name, path in models.items():
        model, tokenizer, _ = load_model(path, torch.float32, cfg.device)
        out[name] = accuracy(model, tokenizer, prompts, answers, check_reference,
                             max_new_tokens=cfg.max_new_tokens)
    return out


def _entropy_by_position(cfg: Config, prompts: list, teacher_dir: str, students: list) -> dict:
    """{step: the student's mean entropy over each RESPONSE_PARTS-th of its responses} on
    ``prompts``, sampled with one seed, for each (step, model folder) of ``students``."""
    out = {}
    for step, path in students:
        pair, tokenizer, _, _ = cli.load_pair(cfg, path, teacher_dir)
        torch.manual_seed(cfg.seed)
        batch, _ = generate(pair.student, tokenizer, prompts, cfg.max_new_tokens,
                            cfg.sampling_temperature)
        stats = statistics(pair, batch, k=cfg.k, temperature=cfg.loss_temperature)
        entropy = stats.student_entropy.double().cpu().numpy()
        sums, counts = np.zeros(RESPONSE_PARTS), np.zeros(RESPONSE_PARTS)
        for row, length in zip(entropy, batch.response_lengths):
            parts = np.arange(length) * RESPONSE_PARTS // length
            np.add.at(sums, parts, row[:length])
            np.add.at(counts, parts, 1)
        out[step] = (sums / np.maximum(counts, 1)).tolist()
    return out


def run_arm(world: World, arm: Arm, scale: Scale, dirs: dict, folder: str, cache_dir: str) -> dict:
    """Run the arm in ``folder`` (a new one); returns its record (JSON-ready)."""
    os.makedirs(folder, exist_ok=True)
    sets = world.question_sets(arm.items)
    prompts_path, eval_path = os.path.join(folder, "prompts.jsonl"), os.path.join(folder, "eval.jsonl")
    cold = sets["cold_start"] if arm.cold_start else []
    _write_prompts(prompts_path, world, sets["opd"] + cold)
    _write_prompts(eval_path, world, sets["eval"])
    checkpoint_every = max(1, scale.opd_steps // RESPONSE_PARTS) if arm.entropy_by_position else 0
    cfg = Config(
        student=dirs["student"], teacher=dirs[arm.teacher], prompts=prompts_path, eval_file=eval_path,
        objective=arm.objective, k=arm.k, temperature=TEMPERATURE, lr=LR,
        warmup_steps=min(WARMUP_STEPS, scale.opd_steps), steps=scale.opd_steps,
        prompts_per_step=scale.prompts_per_step, rollouts_per_prompt=scale.rollouts_per_prompt,
        max_new_tokens=world.max_new_tokens(arm.items), micro_batch_tokens=0,
        eval_every=scale.eval_every, eval_diagnostics_prompts=scale.diagnostics_prompts,
        eval_max_prompts=len(sets["eval"]), save_every=checkpoint_every,
        keep_checkpoints=0 if arm.entropy_by_position else 1, cold_start=arm.cold_start,
        cold_start_prompts=len(cold) or 1,  # the option is checked >= 1 even without --cold-start
        cold_start_steps=scale.cold_start_steps, cold_start_lr=LR,
        prompt_template=TEMPLATES[arm.template], output_dir=os.path.join(folder, "run"), cache_dir=cache_dir)
    cfg = resolve(cfg)
    results, finished = cli.run(cfg)
    if not finished:  # Ctrl-C: the run checkpointed and stopped; the experiment stops with it
        raise KeyboardInterrupt
    record = {"arm": dataclasses.asdict(arm), "run_dir": cfg.output_dir, **results,
              "heldout": read_rows(os.path.join(cfg.output_dir, heldout.FILE)),
              "rollout_accuracy": [r["rollout_accuracy"] for r in
                                   read_rows(os.path.join(cfg.output_dir, "metrics.jsonl"))]}
    final = _checkpoints(cfg.output_dir)[-1][1]
    if arm.benchmark:
        record["benchmark"] = _benchmark(cfg, arm, world, sets["benchmark"],
                                         {"teacher": dirs[arm.teacher], "student_before": dirs["student"],
                                          "student_after": final})
    if arm.entropy_by_position:
        prompts = _templated(arm, world, sets["eval"][:scale.diagnostics_prompts])
        record["entropy_by_position"] = _entropy_by_position(
            cfg, prompts, dirs[arm.teacher], [(0, dirs["student"])] + _checkpoints(cfg.output_dir))
    return record
