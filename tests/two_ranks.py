"""Many cases on one pair of gloo processes (CPU, 127.0.0.1): a module's ``CASES`` (name ->
fn(rank)) run in order on both ranks, each case's failure (a traceback) reported per rank, and
a rank that hangs or dies stopped by the timeouts (the process group's and the join's)."""
from __future__ import annotations

import datetime
import importlib
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, module: str, port: int, collective_timeout_s: float, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    try:
        for name, case in importlib.import_module(module).CASES.items():
            try:
                case(rank)
                results.put((rank, name, None))
            except Exception:  # reported to the parent, which fails that case's test
                results.put((rank, name, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_cases(module: str, *, timeout_s: float = 300.0, collective_timeout_s: float = 60.0) -> dict:
    """{case name: [rank 0's traceback or None, rank 1's]}; a case a rank never reported holds
    a message saying so (the rank hung, or died before it)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_worker, args=(rank, module, port, collective_timeout_s,
                                                       results), daemon=True)
                 for rank in range(WORLD)]
    try:
        for p in processes:
            p.start()
        reported: dict = {}
        cases = list(importlib.import_module(module).CASES)
        expected = len(cases) * WORLD
        deadline = time.monotonic() + timeout_s
        while len(reported) < expected:
            try:
                rank, name, error = results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            reported[(rank, name)] = error
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    missing = "no result: the rank hung or died before this case (see the earlier cases)"
    return {name: [reported.get((rank, name), missing) for rank in range(WORLD)] for name in cases}


def close(got, want, what: str, relative: float = 1e-6) -> None:
    """``got`` equals ``want`` to ``relative`` of the compared values' magnitude (an entry that
    is a sum cancelling to near 0, as a gradient, carries the rounding of its terms)."""
    import torch

    finite = want[want.isfinite()]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(got, want, equal_nan=True, rtol=relative, atol=relative * scale,
                               msg=lambda m: f"{what}: {m}")


def check_case(results: dict, name: str) -> None:
    failures = [f"rank {rank}:\n{error}" for rank, error in enumerate(results[name]) if error]
    assert not failures, "\n".join(failures)
