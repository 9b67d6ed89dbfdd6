"""An experiment's outputs in its run folder: NAME.json (every number), NAME.md (the table and
the verdict) and NAME.png (accuracies, held-out diagnostics against the step, and the
experiment's own panel)."""
from __future__ import annotations

import json
import math
import os

from ..checkpoint import atomic_write_text
from ..plots import plt, smoothed
from .arms import RESPONSE_PARTS
from .specs import Experiment, first_last, gain

ACCURACIES = (("student_before", "before"), ("student_cold_start", "after cold start"),
              ("student_after", "after OPD"), ("teacher", "teacher"))
# (held-out diagnostic, panel title); the second key of a pair is drawn dashed
CURVES = ((("reverse_kl",), "held-out reverse KL(p || q), nats"),
          (("overlap",), "held-out top-k overlap ratio |S ∩ T| / k"),
          (("student_mass_shared", "teacher_mass_shared"), "held-out overlap mass (student, teacher dashed)"),
          (("student_entropy",), "held-out student entropy, nats"))


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def table(experiment: Experiment, records: dict, reproduced: bool, wall_time_s: float) -> str:
    lines = [f"# {experiment.name}", "", f"Claim: {experiment.claim}.", "",
             f"Test: {experiment.test}.", "",
             "| arm | teacher | before | after cold start | after OPD | gain | reverse KL (first -> last) "
             "| overlap ratio (first -> last) | student overlap mass (last) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, r in records.items():
        kl, overlap = first_last(r, "reverse_kl"), first_last(r, "overlap")
        lines.append(f"| {label} | {_pct(r.get('teacher'))} | {_pct(r['student_before'])} | "
                     f"{_pct(r.get('student_cold_start'))} | {_pct(r['student_after'])} | "
                     f"{100 * gain(r):+.1f} | {kl[0]:.3f} -> {kl[1]:.3f} | {overlap[0]:.3f} -> {overlap[1]:.3f} | "
                     f"{first_last(r, 'student_mass_shared')[1]:.3f} |")
    benchmarks = {label: r["benchmark"] for label, r in records.items() if "benchmark" in r}
    if benchmarks:
        lines += ["", "Benchmark (held-out questions over the student's known entities only):", "",
                  "| arm | teacher | student before | student after OPD |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {label} | {_pct(b['teacher'])} | {_pct(b['student_before'])} | {_pct(b['student_after'])} |"
                  for label, b in benchmarks.items()]
    entropies = {label: r["entropy_by_position"] for label, r in records.items() if "entropy_by_position" in r}
    if entropies:
        parts = " | ".join(f"part {i + 1}" for i in range(RESPONSE_PARTS))
        lines += ["", f"Student entropy (nats) over each {RESPONSE_PARTS}th of its held-out responses, "
                  "by checkpoint:", "", f"| arm | step | {parts} |", "| --- | ---: |" + " ---: |" * RESPONSE_PARTS]
        lines += [f"| {label} | {step} | " + " | ".join(f"{e:.3f}" for e in values) + " |"
                  for label, by_step in entropies.items() for step, values in by_step.items()]
    lines += ["", f"**Reproduced: {'yes' if reproduced else 'no'}.** Wall time {wall_time_s:.0f} s.", ""]
    return "\n".join(lines)


def _accuracy_panel(ax, records: dict) -> None:
    width = 0.8 / len(ACCURACIES)
    for i, (key, name) in enumerate(ACCURACIES):
        values = [r.get(key, math.nan) for r in records.values()]
        ax.bar([j + i * width for j in range(len(records))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(records))], list(records), fontsize="x-small",
                  rotation=15)
    ax.set_ylim(0, 1)
    ax.set_title("held-out accuracy (greedy)", fontsize="medium")
    ax.legend(fontsize="x-small")


def _own_panel(ax, records: dict) -> None:
    """The entropy along the responses where measured, else the rollout accuracy of each step."""
    entropies = {label: r["entropy_by_position"] for label, r in records.items() if "entropy_by_position" in r}
    if entropies:
        for (label, by_step), style in zip(entropies.items(), ("-", "--")):
            steps = list(by_step)
            for step, color in zip(steps, plt.cm.viridis([i / max(1, len(steps) - 1) for i in range(len(steps))])):
                ax.plot(range(1, RESPONSE_PARTS + 1), by_step[step], style, color=color, marker="o",
                        markersize=3, label=f"{label}, step {step}")
        ax.set_xlabel(f"part of the response (1 = first {RESPONSE_PARTS}th)")
        ax.set_title("student entropy along its responses, by checkpoint", fontsize="medium")
    else:
        for label, r in records.items():
            values = [v for v in r["rollout_accuracy"] if not math.isnan(v)]
            ax.plot(range(1, len(values) + 1), smoothed(values, max(3, len(values) // 10)), label=label)
        ax.set_xlabel("step")
        ax.set_title("rollout accuracy (smoothed)", fontsize="medium")
    ax.legend(fontsize="xx-small")


def figure(experiment: Experiment, records: dict, path: str) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    _accuracy_panel(axes.flat[0], records)
    for ax, (keys, title) in zip(axes.flat[1:], CURVES):
        for label, r in records.items():
            steps, color = [row["step"] for row in r["heldout"]], None  # an arm's two keys share a colour
            for key, style in zip(keys, ("-", "--")):
                (line,) = ax.plot(steps, [row[key] for row in r["heldout"]], style, marker="o", markersize=3,
                                  color=color, label=label if color is None else None)
                color = line.get_color()
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.legend(fontsize="x-small")
    _own_panel(axes.flat[5], records)
    fig.suptitle(f"{experiment.name}: {experiment.claim}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=64)
    plt.close(fig)


def write(folder: str, experiment: Experiment, records: dict, reproduced: bool, extra: dict) -> dict:
    """NAME.json, NAME.md and NAME.png in ``folder``; returns their paths."""
    paths = {ext: os.path.join(folder, f"{experiment.name}.{ext}") for ext in ("json", "md", "png")}
    atomic_write_text(paths["json"], json.dumps({"experiment": experiment.name, "claim": experiment.claim,
                                                 "test": experiment.test, "reproduced": reproduced,
                                                 **extra, "arms": records}, indent=1) + "\n")
    atomic_write_text(paths["md"], table(experiment, records, reproduced, extra["wall_time_s"]))
    figure(experiment, records, paths["png"])
    return paths
