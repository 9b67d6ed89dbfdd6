"""``python -m opd_train``: resolve the config, get the models and prompts, then cold start
(optional), evaluate, distill, evaluate, and print the table."""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from typing import Optional

import numpy as np
import torch

from . import config as config_mod
from . import demo, distributed, heldout, served, task
from .checkpoint import (atomic_write_text, latest_checkpoint, load_trainer_state, model_dir,
                         remove_leftovers)
from .coldstart import cold_start
from .distributed import SINGLE, World
from .errors import RunStopped, UsageError
from .evaluate import accuracy
from .loss import PairedModels
from .models import check_same_tokenizer, load_model, output_head, verify_output_head
from .plots import plot_metrics
from .prompts import apply_template, load_jsonl
from .train import PromptSet, train

INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C (SIGINT)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _split_cold_start(prompts: list, answers: list, count: int, seed: int) -> tuple:
    """A seeded split of the prompt file: ``count`` prompts for the cold start, the rest for OPD."""
    if count >= len(prompts):
        raise UsageError(f"--cold-start-prompts {count} leaves no OPD prompts ({len(prompts)} in the file)")
    order = np.random.default_rng(seed).permutation(len(prompts)).tolist()
    pick = lambda ids: ([prompts[i] for i in ids], [answers[i] for i in ids])  # noqa: E731
    return pick(order[:count]), pick(order[count:])


def _data(cfg, world: World = SINGLE) -> dict:
    """Raw prompts (OPD, cold start, eval) with answers and the checker, for either mode."""
    if cfg.embedded:
        config_mod.check_k(cfg, demo.vocab_size())  # before the minutes of SFT a first run takes
        with world.main_first():  # one process trains the models to cache; the others load them
            made = demo.prepare(cfg.cache_dir)
        as_lists = lambda ps: ([p.prompt for p in ps], [p.answer for p in ps])  # noqa: E731
        return {"opd": as_lists(made.opd), "cold_start": as_lists(made.cold_start),
                "eval": as_lists(made.eval[:cfg.eval_max_prompts]), "checker": task.check,
                "student": made.student_dir, "teacher": made.teacher_dir}
    prompts, answers = load_jsonl(cfg.prompts, "--prompts")
    cold_start, opd = (_split_cold_start(prompts, answers, cfg.cold_start_prompts, cfg.seed)
                       if cfg.cold_start else (([], []), (prompts, answers)))
    evaluation = ([], [])
    if cfg.eval_file:
        eval_prompts, eval_answers = load_jsonl(cfg.eval_file, "--eval-file")
        if any(a is None for a in eval_answers):
            raise UsageError("--eval-file: every line needs an \"answer\" to be graded")
        evaluation = (eval_prompts[:cfg.eval_max_prompts], eval_answers[:cfg.eval_max_prompts])
    return {"opd": opd, "cold_start": cold_start, "eval": evaluation, "checker": task.check_reference,
            "student": cfg.student, "teacher": cfg.teacher}


def load_pair(cfg, student_path: str, teacher_path: Optional[str], world: World = SINGLE) -> tuple:
    """Load the student and the teacher (``teacher_path`` None: connect to the served one), check
    they can be paired for the chosen objective, and shard both over ``world``'s processes when
    there are several; returns (pair, the tokenizer to batch with, the teacher's or None, the
    student's own for checkpoints)."""
    half = cfg.torch_dtype != torch.float32
    # The student keeps fp32 master weights (optimizer updates of lr 1e-6 vanish in bf16) and
    # computes in cfg.dtype under autocast; the teacher is only ever read, so it lives in cfg.dtype.
    student, student_tok, own_tok = load_model(student_path, torch.float32, cfg.device)
    student_head = output_head(student, "student")
    teacher = teacher_tok = teacher_head = None
    if teacher_path is not None:
        teacher, teacher_tok, _ = load_model(teacher_path, cfg.torch_dtype, cfg.device)
        teacher.requires_grad_(False).eval()
        check_same_tokenizer(student_tok, teacher_tok)
        teacher_head = output_head(teacher, "teacher")
    vocab_size = min(head.weight.shape[0] for head in (student_head, teacher_head) if head is not None)
    config_mod.check_k(cfg, vocab_size)
    if len(student_tok) > vocab_size:
        raise UsageError(f"the tokenizer has {len(student_tok)} tokens but one model scores only "
                         f"{vocab_size}: the objective cannot compare the rest")
    probe = student_tok("The quick brown fox 12+34=", return_tensors="pt")["input_ids"].to(cfg.device)
    with _precision(cfg):
        verify_output_head(student, student_head, probe, "student")
        if teacher is not None:
            verify_output_head(teacher, teacher_head, probe, "teacher")
    client = None if teacher is not None else served.connect(cfg, vocab_size, probe[0].tolist())
    if world.launched:
        mesh = distributed.mesh(cfg.device)
        student_head = distributed.shard(student, student_head, mesh)
        teacher_head = distributed.shard(teacher, teacher_head, mesh)
    pair = PairedModels(student, teacher, student_head, teacher_head, vocab_size,
                        cfg.torch_dtype if half else torch.float32, client)
    return pair, student_tok, teacher_tok, own_tok


def _precision(cfg):
    if cfg.torch_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=cfg.torch_dtype)


def _table(results: dict) -> str:
    rows = [("student before", "student_before"), ("student after cold start", "student_cold_start"),
            ("student after OPD", "student_after"), ("teacher", "teacher")]
    shown = [(label, key) for label, key in rows if key in results]
    if shown:
        lines = ["", f"{'held-out accuracy':<26}{'':>8}"]
        lines += [f"{label:<26}{100 * results[key]:>7.1f}%" for label, key in shown]
    else:
        lines = ["", "no held-out accuracy: give --eval-file (prompts with answers) to measure it"]
    if "gap_recovery" in results:
        lines.append(f"{'gap recovery':<26}{100 * results['gap_recovery']:>7.1f}%")
    lines.append(f"{'wall time (all sessions)':<26}{results['wall_time_s']:>7.0f}s")
    return "\n".join(lines)


def _save_results(path: str, results: dict) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def run(cfg, world: World = SINGLE) -> tuple:
    """The whole run; returns (results, whether it finished: False after a Ctrl-C). On several
    processes every one runs it; the main process writes the run folder and prints."""
    began = time.time()
    say = print if world.main else lambda *args, **kwargs: None
    data = _data(cfg, world)
    checkpoints = os.path.join(cfg.output_dir, "checkpoints")
    resume_from = latest_checkpoint(checkpoints) if cfg.resume else None
    if resume_from and not os.path.isdir(resume_from):
        raise UsageError(f"--resume: {os.path.join(checkpoints, 'latest')} names {resume_from}, "
                         f"which does not exist")
    state = load_trainer_state(resume_from) if resume_from else None
    if state is not None and state["step"] > cfg.steps:
        raise UsageError(f"--steps {cfg.steps}: the run's latest checkpoint is of step {state['step']}")
    if state is not None and state["processes"] != world.size:
        raise UsageError(f"--resume: the run was made on {state['processes']} process(es), this is "
                         f"{world.size}: resume it on as many (torchrun --nproc-per-node, --nnodes)")
    if state is not None:
        state["checkpoint"] = resume_from
    pair, tokenizer, teacher_tok, own_tok = load_pair(cfg, model_dir(resume_from) if resume_from else data["student"],
                                                  data["teacher"], world)
    # Every check has passed: only now does the folder become a run's.
    if world.main:
        os.makedirs(checkpoints, exist_ok=True)
        for folder in (cfg.output_dir, checkpoints):
            for name in remove_leftovers(folder):
                print(f"removed {os.path.join(folder, name)}, left by a run killed while writing")
        if not cfg.resume:
            config_mod.save(cfg, os.path.join(cfg.output_dir, "config.json"))
    before = state["wall_time_s"] if state is not None else 0.0
    wall_time = lambda: before + time.time() - began  # noqa: E731
    template = lambda ps: apply_template(ps, cfg.prompt_template, tokenizer, teacher_tok)  # noqa: E731
    opd_prompts, add_special = template(data["opd"][0])
    eval_prompts, _ = template(data["eval"][0])
    results_path = os.path.join(cfg.output_dir, "eval.json")
    results = {}
    if cfg.resume and os.path.exists(results_path) and world.main:
        with open(results_path) as f:
            results = json.load(f)
    results = world.from_main(results)  # what it holds decides what is evaluated: on every process
    evaluate = lambda model: accuracy(model, tokenizer, eval_prompts, data["eval"][1], data["checker"],  # noqa: E731
                                      max_new_tokens=cfg.max_new_tokens, add_special_tokens=add_special,
                                      world=world)
    held_out = None
    if eval_prompts and cfg.eval_every:
        held_out = heldout.HeldOut(os.path.join(cfg.output_dir, heldout.FILE),
                                   eval_prompts[:cfg.eval_diagnostics_prompts], every=cfg.eval_every,
                                   steps=cfg.steps, seed=cfg.seed, world=world)
    elif cfg.eval_every:
        say("no --eval-file: no held-out accuracy and no held-out diagnostics")
    _seed_everything(cfg.seed)  # the same rollouts whether or not the demo models were just trained
    with _precision(cfg):
        if eval_prompts and "student_before" not in results:
            results["student_before"] = evaluate(pair.student)
            if pair.teacher is not None:
                results["teacher"] = evaluate(pair.teacher)
            else:
                say("served teacher: no teacher accuracy, so no gap recovery (the server only scores)")
        if cfg.cold_start and resume_from is None:
            results.update(cold_start(cfg, pair, tokenizer, template(data["cold_start"][0])[0], add_special))
            if eval_prompts:
                results["student_cold_start"] = evaluate(pair.student)
        if world.main:
            _save_results(results_path, results)
        done = train(cfg, pair, tokenizer, PromptSet(opd_prompts, data["opd"][1], data["checker"]),
                     add_special, resumed=state, save_tokenizer=own_tok, heldout=held_out,
                     wall_time=wall_time, world=world)
        if done < cfg.steps:
            launcher = "torchrun ... -m" if world.launched else "python -m"
            say(f"stopped after step {done}; continue with: {launcher} opd_train --resume {cfg.output_dir}")
            return results, False
        if eval_prompts:
            results["student_after"] = evaluate(pair.student)
            if "teacher" in results:
                gap = results["teacher"] - results["student_before"]
                results["gap_recovery"] = (results["student_after"] - results["student_before"]) / gap if gap > 0 else float("nan")
    results["wall_time_s"] = wall_time()
    if world.main:
        _save_results(results_path, results)
        plot_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"),
                     os.path.join(cfg.output_dir, "diagnostics.png"), os.path.join(cfg.output_dir, heldout.FILE))
        print(_table(results))
        print(f"run folder: {cfg.output_dir} (model: {model_dir(latest_checkpoint(checkpoints))})")
    return results, True


def main(argv=None) -> int:
    world = distributed.launched_world()
    try:
        try:
            cfg, _ = config_mod.from_args(sys.argv[1:] if argv is None else argv)
            distributed.check_options(cfg, world)
            outcome = config_mod.resolve(cfg)
        except UsageError as e:  # reported once every process has come this far (agree)
            outcome = e
        _, finished = run(distributed.agree(world, outcome), world)
    except distributed.SharedError as e:
        if world.main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the OPD steps (which checkpoint first): nothing to save
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    finally:
        distributed.close(world)
    return 0 if finished else INTERRUPTED
