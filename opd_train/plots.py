"""A PNG of the diagnostics: the per-step ones of metrics.jsonl and the held-out ones of
heldout.jsonl beside them (matplotlib, Agg backend).

Each per-step series is drawn raw (faint) with a smoothed line over it: with a few prompts a step
the raw curve is mostly the noise of which prompts came up. Steps without a value (the full
diagnostics come every --diagnostics-every steps) are skipped, not drawn as gaps. The two series
of a panel get distinct colours and line styles, so one close to the other stays visible.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from .runlog import read_rows  # noqa: E402

# (keys, title, y-axis label)
PANELS = (
    (("reverse_kl",), "reverse KL(p || q), token mean", "nats"),
    (("overlap",), "top-k overlap ratio |S ∩ T| / k", "ratio"),
    (("student_mass", "teacher_mass"), "overlap mass on S ∩ T", "probability"),
    (("overlap_advantage",), "overlap-token advantage", "nats"),
    (("student_entropy", "teacher_entropy"), "entropy", "nats"),
    (("token_reward",), "mean token reward log q(y) - log p(y)", "nats"),
    (("rollout_accuracy",), "rollout accuracy", "fraction correct"),
    (("grad_norm",), "gradient norm (before clipping)", "L2 norm"),
    (("response_length",), "response length", "tokens"),
    (("tokens_per_s",), "speed", "response tokens / s"),
)
STYLES = (dict(color="tab:blue", linestyle="-"), dict(color="tab:orange", linestyle="--"))
HELDOUT_MARKERS = ("o", "s")
HELDOUT_COLOR = "tab:green"


def series(rows: list, key: str) -> tuple:
    """(steps, values) of the rows where ``key`` has a finite value."""
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def smoothed(values: list, span: int) -> list:
    """An exponential moving average with the weight of a ``span``-point window, bias-corrected
    so that the first points are not pulled toward 0."""
    alpha, mean, weight, out = 2.0 / (span + 1), 0.0, 0.0, []
    for v in values:
        mean = (1 - alpha) * mean + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(mean / weight)
    return out


def figure(rows: list, held: list):
    """The matplotlib figure: a panel per diagnostic against the step."""
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(PANELS) / cols), cols, figsize=(14, 10))
    for ax, (keys, title, ylabel) in zip(axes.flat, PANELS):
        for key, style, marker in zip(keys, STYLES, HELDOUT_MARKERS):
            steps, values = series(rows, key)
            if not steps:
                continue
            ax.plot(steps, values, alpha=0.25, linewidth=0.8, **style)
            ax.plot(steps, smoothed(values, max(3, len(values) // 10)), label=key, linewidth=1.6, **style)
            held_steps, held_values = series(held, key)
            if held_steps:
                ax.plot(held_steps, held_values, marker=marker, markersize=4, color=HELDOUT_COLOR,
                        linestyle=style["linestyle"], label=f"{key} (held-out)")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_metrics(metrics_path: str, out_path: str, heldout_path: str = "") -> bool:
    """One PNG of metrics.jsonl and heldout.jsonl; False when there is nothing to plot."""
    rows = read_rows(metrics_path)
    if not rows:
        return False
    fig = figure(rows, read_rows(heldout_path))
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return True
