"""The run configuration: one dataclass, its command line, and its resolution.

Every option has one field here; ``resolve`` fills what depends on the machine or the mode (device,
dtype, output folder) so that ``config.json`` in the run folder states exactly what ran.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from opd_kernels import objectives

from .errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def declared_param(param: str) -> tuple:
    """(the Param that the registered objectives declare under this name, their names), read
    from opd_kernels.objectives. Objectives sharing a parameter name must agree on it (one option)."""
    specs = {name: objectives.get(name).params[param] for name in objectives.names()
             if param in objectives.get(name).params}
    if len(set(specs.values())) != 1:
        raise RuntimeError(f"objective parameter {param!r} is declared {len(specs)} ways: {specs}")
    return next(iter(specs.values())), tuple(specs)


# The objectives' parameters that are options here: one Config field each, whose default, range
# and --help come from the declarations.
OBJECTIVE_PARAMS = ("beta",)


@dataclass
class Config:
    student: Optional[str] = None       # HF folder or hub id; None = the embedded task's student
    teacher: Optional[str] = None
    prompts: Optional[str] = None       # JSONL: {"prompt": ..., "answer": optional}
    eval_file: Optional[str] = None
    objective: str = "topk"
    k: int = 16
    beta: float = declared_param("beta")[0].default  # only for the objectives declaring it (jsd)
    temperature: float = 1.0
    rollouts_per_prompt: int = 4
    max_new_tokens: int = 512
    prompts_per_step: int = 64
    steps: int = 100
    lr: float = 1e-6
    warmup_steps: int = 0               # linear warmup, then constant (the paper: constant)
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8           # sequences per forward/backward; 0 = the whole step
    seed: int = 0
    output_dir: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    cold_start: bool = False
    cold_start_prompts: int = 256       # held out of the OPD prompts for the cold start
    cold_start_steps: int = 100
    cold_start_lr: float = 1e-5
    prompt_template: str = "auto"
    eval_max_prompts: int = 512
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    cache_dir: str = os.path.join("~", ".cache", "opd_train")

    @property
    def embedded(self) -> bool:
        return self.student is None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def objective_params(self) -> dict:
        """The options the chosen objective declares (e.g. jsd's beta), and only those."""
        return {name: getattr(self, name) for name in objectives.get(self.objective).params}



# The embedded demonstration's settings where they differ from the real-model defaults: small
# models take a larger learning rate (after a short warmup; 2e-3 diverged) and small, many steps.
# Rollouts at tau = 0.5: at tau = 1 the half-trained student's samples leave the teacher's training
# distribution and OPD lowered its greedy accuracy (39.6% -> 24.8% in 300 steps); at 0.5 it rises.
EMBEDDED_DEFAULTS = dict(lr=1e-3, warmup_steps=20, temperature=0.5, steps=800, prompts_per_step=16,
                         rollouts_per_prompt=4, max_new_tokens=40, micro_batch_size=0,
                         eval_max_prompts=512, save_every=100, cold_start_lr=1e-3, cold_start_steps=100)

HELP = {
    "student": "student model: Hugging Face folder or hub id (default: the embedded demonstration)",
    "teacher": "teacher model: Hugging Face folder or hub id",
    "prompts": "JSONL file, one object a line: {\"prompt\": str, \"answer\": str (optional)}",
    "eval_file": "held-out JSONL prompts with answers, for accuracy before and after",
    "objective": "OPD objective (opd_kernels.objectives): "
                 + "; ".join(f"{name}: {objectives.get(name).summary}"
                             for name in objectives.names()).replace("%", "%%"),  # argparse formats help
    "k": "top-k size (the objectives over the student's top-k, and the overlap diagnostics)",
    "temperature": "softmax temperature of both models, also the sampling temperature",
    "rollouts_per_prompt": "student samples per prompt",
    "max_new_tokens": "response length limit",
    "prompts_per_step": "prompts per optimizer step",
    "steps": "optimizer steps",
    "lr": "learning rate (AdamW, constant after the warmup)",
    "warmup_steps": "linear learning-rate warmup steps",
    "max_grad_norm": "gradient clipping norm",
    "micro_batch_size": "sequences per forward/backward (gradient accumulation); 0 = all at once",
    "seed": "random seed",
    "output_dir": "run folder (default: runs/opd-<time>)",
    "device": "auto, cpu, cuda, cuda:N",
    "dtype": "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16",
    "cold_start": "off-policy SFT of the student on teacher responses to held-out prompts first",
    "cold_start_prompts": "prompts held out of the OPD set for the cold start",
    "cold_start_steps": "cold-start SFT steps",
    "cold_start_lr": "cold-start SFT learning rate",
    "prompt_template": "auto (student's chat template if any), teacher (the teacher's chat template: "
                       "teacher-aligned prompts), none (raw), or a string containing {prompt}",
    "eval_max_prompts": "evaluate on at most this many held-out prompts",
    "save_every": "checkpoint every N steps (and at the end, and on Ctrl-C)",
    "keep_checkpoints": "checkpoints kept in the run folder",
    "resume": "continue the run in this folder from its latest checkpoint",
    "cache_dir": "where the embedded demonstration caches its trained teacher and student",
}


def _param_help(param: str) -> str:
    spec, users = declared_param(param)
    return (f"{param} of objective {', '.join(users)}: a number in [{spec.low:g}, {spec.high:g}] "
            f"(default {spec.default:g}); the other objectives take no {param}")


HELP.update({param: _param_help(param) for param in OBJECTIVE_PARAMS})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opd_train",
        description="On-policy distillation of a student LM by a teacher LM with opd_kernels. "
                    "Without --student/--teacher: the embedded CPU demonstration.")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", default=None, help=HELP[f.name])
            continue
        kind = {"int": int, "float": float}.get(f.type, str)
        kwargs = dict(type=kind, default=None, help=HELP[f.name])
        if f.name == "objective":
            kwargs["choices"] = objectives.names()
        if f.name == "dtype":
            kwargs["choices"] = ("auto", *DTYPES)
        p.add_argument(flag, **kwargs)
    return p


def from_args(argv) -> tuple:
    """(Config, the set of fields given on the command line)."""
    args = vars(parser().parse_args(argv))
    given = {k for k, v in args.items() if v is not None}
    if args["resume"]:
        path = os.path.join(args["resume"], "config.json")
        if not os.path.exists(path):
            raise UsageError(f"--resume: no run to resume in {args['resume']} (no config.json)")
        with open(path) as f:
            base = Config(**json.load(f))
        base.resume = args["resume"]
        unexpected = given - {"resume", "steps"}
        if unexpected:
            raise UsageError("--resume continues a run with its saved config; only --steps may "
                             f"change (got {', '.join(sorted(unexpected))})")
        if "steps" in given:
            base.steps = args["steps"]
        return base, given
    cfg = Config(**{k: v for k, v in args.items() if v is not None})
    takes = objectives.get(cfg.objective).params
    for param in OBJECTIVE_PARAMS:
        if param in given and param not in takes:
            raise UsageError(f"--{param} is a parameter of objective "
                             f"{', '.join(declared_param(param)[1])}; --objective {cfg.objective} "
                             f"does not take it")
    if cfg.embedded:
        for name, value in EMBEDDED_DEFAULTS.items():
            if name not in given:
                setattr(cfg, name, value)
    return cfg, given


def resolve(cfg: Config) -> Config:
    """Validate, and fill device, dtype and output folder."""
    if (cfg.student is None) != (cfg.teacher is None):
        raise UsageError("give both --student and --teacher (or neither, for the embedded demonstration)")
    if not cfg.embedded and not cfg.prompts:
        raise UsageError("--prompts FILE.jsonl is required with --student/--teacher")
    if cfg.embedded and (cfg.prompts or cfg.eval_file):
        raise UsageError("--prompts/--eval-file need --student and --teacher")
    for name in ("k", "rollouts_per_prompt", "max_new_tokens", "prompts_per_step", "steps"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.temperature <= 0:
        raise UsageError("--temperature must be > 0")
    try:
        objectives.get(cfg.objective).check_params(cfg.objective_params)
    except ValueError as e:
        raise UsageError(f"--objective {cfg.objective}: {e}") from e
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: no CUDA device here")
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if cfg.device.startswith("cuda") else "float32"
    if cfg.output_dir is None:
        cfg.output_dir = os.path.join("runs", time.strftime("opd-%Y%m%d-%H%M%S"))
    return cfg


def save(cfg: Config, path: str) -> None:
    from .checkpoint import atomic_write_text
    atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
