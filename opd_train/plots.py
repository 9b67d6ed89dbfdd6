"""PNG plots of the per-step diagnostics in metrics.jsonl (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

PANELS = (
    ("reverse_kl", "reverse KL (token mean)"),
    ("overlap", "top-k overlap ratio"),
    (("student_mass", "teacher_mass"), "overlap mass"),
    ("overlap_advantage", "overlap-token advantage"),
    (("student_entropy", "teacher_entropy"), "entropy"),
    ("reward", "mean reward"),
    ("grad_norm", "gradient norm"),
    ("response_length", "response length (tokens)"),
    ("tokens_per_s", "response tokens / s"),
)


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, out_dir: str) -> list:
    """One PNG with a panel per diagnostic, plus one PNG per panel; returns the files written."""
    rows = read_metrics(metrics_path)
    if not rows:
        return []
    os.makedirs(out_dir, exist_ok=True)
    steps = [r["step"] for r in rows]
    written = []
    cols = 3
    grid, axes = plt.subplots(math.ceil(len(PANELS) / cols), cols, figsize=(4.2 * cols, 3.0 * math.ceil(len(PANELS) / cols)))
    for ax, (keys, title) in zip(axes.flat, PANELS):
        single, single_ax = plt.subplots(figsize=(5, 3.2))
        for target in (ax, single_ax):
            for key in (keys,) if isinstance(keys, str) else keys:
                target.plot(steps, [r.get(key, math.nan) for r in rows], label=key)
            target.set_title(title)
            target.set_xlabel("step")
            if not isinstance(keys, str):
                target.legend(fontsize="small")
        name = os.path.join(out_dir, f"{keys if isinstance(keys, str) else keys[0].split('_')[1]}.png")
        single.tight_layout()
        single.savefig(name, dpi=100)
        plt.close(single)
        written.append(name)
    grid.tight_layout()
    overview = os.path.join(out_dir, "diagnostics.png")
    grid.savefig(overview, dpi=100)
    plt.close(grid)
    return [overview] + written
