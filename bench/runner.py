"""Runs a list of cases against a list of implementations and returns the results payload.

Jobs run case by case (inputs shared by the implementations). The priority cases come first,
with every implementation; then the rest. Within each of the two blocks torch.compile goes last:
its compile time is the largest fixed cost (paid once: the compiled functions take any shape), so
under a time budget it is the first thing dropped. A job past the budget is recorded as skipped,
so a run always ends in time and says what it left out.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .impls import IMPLS, peer_status, peer_usable
from .registry import Case
from .roofline import floor_ms, measure_ceilings
from .timing import Budget, is_oom, measure, release_memory
from .workloads import floor, make_inputs


@dataclass
class Config:
    cases: list[Case]
    impls: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    preset: str
    temperature: float = 1.0
    k: int = 16
    budget: Budget = field(default_factory=Budget)
    time_budget_s: Optional[float] = None
    ceiling_copy_bytes: int = 2 << 30
    ceiling_matmul_size: int = 8192
    priority: frozenset = frozenset()  # cases measured with every implementation before the rest


def git_commit() -> tuple[str, bool]:
    """(short commit, tracked files modified) of the repository holding this package.

    A copy of the tree without .git (a GPU machine's) names its commit in OPD_BENCH_COMMIT;
    ("unknown", False) when neither says."""
    if os.environ.get("OPD_BENCH_COMMIT"):
        return os.environ["OPD_BENCH_COMMIT"], False
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain",
                                                              "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict:
    commit, dirty = git_commit()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device), "device_slug": device_slug(device),
        "commit": commit, "dirty": dirty, "python": sys.version.split()[0],
        "torch": torch.__version__, "triton": triton_version,
    }


def _speedups(rows: list[dict]) -> None:
    """Each of our rows gets baseline median / our median for every baseline of the same job."""
    by_job: dict = {}
    for row in rows:
        by_job.setdefault((row["case"], row["mode"]), []).append(row)
    for group in by_job.values():
        timed = {r["impl"]: r["median_ms"] for r in group if r["status"] == "ok"}
        for row in group:
            if row["kind"] == "ours" and row["impl"] in timed:
                row["speedup_vs"] = {name: ms / timed[row["impl"]] for name, ms in timed.items()
                                     if name != row["impl"]}


def run(config: Config, log=print, checkpoint=None) -> dict:
    """Measure every job; ``checkpoint(payload)``, if given, gets the results so far after each
    case and mode, so that a run killed from outside still leaves them behind."""
    started = time.perf_counter()
    device, itemsize = config.device, torch.empty((), dtype=config.dtype).element_size()
    peers = {impl.peer: peer_status(impl.peer) for impl in IMPLS.values() if impl.peer}
    impls = [IMPLS[name] for name in config.impls
             if IMPLS[name].peer is None or peer_usable(peers[IMPLS[name].peer])]
    log(f"peers: {peers}")
    ceilings = measure_ceilings(device, config.dtype, config.ceiling_copy_bytes,
                                config.ceiling_matmul_size, config.budget)
    log(f"ceilings: {ceilings}")

    meta = environment(device)
    meta.update(preset=config.preset, dtype=str(config.dtype).replace("torch.", ""),
                temperature=config.temperature, k=config.k, impls=[i.name for i in impls],
                peers=peers, ceilings=ceilings, time_budget_s=config.time_budget_s,
                budget=vars(config.budget))
    phases = [[i for i in impls if i.name != "compile"], [i for i in impls if i.name == "compile"]]
    rows: list[dict] = []

    def payload():
        _speedups(rows)
        return {"meta": {**meta, "wall_s": time.perf_counter() - started}, "rows": rows}

    blocks = [[c for c in config.cases if c in config.priority],
              [c for c in config.cases if c not in config.priority]]
    for block, phase in ((b, p) for b in blocks for p in phases if b and p):
        for case in block:
            for mode in case.modes:
                rows.extend(_run_case_mode(case, mode, phase, config, ceilings, itemsize, started, log))
                if checkpoint is not None:
                    checkpoint(payload())
    return payload()


def _row(case: Case, mode: str, impl) -> dict:
    m = case.model
    return {"case": case.label, "op": case.op, "form": case.form, "model": m.name, "n": case.n,
            "vocab": m.vocab, "student_hidden": m.student_hidden, "teacher_hidden": m.teacher_hidden,
            "mode": mode, "impl": impl.name, "kind": impl.kind}


def _run_case_mode(case, mode, impls, config, ceilings, itemsize, started, log) -> list[dict]:
    quantity, amount = floor(case, mode, itemsize, config.k)
    floor_time = floor_ms(quantity, amount, ceilings)
    rows, inputs = [], None
    try:
        for impl in impls:
            if not impl.applies(case, mode, config.temperature):
                continue
            row = _row(case, mode, impl)
            row.update(floor_quantity=quantity, floor_amount=amount, floor_ms=floor_time)
            if config.time_budget_s is not None and time.perf_counter() - started > config.time_budget_s:
                rows.append({**row, "status": "skipped: time budget"})
                continue
            if inputs is None:
                try:
                    inputs = make_inputs(case, config.dtype, config.device, mode == "fwd+bwd",
                                         k=config.k, temperature=config.temperature)
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    rows.append({**row, "status": "OOM (inputs)"})
                    continue
            try:
                fn = impl.build(case, mode, inputs, config.k, config.temperature)
            except Exception as exc:
                rows.append({**row, "status": f"error: {type(exc).__name__}: {exc}"[:300]})
                log(f"{case.label} {mode} {impl.name}: {rows[-1]['status']}")
                continue
            result = measure(training_step(fn, mode), clear_grads(inputs), config.device, config.budget)
            row.update(result.as_dict())
            if result.status == "ok" and floor_time:
                row["fraction_of_floor"] = floor_time / result.median_ms
            rows.append(row)
            log(_log_line(row))
    finally:
        del inputs
        release_memory(config.device)
    return rows


def training_step(fn, mode: str):
    """One call of ``fn``, then (fwd+bwd) the backward of its sum (a scalar loss as is)."""
    def run_once():
        out = fn()
        if mode == "fwd+bwd":
            (out if out.dim() == 0 else out.sum()).backward()
    return run_once


def clear_grads(inputs):
    """Forget the gradients the last step left, so that each step allocates its own."""
    def reset():
        for leaf in inputs.grad_leaves():
            leaf.grad = None
    return reset


def _log_line(row: dict) -> str:
    head = f"{row['case']:<48} {row['mode']:<8} {row['impl']:<18}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    mem = row.get("peak_extra_bytes")
    mem_text = f" {mem / 2**20:9.1f} MiB" if mem is not None else ""
    frac = row.get("fraction_of_floor")
    frac_text = f" {100 * frac:5.1f}% of floor" if frac else ""
    return f"{head} {row['median_ms']:9.3f} ms{mem_text}{frac_text}"
