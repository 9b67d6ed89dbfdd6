"""The two ceilings of a roofline, measured in the same run as the kernels they judge.

bandwidth: a large device-to-device copy, counting bytes read plus bytes written.
matmul rate: a large square matrix product in the benchmark dtype (random data: zeros run
faster on some GPUs). Each is the median over repeats.
"""
from __future__ import annotations

import torch

from .timing import Budget, measure


def measure_ceilings(device: torch.device, dtype: torch.dtype, copy_bytes: int, matmul_size: int,
                     budget: Budget) -> dict:
    src = torch.randn(copy_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), lambda: None, device, budget)
    moved = 2 * src.numel() * src.element_size()
    del src, dst

    a = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype)
    b = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype)
    mm = measure(lambda: a @ b, lambda: None, device, budget)
    flops = 2 * matmul_size ** 3
    del a, b

    return {
        "bandwidth_bytes_per_s": moved / (copy.median_ms * 1e-3) if copy.status == "ok" else None,
        "matmul_flops_per_s": flops / (mm.median_ms * 1e-3) if mm.status == "ok" else None,
        "copy_bytes": moved, "copy_ms": copy.median_ms,
        "matmul": f"{matmul_size}^3 {str(dtype).replace('torch.', '')}", "matmul_ms": mm.median_ms,
    }


def floor_ms(quantity: str, amount: int, ceilings: dict) -> float | None:
    """The floor time of ``amount`` bytes (or FLOPs) at the measured ceiling."""
    rate = ceilings.get("bandwidth_bytes_per_s" if quantity == "bytes" else "matmul_flops_per_s")
    return amount / rate * 1e3 if rate else None
