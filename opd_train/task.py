"""The embedded reasoning task: multi-digit addition solved with a step-by-step scratchpad.

A problem is posed as ``"Q:0347+0285\nA:"`` and solved column by column from the right, each
step writing the two digits, the carry in and the two-digit column sum, then the answer:

    "7+5+0=12,4+8+1=13,3+2+1=06,0+0+0=00;0632"

Every step is fixed-width, so a small transformer only has to learn local lookups and a carry.
``check`` is exact: the response must end in the correct sum (the scratchpad itself is not graded).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

PROMPT_TEMPLATE = "Q:{a}+{b}\nA:"
ALPHABET = "0123456789+=,;:QA\n"


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    solution: str


def solution(a: int, b: int, digits: int) -> str:
    """The scratchpad and the answer for a + b, both written with ``digits`` digits."""
    xs, ys = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
    carry, steps, ones = 0, [], []
    for x, y in zip(xs, ys):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        ones.append(str(total % 10))
        carry = total // 10
    return ",".join(steps) + ";" + str(carry) + "".join(reversed(ones))


def make_problem(a: int, b: int, digits: int) -> Problem:
    prompt = PROMPT_TEMPLATE.format(a=str(a).zfill(digits), b=str(b).zfill(digits))
    return Problem(prompt=prompt, answer=str(a + b), solution=solution(a, b, digits))


def problems(count: int, digits: int, seed: int, exclude: frozenset = frozenset()) -> list:
    """``count`` distinct random problems of ``digits``-digit operands, none of whose prompts is in
    ``exclude`` (so train, OPD and evaluation sets can be made disjoint)."""
    rng = random.Random(seed)
    hi = 10 ** digits
    if count > hi * hi - len(exclude):
        raise ValueError(f"cannot draw {count} distinct {digits}-digit problems")
    seen, out = set(exclude), []
    while len(out) < count:
        p = make_problem(rng.randrange(hi), rng.randrange(hi), digits)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


_FINAL_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)\s*$")
_LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def check(response: str, answer: str) -> bool:
    """Exact checker for the embedded task: the text after the last ';' is the sum."""
    if ";" not in response:
        return False
    final = response.rsplit(";", 1)[1].strip()
    return final.isdigit() and int(final) == int(answer)


def check_reference(response: str, reference: str) -> bool:
    """Checker for user prompt files: a numeric reference must equal the last number in the
    response (after '####' or \\boxed{} when present); any other reference must appear verbatim
    in the response's last line."""
    text = response.strip()
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        text = boxed[-1]
    elif "####" in text:
        text = text.rsplit("####", 1)[1]
    ref = reference.strip()
    if _FINAL_NUMBER.fullmatch(ref.replace(",", "")):
        numbers = _LAST_NUMBER.findall(text.replace(",", ""))
        return bool(numbers) and float(numbers[-1]) == float(ref.replace(",", ""))
    lines = text.splitlines() or [""]
    return ref in lines[-1]
