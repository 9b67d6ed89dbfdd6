"""The backends behind one registry: each declares its capabilities; ``resolve`` picks one.

"auto": the Triton backend of the call's form when every tensor is on a CUDA device in a dtype
its kernels take, the native CPU backend when every tensor is on the CPU in a dtype it takes
(fp32, bf16), else the PyTorch path (which also serves float64, for oracle-precision use).
"triton": the kernels, on CPU tensors only under TRITON_INTERPRET=1. "cpp": the native CPU
kernels (csrc/, built on first use by native.py; unavailable, after one warning, where they
cannot be built). "torch": the chunked PyTorch path. An objective whose needs a backend's
passes do not produce raises, naming both.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import native
from .base import Backend, Capabilities, LossCall, LossResult, Model

NAMES = ("auto", "triton", "cpp", "torch")
# module -> (name, forms) of the backend it defines; a module is imported when first asked for
_MODULES = {"torch": ("torch", {"logits", "fused_linear"}), "triton_logits": ("triton", {"logits"}),
            "triton_fused": ("triton", {"fused_linear"}), "cpp_logits": ("cpp", {"logits"}),
            "cpp_fused": ("cpp", {"fused_linear"})}
_loaded: dict = {}


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _find(name: str, form: str):
    """The backend called ``name`` for ``form`` (imported on first use), or None."""
    for module, (backend_name, forms) in _MODULES.items():
        if backend_name == name and form in forms:
            if name == "triton" and not _triton_available():
                return None
            if name == "cpp" and not native.available():
                return None
            if module not in _loaded:
                _loaded[module] = importlib.import_module(f"{__name__}.{module}").BACKEND
            return _loaded[module]
    return None


def registered() -> list:
    """Every backend that can be imported here (the Triton ones need the triton package)."""
    found = (_find(name, form) for name, forms in _MODULES.values() for form in forms)
    return list(dict.fromkeys(b for b in found if b is not None))


def _refuse(backend: Backend, tensors, k) -> Exception | None:
    """The error saying why ``backend`` cannot take these tensors (or this k), or None."""
    caps = backend.capabilities
    for t in tensors:
        if t.device.type not in caps.devices and not (
                caps.needs_interpreter_off_gpu and os.environ.get("TRITON_INTERPRET") == "1"):
            if caps.needs_interpreter_off_gpu:
                return ValueError(f"backend={backend.name!r} on {t.device.type} tensors needs "
                                  f"TRITON_INTERPRET=1 in the environment before triton is imported")
            return ValueError(f"backend={backend.name!r} does not run on {t.device.type} tensors")
        if t.is_floating_point() and t.dtype not in caps.dtypes:
            takes = ", ".join(str(d) for d in sorted(caps.dtypes, key=str))
            return TypeError(f"backend={backend.name!r} takes {takes} inputs, got {t.dtype} "
                             f"(use backend='torch' for float64)")
    if caps.max_k is not None and k is not None and k > caps.max_k:
        return ValueError(f"k must be <= {caps.max_k} on backend={backend.name!r}, got k={k} "
                          f"(backend='torch' takes any k <= V)")
    return None


def resolve(name: str, form: str, tensors, *, objective=None, needs=frozenset(), k=None,
            served: bool = False) -> Backend:
    """The backend for a call of ``form`` over ``tensors`` (``served``: with a served teacher,
    whose quantities the public layer has checked); raises ValueError/TypeError saying why a
    backend the user forced cannot run it."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    tensors = [t for t in tensors if t is not None]
    if name == "auto":
        kernels = ("triton" if all(t.is_cuda for t in tensors)
                   else "cpp" if all(t.device.type == "cpu" for t in tensors) else None)
        fast = _find(kernels, form) if kernels else None
        if (fast is not None
                and _refuse(fast, tensors, k) is None
                and (fast.capabilities.served_teacher if served
                     else needs <= fast.capabilities.quantities)):
            return fast
        name = "torch"
    backend = _find(name, form)
    if backend is None:
        raise ValueError(f"backend={name!r} needs the triton package, which is not installed"
                         if name == "triton" else
                         f"backend={name!r} needs the native CPU kernels, which could not be "
                         f"built or loaded here (see the warning); use backend='torch'")
    refusal = _refuse(backend, tensors, k)
    if refusal is not None:
        raise refusal
    if served:
        if not backend.capabilities.served_teacher:
            raise ValueError(f"backend={name!r} ({form}) does not take a served teacher")
        return backend
    missing = needs - backend.capabilities.quantities
    if missing:
        what = "; ".join(m.value for m in sorted(missing, key=lambda m: m.name))
        label = f"objective {objective.name!r}" if objective is not None else "this call"
        raise ValueError(f"{label} needs {what}, which backend={name!r} ({form}) does not compute")
    return backend


__all__ = ["Backend", "Capabilities", "LossCall", "LossResult", "Model", "NAMES", "registered",
           "resolve"]
