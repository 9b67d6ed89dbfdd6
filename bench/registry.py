"""What the suite measures: model shapes, token counts, the ops and the presets."""
from __future__ import annotations

from dataclasses import dataclass


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

# op name -> opd_loss objective (None: a standalone op).
OPS = {
    "logsumexp": None,
    "token_logprobs": None,
    "reverse_kl": None,
    "topk_overlap": None,
    "opd_full": "full",
    "opd_sampled": "sampled",
    "opd_topk": "topk",
}
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
    def objective(self) -> str | None:
        return OPS[self.op]

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd",) if self.op == "topk_overlap" else MODES

    @property
    def label(self) -> str:
        return f"{self.op}/{self.form}/{self.model.name}/N={self.n}"


def grid(models, token_counts, ops=tuple(OPS), forms=FORMS) -> list[Case]:
    return [Case(op, form, model, n) for model in models for n in token_counts
            for form in forms for op in ops]


def preset(name: str) -> list[Case]:
    """The cases of a preset, most important first (a time budget cuts the tail).

    quick: every op and form once on the Qwen pair at N=8192, plus reverse KL on logits at
    N=16384 (the core issue's goal shape). full: quick, then the Qwen N sweep, then Llama-3-8B
    and Gemma-3 at N=8192. cpu: the small CPU shapes.
    """
    quick = grid([QWEN], [8192]) + [Case("reverse_kl", "logits", QWEN, 16384)]
    if name == "quick":
        return quick
    if name == "full":
        rest = grid([QWEN], TOKEN_COUNTS) + grid([LLAMA, GEMMA], [8192])
        return quick + [c for c in rest if c not in quick]
    if name == "cpu":
        return grid([CPU_SMALL], [128, 512])
    raise ValueError(f"unknown preset {name!r}")
