"""The run configuration: one dataclass, its command line, and its resolution.

Every option has one field here; ``resolve`` validates every option and fills what depends on the
machine or the mode (device, dtype, temperatures, output and cache folders) before any work
starts, so that a slip is a message, not a traceback after minutes of SFT, and ``config.json`` in
the run folder states exactly what ran.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Optional

import torch

from opd_kernels import backends, objectives
from opd_kernels.objectives import Need

from .errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a folder holding a run has (one of them is enough to refuse starting another run in it).
RUN_FILES = ("config.json", "metrics.jsonl", "eval.json", "checkpoints")


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
    sampling_temperature: Optional[float] = None  # None: --temperature (filled by resolve)
    loss_temperature: Optional[float] = None
    rollouts_per_prompt: int = 4
    max_new_tokens: int = 512
    prompts_per_step: int = 64
    steps: int = 100
    lr: float = 1e-6
    warmup_steps: int = 0               # linear warmup, then constant (the paper: constant)
    max_grad_norm: float = 1.0
    micro_batch_tokens: int = 16384     # padded tokens per forward/backward; 0 = the whole step
    gradient_checkpointing: bool = False
    diagnostics_every: int = 10
    eval_every: int = 25
    eval_diagnostics_prompts: int = 64
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
    cache_dir: Optional[str] = None     # None: $XDG_CACHE_HOME/opd_train (filled by resolve)
    teacher_server: Optional[str] = None  # a served teacher instead of --teacher (served.py)
    teacher_topk: int = 20              # vLLM's default --max-logprobs
    teacher_timeout_s: float = 120.0
    teacher_attempts: int = 4
    teacher_backoff_s: float = 1.0
    teacher_workers: int = 8

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

    @property
    def needs_top_k(self) -> bool:
        """Whether the objective itself works over the student's top-k (the diagnostics always do)."""
        spec = objectives.get(self.objective)
        return Need.SUPPORT in spec.needs(spec.check_params(self.objective_params))


# The embedded demonstration's settings where they differ from the real-model defaults: small
# models take a larger learning rate (after a short warmup; 2e-3 diverged) and small, many steps.
# Rollouts at tau = 0.5: at tau = 1 the half-trained student's samples leave the teacher's training
# distribution and OPD lowered its greedy accuracy (39.6% -> 24.8% in 300 steps); at 0.5 it rises.
# Full diagnostics every step: with 22 token ids the teacher's full pass costs nothing.
EMBEDDED_DEFAULTS = dict(lr=1e-3, warmup_steps=20, temperature=0.5, steps=800, prompts_per_step=16,
                         rollouts_per_prompt=4, max_new_tokens=40, micro_batch_tokens=0,
                         diagnostics_every=1, eval_every=100, eval_max_prompts=512, save_every=100,
                         cold_start_lr=1e-3, cold_start_steps=100)

HELP = {
    "student": "student model: Hugging Face folder or hub id (default: the embedded demonstration)",
    "teacher": "teacher model: Hugging Face folder or hub id",
    "prompts": "JSONL file, one object a line: {\"prompt\": str, \"answer\": str (optional)}",
    "eval_file": "held-out JSONL prompts with answers: accuracy before and after, and the held-out "
                 "diagnostics",
    "objective": "OPD objective (opd_kernels.objectives): "
                 + "; ".join(f"{name}: {objectives.get(name).summary}"
                             for name in objectives.names(None)).replace("%", "%%"),  # argparse formats help
    "k": "top-k size (the objectives over the student's top-k, and the overlap diagnostics)",
    "temperature": "softmax temperature: the default of both --sampling-temperature and "
                   "--loss-temperature",
    "sampling_temperature": "temperature the rollouts (and the cold start's teacher responses) "
                            "are sampled at",
    "loss_temperature": "temperature of both models' distributions in the loss and the diagnostics",
    "rollouts_per_prompt": "student samples per prompt",
    "max_new_tokens": "response length limit",
    "prompts_per_step": "prompts per optimizer step",
    "steps": "optimizer steps",
    "lr": "learning rate (AdamW, constant after the warmup)",
    "warmup_steps": "linear learning-rate warmup steps",
    "max_grad_norm": "gradient clipping norm",
    "micro_batch_tokens": "token budget of one forward/backward (gradient accumulation): rows x "
                          "their padded length; 0 = the whole step at once",
    "gradient_checkpointing": "recompute the student's layer activations in the backward (memory "
                              "for compute)",
    "diagnostics_every": "full diagnostics (exact reverse KL, teacher entropy and top-k, token "
                         "reward) every N steps and on the last; the steps between log the loss "
                         "only and, with topk, do no teacher lm_head product",
    "eval_every": "held-out diagnostics every N steps (and before the first and after the last): "
                  "student rollouts on a fixed prompt set with fixed seeds; 0 = never",
    "eval_diagnostics_prompts": "prompts of the held-out diagnostics (the first of the eval set)",
    "seed": "random seed",
    "output_dir": "run folder, new or empty (--resume continues one)",
    "device": "auto, cpu, cuda, cuda:N",
    "dtype": "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16",
    "cold_start": "off-policy SFT of the student on teacher responses to held-out prompts first "
                  "(responses cut off at --max-new-tokens are dropped)",
    "cold_start_prompts": "prompts held out of the OPD set for the cold start",
    "cold_start_steps": "cold-start SFT steps",
    "cold_start_lr": "cold-start SFT learning rate",
    "prompt_template": "auto (student's chat template if any), teacher (the teacher's chat template: "
                       "teacher-aligned prompts), none (raw), or a string containing {prompt}",
    "eval_max_prompts": "evaluate accuracy on at most this many held-out prompts",
    "save_every": "checkpoint every N steps (and at the end, and on Ctrl-C); 0 = only then",
    "keep_checkpoints": "checkpoints kept in the run folder; 0 = all",
    "resume": "continue the run in this folder from its latest checkpoint",
    "cache_dir": "where the embedded demonstration caches its trained teacher and student",
    "teacher_server": "a served teacher instead of --teacher: the root URL of an OpenAI-compatible "
                      "server (vllm serve TEACHER --max-logprobs K), e.g. http://localhost:8000; the "
                      "objective must be one of " + ", ".join(objectives.names("served")),
    "teacher_topk": "K, the served teacher's log-probs a position (prompt_logprobs; the server's "
                    "--max-logprobs must allow it); --k <= K",
    "teacher_timeout_s": "seconds a teacher request waits to connect and for each read",
    "teacher_attempts": "tries of each teacher request (connection errors, timeouts, 5xx/429, "
                        "malformed answers) before the run stops at its last checkpoint",
    "teacher_backoff_s": "wait before the second try of a teacher request, doubled each try",
    "teacher_workers": "teacher requests in flight at once",
}
# What --resume may change besides --steps: how to reach the served teacher, not what it is.
RESUME_MAY_CHANGE = ("steps", "teacher_server", "teacher_timeout_s", "teacher_attempts",
                     "teacher_backoff_s", "teacher_workers")
SERVED_OPTIONS = ("teacher_topk", *RESUME_MAY_CHANGE[2:])


def _param_help(param: str) -> str:
    spec, users = declared_param(param)
    return (f"{param} of objective {', '.join(users)}: a number in [{spec.low:g}, {spec.high:g}]; "
            f"the other objectives take no {param}")


HELP.update({param: _param_help(param) for param in OBJECTIVE_PARAMS})

# Defaults that resolve() fills, as --help states them.
_RESOLVED_DEFAULTS = {"sampling_temperature": "--temperature", "loss_temperature": "--temperature",
                      "output_dir": "runs/opd-<time>",
                      "cache_dir": "$XDG_CACHE_HOME/opd_train, else ~/.cache/opd_train"}


def _with_defaults(name: str, default) -> str:
    """The option's help with its default and, where it differs, the embedded demonstration's."""
    shown = _RESOLVED_DEFAULTS.get(name, "off" if default is False else default)
    parts = [] if shown is None else [f"default: {shown}"]
    if EMBEDDED_DEFAULTS.get(name, default) != default:
        parts.append(f"embedded demonstration: {EMBEDDED_DEFAULTS[name]}")
    return HELP[name] + (f" ({'; '.join(parts)})" if parts else "")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opd_train",
        description="On-policy distillation of a student LM by a teacher LM with opd_kernels. "
                    "Without --student/--teacher: the embedded CPU demonstration.")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = _with_defaults(f.name, f.default)
        if f.type == "bool":
            p.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        kind = {"int": int, "float": float, "Optional[float]": float}.get(f.type, str)
        kwargs = dict(type=kind, default=None, help=help_text)
        if f.name == "objective":
            kwargs["choices"] = objectives.names(None)
        if f.name == "dtype":
            kwargs["choices"] = ("auto", *DTYPES)
        p.add_argument(flag, **kwargs)
    return p


def _run_config(path: str) -> Config:
    with open(path) as f:
        saved = json.load(f)
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise UsageError(f"--resume: {path} was written by another version of opd_train (unknown "
                         f"options {', '.join(unknown)}); start a new run")
    return Config(**saved)


def from_args(argv) -> tuple:
    """(Config, the set of fields given on the command line)."""
    args = vars(parser().parse_args(argv))
    given = {k for k, v in args.items() if v is not None}
    if args["resume"]:
        path = os.path.join(args["resume"], "config.json")
        if not os.path.isfile(path):
            raise UsageError(f"--resume: no run to resume in {args['resume']} (no config.json)")
        base = _run_config(path)
        base.resume = args["resume"]
        base.output_dir = args["resume"]  # the folder may have moved since
        may_change = RESUME_MAY_CHANGE if base.teacher_server else ("steps",)
        unexpected = given - {"resume", *may_change}
        if unexpected:
            raise UsageError("--resume continues a run with its saved config; only "
                             f"{', '.join(map(_flag, may_change))} may change (got "
                             f"{', '.join(map(_flag, sorted(unexpected)))})")
        for name in given & set(may_change):
            setattr(base, name, args[name])
        return base, given
    cfg = Config(**{k: v for k, v in args.items() if v is not None})
    takes = objectives.get(cfg.objective).params
    for param in OBJECTIVE_PARAMS:
        if param in given and param not in takes:
            raise UsageError(f"--{param} is a parameter of objective "
                             f"{', '.join(declared_param(param)[1])}; --objective {cfg.objective} "
                             f"does not take it")
    if cfg.teacher_server is None and given & set(SERVED_OPTIONS):
        raise UsageError(f"{', '.join(_flag(n) for n in SERVED_OPTIONS if n in given)}: options of "
                         f"a served teacher, which needs --teacher-server URL")
    if cfg.embedded:
        for name, value in EMBEDDED_DEFAULTS.items():
            if name not in given:
                setattr(cfg, name, value)
    return cfg, given


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_AT_LEAST_ONE = ("k", "rollouts_per_prompt", "max_new_tokens", "prompts_per_step", "steps",
                 "diagnostics_every", "eval_diagnostics_prompts", "cold_start_prompts",
                 "cold_start_steps", "eval_max_prompts", "teacher_topk", "teacher_attempts",
                 "teacher_workers")
_AT_LEAST_ZERO = ("warmup_steps", "micro_batch_tokens", "eval_every", "save_every", "keep_checkpoints",
                  "teacher_backoff_s")
_POSITIVE = ("temperature", "sampling_temperature", "loss_temperature", "lr", "max_grad_norm",
             "cold_start_lr", "teacher_timeout_s")


def _check_numbers(cfg: Config) -> None:
    for names, bound, ok in ((_AT_LEAST_ONE, ">= 1", lambda v: v >= 1),
                             (_AT_LEAST_ZERO, ">= 0", lambda v: v >= 0),
                             (_POSITIVE, "> 0", lambda v: v > 0 and v != float("inf"))):
        for name in names:
            value = getattr(cfg, name)
            if not ok(value):  # NaN fails every comparison
                raise UsageError(f"{_flag(name)} must be {bound}, got {value}")


def _check_output_dir(cfg: Config) -> None:
    """A new or empty folder for a new run, the run's own folder for --resume."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output-dir {out}: exists and is not a folder")
    held = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if held and not cfg.resume:
        raise UsageError(f"--output-dir {out} already holds a run ({', '.join(held)}): continue it "
                         f"with --resume {out}, or give a new --output-dir")
    parent = out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {out}: {parent} is not a writable folder")


def kernel_k_limit(device: str, dtype: torch.dtype) -> Optional[int]:
    """The largest k of the fused-linear backend the kernels' "auto" picks for tensors on this
    device (the Triton kernels on a GPU keep the running top-k on chip); None: any k."""
    probe = torch.empty(0, device=device, dtype=dtype)
    return backends.resolve("auto", "fused_linear", [probe]).capabilities.max_k


def check_k(cfg: Config, vocab_size: int) -> None:
    """k against the ids both models score: the objectives over the student's top-k need k of
    them; for the others k only sizes the diagnostics' top-k, which is clipped to fit."""
    if cfg.k > vocab_size and cfg.needs_top_k:
        raise UsageError(f"--objective {cfg.objective} (over the student's top-k) with --k {cfg.k}: "
                         f"the models share only {vocab_size} ids")
    cfg.k = min(cfg.k, vocab_size)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "opd_train")


def _check_served(cfg: Config) -> None:
    """A served teacher replaces --teacher, and gives only what its top-K answer holds."""
    url = urllib.parse.urlsplit(cfg.teacher_server)
    try:
        url.port  # noqa: B018  (raises on a malformed port)
    except ValueError as e:
        raise UsageError(f"--teacher-server {cfg.teacher_server}: {e}") from e
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
        raise UsageError(f"--teacher-server {cfg.teacher_server}: expected the server's root URL, "
                         f"http(s)://HOST:PORT, e.g. http://localhost:8000")
    if url.path.rstrip("/").endswith(("/v1", "/v1/completions")):
        raise UsageError(f"--teacher-server {cfg.teacher_server}: give the server's root URL, "
                         f"without the /v1 path (the client adds /v1/completions)")
    served = objectives.names("served")
    if cfg.objective not in served:
        raise UsageError(f"--objective {cfg.objective} needs the teacher's full distribution, which a "
                         f"served teacher does not give; with --teacher-server use one of "
                         f"{', '.join(served)}")
    if cfg.loss_temperature != 1.0:
        raise UsageError(f"--loss-temperature {cfg.loss_temperature}: a served teacher's log-probs "
                         f"are of its raw logits (vLLM applies no temperature to prompt log-probs), "
                         f"so the loss runs at temperature 1; set the rollouts' temperature with "
                         f"--sampling-temperature")
    if cfg.k > cfg.teacher_topk:
        raise UsageError(f"--k {cfg.k} > --teacher-topk {cfg.teacher_topk}: the diagnostics compare "
                         f"the student's top-k with the teacher's first k of its K")
    if cfg.cold_start:
        raise UsageError("--cold-start samples responses from the teacher, which --teacher-server "
                         "does not do (it only scores): run the cold start with --teacher")
    if cfg.prompt_template == "teacher":
        raise UsageError("--prompt-template teacher needs the teacher's tokenizer; with "
                         "--teacher-server give the template as a string containing {prompt}")


def resolve(cfg: Config) -> Config:
    """Validate every option, and fill device, dtype, temperatures and folders."""
    if cfg.teacher_server is not None:
        if cfg.student is None or cfg.teacher is not None:
            raise UsageError("--teacher-server replaces --teacher: give --student and not --teacher")
    elif (cfg.student is None) != (cfg.teacher is None):
        raise UsageError("give both --student and --teacher (or neither, for the embedded demonstration)")
    if not cfg.embedded and not cfg.prompts:
        raise UsageError("--prompts FILE.jsonl is required with --student")
    if cfg.embedded and (cfg.prompts or cfg.eval_file):
        raise UsageError("--prompts/--eval-file need --student and --teacher")
    template = cfg.prompt_template
    if template not in ("auto", "teacher", "none") and "{prompt}" not in template:
        raise UsageError(f"--prompt-template: expected auto, teacher, none or a string containing "
                         f"{{prompt}}, got {template!r}")
    if cfg.embedded and template == "teacher":
        raise UsageError("--prompt-template teacher: the embedded demonstration's tokenizer has no chat template")
    for name in ("prompts", "eval_file"):
        path = getattr(cfg, name)
        if path and not os.path.isfile(path):
            raise UsageError(f"{_flag(name)}: file not found: {path}")
    for name in ("sampling_temperature", "loss_temperature"):
        if getattr(cfg, name) is None:
            setattr(cfg, name, cfg.temperature)
    _check_numbers(cfg)
    try:
        objectives.get(cfg.objective).check_params(cfg.objective_params)
    except ValueError as e:
        raise UsageError(f"--objective {cfg.objective}: {e}") from e
    if cfg.teacher_server is not None:
        _check_served(cfg)
    elif cfg.objective not in objectives.names("dense"):
        raise UsageError(f"--objective {cfg.objective} is for a served teacher's top-K answer: give "
                         f"--teacher-server URL, or one of {', '.join(objectives.names('dense'))}")
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: no CUDA device here")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise UsageError(f"--device {cfg.device}: expected auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if cfg.device.startswith("cuda") else "float32"
    limit = kernel_k_limit(cfg.device, cfg.torch_dtype)
    if limit is not None and cfg.k > limit:
        raise UsageError(f"--k {cfg.k}: the fused-linear kernels on {cfg.device} take k <= {limit} "
                         f"(the top-k of the diagnostics{' and of the objective' if cfg.needs_top_k else ''})")
    if cfg.output_dir is None:
        cfg.output_dir = os.path.join("runs", time.strftime("opd-%Y%m%d-%H%M%S"))
    _check_output_dir(cfg)
    cfg.cache_dir = cfg.cache_dir or default_cache_dir()
    return cfg


def save(cfg: Config, path: str) -> None:
    from .checkpoint import atomic_write_text
    atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
