"""One measurement: first-call time, peak extra memory, then median and p20/p80 over repeats.

GPU: CUDA events around each repeat (device time, launch gaps included) and
``torch.cuda.max_memory_allocated`` above what was allocated before the call (the inputs).
CPU: ``time.perf_counter``; memory is not measured (PyTorch keeps no CPU allocator statistics).
An out-of-memory error in any phase is a result ("OOM"), never a crash.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch


@dataclass
class Measurement:
    status: str  # "ok", "OOM", or "error: ..."
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    reps: int = 0
    first_call_ms: Optional[float] = None  # includes JIT / torch.compile time
    peak_extra_bytes: Optional[int] = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Budget:
    """How long to time each measurement: about ``target_ms`` of repeats, within the bounds."""

    target_ms: float = 200.0
    min_reps: int = 5
    max_reps: int = 100


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release_memory(device: torch.device) -> None:
    """Return cached GPU memory so that the next implementation starts from the same state
    (collecting first: a failed call's traceback can hold its tensors in a cycle)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(run: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _repeat_ms(run, reset, device: torch.device, reps: int) -> list[float]:
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            reset()
            start.record()
            run()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    for _ in range(reps):
        reset()
        times.append(_timed_ms(run, device))
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(p20, median, p80) with linear interpolation."""
    q = torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return tuple(float(v) for v in q)


def measure(run: Callable[[], object], reset: Callable[[], None], device: torch.device,
            budget: Budget) -> Measurement:
    """Time ``run`` (one forward, or forward + backward); ``reset`` (untimed) runs before each
    call and clears what the last one left (gradients)."""
    try:
        reset()
        first = _timed_ms(run, device)
        reset()
        _sync(device)
        peak = None
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        second = _timed_ms(run, device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
        reps = min(budget.max_reps, max(budget.min_reps, math.ceil(budget.target_ms / max(second, 1e-3))))
        p20, median, p80 = quantiles(_repeat_ms(run, reset, device, reps))
        return Measurement("ok", median, p20, p80, reps, first, peak)
    except Exception as exc:  # one failing implementation must not stop the suite
        status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:300]
        return Measurement(status)
    finally:
        reset()
        release_memory(device)
