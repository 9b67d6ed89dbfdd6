"""Ahead-of-time compilation of every Triton kernel for GPUs that are not present.

Each module in ``opd_kernels.kernels`` lists ``AOT_SPECS``: one :class:`AOTSpec` per kernel
specialization worth checking (dtype, block sizes, optional-argument flags). ``compile_spec``
builds PTX and a cubin for a given SM on a CPU-only machine, so a kernel that only fails to
compile for a real GPU is caught by the test suite; ``sass_report`` reads registers, spills,
shared memory and whether the SASS uses Hopper's matrix instructions (HGMMA).
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AOTSpec:
    """One kernel specialization: ``signature`` maps every argument name to a Triton type
    ("*fp32", "*bf16", "i32", "fp32", "constexpr", ...); ``constexprs`` gives the values."""

    fn: Any
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""

    @property
    def name(self) -> str:
        base = getattr(self.fn, "__name__", None) or self.fn.fn.__name__
        return f"{base}[{self.label}]" if self.label else base


def all_specs() -> list[AOTSpec]:
    """Every AOT_SPECS entry of every module in opd_kernels.kernels."""
    from opd_kernels import kernels

    specs: list[AOTSpec] = []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        specs.extend(getattr(module, "AOT_SPECS", []))
    return specs


def compile_spec(spec: AOTSpec, arch: int):
    """Compile ``spec`` for sm_<arch> (e.g. 90, 80) without a GPU; returns Triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # A launch tells the compiler which pointers (torch allocations are 16-byte aligned) and
    # integers are divisible by 16: for real models, the row strides and the hidden sizes. Without
    # the same hints here the vectorization, and so the registers and spills read off the result,
    # would not be the ones a GPU run gets.
    hints = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(spec.signature.items())
             if kind.startswith("*")
             or (kind[0] == "i" and (name.startswith("stride") or name.endswith("hidden_size")))}
    source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=hints)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _nvdisasm_tool(name: str) -> str | None:
    from triton.backends.nvidia import compiler as nvidia_compiler

    bin_dir = os.path.join(os.path.dirname(nvidia_compiler.__file__), "bin")
    path = os.path.join(bin_dir, name)
    return path if os.path.exists(path) else shutil.which(name)


def sass_report(compiled) -> dict:
    """Registers, spill bytes, shared memory and the HGMMA count of a compiled kernel's SASS."""
    md = compiled.metadata
    report = {"shared_bytes": md.shared, "num_warps": md.num_warps, "registers": None,
              "spill_stores": None, "spill_loads": None, "hgmma": None}
    cubin = compiled.asm.get("cubin")
    cuobjdump = _nvdisasm_tool("cuobjdump")
    if cubin is None or cuobjdump is None:
        return report
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True)
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    usage = res.stdout
    if m := re.search(r"REG:(\d+)", usage):
        report["registers"] = int(m.group(1))
    report["hgmma"] = len(re.findall(r"\bHGMMA\b", sass))
    ptxas_log = _ptxas_spills(compiled)
    report.update(ptxas_log)
    return report


def _ptxas_spills(compiled) -> dict:
    """Spill bytes as ptxas -v reports them for the kernel's PTX."""
    ptxas = _nvdisasm_tool("ptxas")
    ptx = compiled.asm.get("ptx")
    if ptxas is None or ptx is None:
        return {}
    arch = compiled.metadata.target.arch
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", src,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = out.stderr + out.stdout
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {"spill_stores": int(stores.group(1)) if stores else None,
            "spill_loads": int(loads.group(1)) if loads else None}
