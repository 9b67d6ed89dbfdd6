"""One place that picks the backend: Triton for CUDA tensors, the chunked PyTorch path otherwise."""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from . import torch_backend

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(backend: str, family: str, *tensors: torch.Tensor) -> ModuleType:
    """The module implementing ``family`` ("logits" or "fused_linear") for these tensors.

    "auto": Triton when the tensors are on a CUDA device in a dtype the kernels take, else the
    PyTorch path (which also serves float64, for oracle-precision use). "triton": the kernels,
    on CPU tensors only under TRITON_INTERPRET=1. "torch": the chunked PyTorch path.
    """
    if backend == "torch":
        return torch_backend
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        if not (on_cuda and all(t.dtype in _TRITON_DTYPES for t in tensors) and _triton_available()):
            return torch_backend
    elif backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the "
                             "environment before triton is imported")
        for t in tensors:
            if t.dtype not in _TRITON_DTYPES:
                raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 inputs, got "
                                f"{t.dtype} (use backend='torch' for float64)")
    return importlib.import_module(f"opd_kernels.ops.triton_{family}")
