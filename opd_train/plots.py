"""A PNG of the per-step diagnostics in metrics.jsonl (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

PANELS = (
    (("reverse_kl",), "reverse KL (token mean)"),
    (("overlap",), "top-k overlap ratio"),
    (("student_mass", "teacher_mass"), "overlap mass"),
    (("overlap_advantage",), "overlap-token advantage"),
    (("student_entropy", "teacher_entropy"), "entropy"),
    (("token_reward",), "mean token reward log q(y) - log p(y)"),
    (("rollout_accuracy",), "rollout accuracy"),
    (("grad_norm",), "gradient norm"),
    (("response_length",), "response length (tokens)"),
    (("tokens_per_s",), "response tokens / s"),
)


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, out_path: str) -> bool:
    """One PNG, a panel per diagnostic against the step; False when there is nothing to plot."""
    rows = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    if not rows:
        return False
    steps = [r["step"] for r in rows]
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(PANELS) / cols), cols, figsize=(13, 9))
    for ax, (keys, title) in zip(axes.flat, PANELS):
        for key in keys:
            ax.plot(steps, [r.get(key, math.nan) for r in rows], label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize="small")
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return True
