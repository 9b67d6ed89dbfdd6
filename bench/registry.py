"""What the suite measures: model shapes, token counts, the ops and the presets."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from opd_kernels import objectives
from opd_kernels.objectives import Need


@dataclass(frozen=True)
class ModelShape:
    """A student/teacher pair sharing one vocabulary (hidden sizes may differ)."""

    name: str
    vocab: int
    student_hidden: int
    teacher_hidden: int


QWEN = ModelShape("qwen2.5-1.5b/7b", 151936, 1536, 3584)
LLAMA = ModelShape("llama-3-8b", 128256, 4096, 4096)
GEMMA = ModelShape("gemma-3-1b/4b", 262144, 1152, 2560)
# Small shapes for the CPU path, where the vocabulary sweep of the GPU suite would take hours.
CPU_SMALL = ModelShape("cpu-small", 32000, 128, 256)
TINY = ModelShape("tiny", 257, 32, 48)
MODELS = {m.name: m for m in (QWEN, LLAMA, GEMMA, CPU_SMALL, TINY)}

TOKEN_COUNTS = (1024, 4096, 8192, 16384)

@dataclass(frozen=True)
class ObjectiveOp:
    """An opd_loss objective (a name of opd_kernels.objectives) at given parameters (the
    declared defaults for the others); what it needs is read from the declaration. With
    ``teacher_k`` the teacher is served: a server's top-K answer of that K, not logits."""

    name: str
    params: tuple = ()  # ((param, value), ...): hashable
    teacher_k: Optional[int] = None

    @property
    def spec(self):
        return objectives.get(self.name)

    @property
    def kwargs(self) -> dict:
        """Every declared parameter, defaults filled in."""
        return self.spec.check_params(dict(self.params))

    @property
    def needs(self) -> frozenset:
        return self.spec.needs(self.kwargs)


# The standalone ops (None: not an objective).
STANDALONE = ("logsumexp", "token_logprobs", "reverse_kl", "topk_overlap")


def _value_name(value: float) -> str:
    return f"{value:g}".replace(".", "p").replace("-", "m")


def objective_ops() -> dict:
    """op name -> ObjectiveOp: ``opd_<name>`` for every registered objective at its defaults,
    then, for each finite end of a declared parameter's range, ``opd_<name>_<param><value>``
    (the jsd at beta = 0 and 1, its special-cased endpoints). Only the former are in the
    presets; the latter are for ``--ops`` and the correctness check."""
    ops, ends = {}, {}
    for name in objectives.names():
        ops[f"opd_{name}"] = ObjectiveOp(name)
        for param, spec in objectives.get(name).params.items():
            for value in (spec.low, spec.high):
                if math.isfinite(value) and value != spec.default:
                    ends[f"opd_{name}_{param}{_value_name(value)}"] = ObjectiveOp(name, ((param, value),))
    return {**ops, **ends}


# The served teacher's answer sizes timed (K ids a position; vLLM's and TRL's usual 20, and 64).
SERVED_K = (20, 64)


def served_op(name: str, teacher_k: int) -> str:
    return f"served_{name}_K{teacher_k}"


def served_ops() -> dict:
    """op name -> ObjectiveOp: ``served_<name>_K<K>`` for every objective that runs on a served
    teacher (``objectives.names("served")``) at its defaults, for each K of SERVED_K."""
    return {served_op(name, teacher_k): ObjectiveOp(name, teacher_k=teacher_k)
            for name in objectives.names("served") for teacher_k in SERVED_K}


# op name -> ObjectiveOp (None: a standalone op).
OPS = {**{op: None for op in STANDALONE}, **objective_ops(), **served_ops()}
# The ops the presets time on every shape: the standalone ones and each objective at its
# defaults on a dense teacher; the served ones on a few shapes (see preset).
PRESET_OPS = tuple(op for op, o in OPS.items()
                   if o is None or (not o.params and o.teacher_k is None))
SERVED_OPS = tuple(served_ops())
FORMS = ("logits", "fused")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    """One op on one shape: ``form`` "logits" takes [N, V] logits, "fused" takes hidden states
    and lm_head weights."""

    op: str
    form: str
    model: ModelShape
    n: int

    @property
    def objective_op(self) -> ObjectiveOp | None:
        return OPS[self.op]

    @property
    def objective(self) -> str | None:
        """The objective's name (None: a standalone op)."""
        return None if OPS[self.op] is None else OPS[self.op].name

    @property
    def objective_params(self) -> dict:
        return {} if OPS[self.op] is None else OPS[self.op].kwargs

    @property
    def teacher_k(self) -> Optional[int]:
        """K of a served teacher's answer; None: a dense teacher (or none)."""
        return None if OPS[self.op] is None else OPS[self.op].teacher_k

    @property
    def needs(self) -> frozenset:
        """What the objective needs (objectives.Need); empty for a standalone op."""
        return frozenset() if OPS[self.op] is None else OPS[self.op].needs

    @property
    def needs_tokens(self) -> bool:
        return Need.TOKENS in self.needs

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd",) if self.op == "topk_overlap" else MODES

    @property
    def label(self) -> str:
        return f"{self.op}/{self.form}/{self.model.name}/N={self.n}"


def grid(models, token_counts, ops=PRESET_OPS, forms=FORMS) -> list[Case]:
    return [Case(op, form, model, n) for model in models for n in token_counts
            for form in forms for op in ops]


def preset(name: str) -> list[Case]:
    """The cases of a preset, most important first (a time budget cuts the tail).

    quick: every op and form once on the Qwen pair at N=8192 (the served ones too), plus
    reverse KL on logits at N=16384 (the core issue's goal shape). full: quick, then the Qwen N
    sweep, then Llama-3-8B and Gemma-3 at N=8192, of the dense-teacher ops. cpu: the small CPU
    shapes.
    """
    served = grid([QWEN], [8192], SERVED_OPS)
    # the served-teacher goal's op first (report.goals: fused served topk), should a budget cut
    goal_ops = {served_op("topk", teacher_k) for teacher_k in SERVED_K}
    served.sort(key=lambda c: not (c.op in goal_ops and c.form == "fused"))
    quick = grid([QWEN], [8192]) + [Case("reverse_kl", "logits", QWEN, 16384)] + served
    if name == "quick":
        return quick
    if name == "full":
        rest = grid([QWEN], TOKEN_COUNTS) + grid([LLAMA, GEMMA], [8192])
        return quick + [c for c in rest if c not in quick]
    if name == "cpu":
        return grid([CPU_SMALL], [128, 512], PRESET_OPS + SERVED_OPS)
    raise ValueError(f"unknown preset {name!r}")
