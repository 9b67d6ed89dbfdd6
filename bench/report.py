"""Writes a run's payload as JSON, a markdown report and a PNG chart, named
``<device>_<commit>_<preset>`` so that runs on different GPUs or commits never overwrite."""
from __future__ import annotations

import json
import os
from typing import Optional

from .registry import OPS, QWEN, SERVED_K, served_op


def stem(meta: dict) -> str:
    return f"{meta['device_slug']}_{meta['commit']}_{meta['preset']}"


def write_all(payload: dict, out_dir: str, png: bool = True) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem(payload["meta"]))
    paths = [base + ".json", base + ".md"]
    with open(paths[0], "w") as f:
        json.dump(payload, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown(payload))
    if png and write_png(payload, base + ".png"):
        paths.append(base + ".png")
    return paths


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _rate(v: Optional[float], unit: str) -> str:
    if not v:
        return "–"
    scale, prefix = next((s, p) for s, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1, ""))
                         if v >= s or s == 1)
    return f"{v / scale:.3g} {prefix}{unit}"


def _mib(v: Optional[int]) -> str:
    return "–" if v is None else f"{v / 2**20:.0f}"


def _cell(row: Optional[dict]) -> str:
    """'ms (MiB)' of an ok row; OOM / err / skipped otherwise; '–' where there is no such impl."""
    if row is None:
        return "–"
    status = row["status"]
    if status != "ok":
        return {"OOM": "OOM"}.get(status, "skipped" if status.startswith("skipped") else
                                  "OOM" if status.startswith("OOM") else "error")
    mem = row.get("peak_extra_bytes")
    return _ms(row["median_ms"]) + (f" ({_mib(mem)})" if mem is not None else "")


def _index(rows: list[dict]) -> dict:
    return {(r["op"], r["form"], r["model"], r["n"], r["mode"], r["impl"]): r for r in rows}


def _ours(meta: dict) -> str:
    return next((name for name in meta["impls"] if name.startswith("opd-")), "opd-triton")


def goals(payload: dict) -> list[tuple[str, str, str, str]]:
    """The speed goals of the core, fused-linear and served-teacher issues, judged from this
    run's rows: (goal, measured, target, verdict)."""
    index, ours = _index(payload["rows"]), _ours(payload["meta"])
    def row(op, form, n, impl=ours, mode="fwd+bwd"):
        r = index.get((op, form, QWEN.name, n, mode, impl))
        return r if r and r["status"] == "ok" else None

    def judge(label, value, target, fmt, ok):
        if value is None:
            return (label, "not measured", target, "–")
        return (label, fmt(value), target, "met" if ok(value) else "not met")

    out = []
    kl = row("reverse_kl", "logits", 16384)
    out.append(judge("reverse KL logits, N=16384, fwd+bwd: fraction of HBM floor",
                     kl and kl.get("fraction_of_floor"), ">= 80%", lambda v: f"{100 * v:.0f}%",
                     lambda v: v >= 0.8))
    for base, target in (("liger-jsd", 2.0), ("eager", 8.0)):
        out.append(judge(f"reverse KL logits, N=16384, fwd+bwd: speedup vs {base}",
                         kl and kl.get("speedup_vs", {}).get(base), f">= {target:g}x",
                         lambda v: f"{v:.2f}x", lambda v, t=target: v >= t))
    full = row("opd_full", "fused", 8192)
    out.append(judge("fused full, N=8192, fwd+bwd: fraction of matmul floor",
                     full and full.get("fraction_of_floor"), ">= 60%", lambda v: f"{100 * v:.0f}%",
                     lambda v: v >= 0.6))
    for base in ("liger-fused-jsd", "liger-chunked-jsd"):
        out.append(judge(f"fused full, N=8192, fwd+bwd: speedup vs {base}",
                         full and full.get("speedup_vs", {}).get(base), ">= 1.5x",
                         lambda v: f"{v:.2f}x", lambda v: v >= 1.5))
    out.append(judge("fused full, N=8192, fwd+bwd: peak extra memory",
                     full and full.get("peak_extra_bytes"), "<= 1 GiB",
                     lambda v: f"{v / 2**30:.2f} GiB", lambda v: v <= 2**30))
    topk = row("opd_topk", "fused", 8192)
    out.append(judge("fused topk vs full, N=8192, fwd+bwd: speedup",
                     full and topk and full["median_ms"] / topk["median_ms"], ">= 2x",
                     lambda v: f"{v:.2f}x", lambda v: v >= 2.0))
    # a served topk step costs about one student lm_head pass: the lse's forward
    lse = row("logsumexp", "fused", 8192, mode="fwd")
    for teacher_k in SERVED_K:
        served = row(served_op("topk", teacher_k), "fused", 8192)
        out.append(judge(f"fused served topk (K={teacher_k}), N=8192, fwd+bwd vs "
                         f"fused_linear_logsumexp fwd: time ratio",
                         lse and served and served["median_ms"] / lse["median_ms"], "<= 1.3x",
                         lambda v: f"{v:.2f}x", lambda v: v <= 1.3))
    return out


def markdown(payload: dict) -> str:
    meta, rows = payload["meta"], payload["rows"]
    ours = _ours(meta)
    c = meta["ceilings"]
    bw, mm = c.get("bandwidth_bytes_per_s"), c.get("matmul_flops_per_s")
    lines = [
        f"# opd-kernels benchmark: {meta['device']}, commit {meta['commit']}"
        + (" (with uncommitted changes)" if meta["dirty"] else ""),
        "",
        f"{meta['date']}; preset `{meta['preset']}`; inputs {meta['dtype']}; temperature "
        f"{meta['temperature']}; k={meta['k']}; torch {meta['torch']}, triton {meta['triton']}, "
        f"python {meta['python']}; {meta['wall_s']:.0f} s.",
        "",
        f"Ceilings measured in this run: copy bandwidth {_rate(bw, 'B/s')} "
        f"({c['copy_bytes'] / 1e9:.2f} GB moved), matmul {c['matmul']} {_rate(mm, 'FLOP/s')}.",
        "",
        "Peers: " + ", ".join(f"{name} {status}" for name, status in meta["peers"].items()) + ".",
        "",
    ]
    if meta["device_slug"] != "cpu":
        lines += ["## Goals (core, fused-linear and served-teacher issues)", "",
                  "| goal | measured | target | verdict |", "| --- | --- | --- | --- |"]
        lines += [f"| {g} | {m} | {t} | {v} |" for g, m, t, v in goals(payload)]
        lines.append("")
    impls = [i for i in meta["impls"] if any(r["impl"] == i for r in rows)]
    index = _index(rows)
    lines += [
        "## Summary", "",
        "Median time in ms (peak memory above the inputs, MiB, where measured). "
        f"`% floor` = the roofline floor time over {ours}'s median (logits form: bytes at the "
        "copy bandwidth; fused form: lm_head FLOPs at the matmul rate). `x eager` = eager "
        f"median / {ours} median, same run.", "",
    ]
    for form in ("logits", "fused"):
        keys = sorted({(r["op"], r["model"], r["n"], r["mode"]) for r in rows if r["form"] == form},
                      key=lambda k: (list(OPS).index(k[0]), k[1], k[2], k[3]))
        if not keys:
            continue
        lines += [f"### {form} form", "",
                  "| op | model | N | mode | " + " | ".join(impls) + " | % floor | x eager |",
                  "| --- | --- | ---: | --- | " + " | ".join("---:" for _ in impls) + " | ---: | ---: |"]
        for op, model, n, mode in keys:
            cells = [_cell(index.get((op, form, model, n, mode, i))) for i in impls]
            mine = index.get((op, form, model, n, mode, ours)) or {}
            frac = mine.get("fraction_of_floor")
            speedup = mine.get("speedup_vs", {}).get("eager")
            lines.append(f"| {op} | {model} | {n} | {mode} | " + " | ".join(cells)
                         + f" | {'–' if frac is None else f'{100 * frac:.0f}%'}"
                         + f" | {'–' if speedup is None else f'{speedup:.2f}'} |")
        lines.append("")
    lines += ["## Every measurement", "",
              "| case | mode | impl | status | median ms | p20–p80 ms | reps | first call ms "
              "| peak MiB | floor ms |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        spread = f"{_ms(r.get('p20_ms'))}–{_ms(r.get('p80_ms'))}" if r.get("p20_ms") else "–"
        status = r["status"].replace("|", "/")
        lines.append(f"| {r['case']} | {r['mode']} | {r['impl']} | {status} | "
                     f"{_ms(r.get('median_ms'))} | {spread} | {r.get('reps') or '–'} | "
                     f"{_ms(r.get('first_call_ms'))} | {_mib(r.get('peak_extra_bytes'))} | "
                     f"{_ms(r.get('floor_ms'))} |")
    return "\n".join(lines) + "\n"


def write_png(payload: dict, path: str) -> bool:
    """Time against N (forward+backward, forward for the statistics) for each op and form, one
    line per implementation, on the first model of the run. False when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in payload["rows"] if r["status"] == "ok"]
    if not rows:
        return False
    model = rows[0]["model"]
    panels = [(op, form) for form in ("logits", "fused") for op in OPS
              if any(r["op"] == op and r["form"] == form for r in rows)]
    cols = 4
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, squeeze=False,
                             figsize=(4 * cols, 3.2 * ((len(panels) + cols - 1) // cols)))
    for ax, (op, form) in zip(axes.flat, panels):
        mode = "fwd" if op == "topk_overlap" else "fwd+bwd"
        for impl in payload["meta"]["impls"]:
            pts = sorted((r["n"], r["median_ms"]) for r in rows if r["op"] == op
                         and r["form"] == form and r["model"] == model and r["mode"] == mode
                         and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), "o-", label=impl)
        ax.set(title=f"{op} ({form}, {mode})", xlabel="N", ylabel="ms", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    meta = payload["meta"]
    fig.suptitle(f"{meta['device']}, {model}, {meta['dtype']}, commit {meta['commit']}")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
