"""Launchers and autograd Functions of the Triton backend."""
from . import _interpreter_compat  # noqa: F401  (before any kernel launch under TRITON_INTERPRET=1)
