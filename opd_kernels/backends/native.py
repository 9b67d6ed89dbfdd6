"""The native CPU kernels (csrc/): built on first use, loaded once, their custom ops registered.

``torch.utils.cpp_extension.load`` compiles csrc/*.cpp with the compiler of the machine that
runs them (-O3 -march=native, OpenMP) into torch's extension cache, keyed by a hash of the
sources and flags: the first call of a fresh checkout builds (tens of seconds), later processes
load the cached library (well under a second). A build at install time would need a torch in
pip's isolated build environment, which resolves to another (often the multi-GB CUDA) build
whose C++ ABI need not match the installed one.

If the build fails (no compiler, say) or OPD_KERNELS_NO_NATIVE=1 is set, ``ops()`` returns None
after one UserWarning naming the reason: the "cpp" backends are then unavailable, and
backend="auto" runs the PyTorch path. The ops (torch.ops.opd_kernels.*) get fake
implementations here, so torch.compile traces them.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

SOURCES = Path(__file__).resolve().parents[2] / "csrc"
DISABLE_ENV = "OPD_KERNELS_NO_NATIVE"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]


class NativeUnavailable(RuntimeError):
    """Why the native kernels cannot run here."""


def _build() -> None:
    if os.environ.get(DISABLE_ENV) == "1":
        raise NativeUnavailable(f"{DISABLE_ENV}=1 is set")
    sources = sorted(str(p) for p in SOURCES.glob("*.cpp"))
    if not sources:
        raise NativeUnavailable(f"no C++ sources in {SOURCES}")
    from torch.utils import cpp_extension

    try:
        cpp_extension.load("opd_kernels_native", sources, extra_cflags=_FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError, FileNotFoundError) as error:
        reason = str(error).strip().splitlines()
        raise NativeUnavailable(reason[-1] if reason else type(error).__name__) from error


@functools.cache
def ops():
    """torch.ops.opd_kernels once the library is loaded, or None (warned once) if it cannot be."""
    try:
        _build()
    except NativeUnavailable as reason:
        warnings.warn(f"opd_kernels: the native CPU kernels are unavailable ({reason}); "
                      f"the PyTorch path runs instead", UserWarning, stacklevel=3)
        return None
    _register_fakes()
    return torch.ops.opd_kernels


def available() -> bool:
    return ops() is not None


def _register_fakes() -> None:
    from . import logits_form

    @torch.library.register_fake("opd_kernels::row_pass")
    def _(student, teacher, tokens, mask, k, temperature, cap_s, cap_t):
        n = student.shape[0]
        return (student.new_empty(len(logits_form.FIELDS), n, dtype=torch.float32),
                student.new_empty(n, k, dtype=torch.int64))

    @torch.library.register_fake("opd_kernels::mixture")
    def _(student, teacher, fields, mask, temperature, cap_s, cap_t, beta):
        return student.new_empty(2, student.shape[0], dtype=torch.float32)

    @torch.library.register_fake("opd_kernels::row_pass_grad")
    def _(student, teacher, tokens, mask, k, temperature, cap_s, cap_t, shift_coefs, w_reverse,
          w_forward, w_mixture, beta, scale, out):
        n = student.shape[0]
        return (student.new_empty(len(logits_form.FIELDS), n, dtype=torch.float32),
                student.new_empty(n, k, dtype=torch.int64),
                student.new_empty(2, n, dtype=torch.float32))

    @torch.library.register_fake("opd_kernels::dense_grad")
    def _(student, teacher, fields, shift, scale, mask, temperature, cap_s, cap_t, w_reverse,
          w_forward, w_mixture, beta, out):
        return None
