"""The run folder's JSONL logs (metrics.jsonl, heldout.jsonl): one object a line, with a "step"."""
from __future__ import annotations

import json
import os

from .checkpoint import atomic_write_text


def read_rows(path: str) -> list:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_rows(path: str, last_step: int) -> None:
    """Drop the rows of steps after ``last_step``: they ran after the checkpoint a resumed run
    starts from, and it redoes them. Atomic, so that a kill here loses no line."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
        atomic_write_text(path, "".join(kept))
