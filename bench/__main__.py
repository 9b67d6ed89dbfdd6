"""python -m bench [--quick | --cpu | --hopper-report] [options]

GPU (default): the full suite in bf16 against PyTorch eager, torch.compile and the peers that
import, under a time budget (about 6 minutes; --quick about 2). --cpu: the CPU path (the
"cpp" and "torch" backends) against eager PyTorch on small fp32 shapes, then the native
backend's own figures (bench/cpu_native.py). --hopper-report: the static sm_90
compile report of every Triton kernel (needs no GPU). Results go to bench/results/.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import registry
from .impls import CPU_IMPLS, GPU_IMPLS, IMPLS
from .registry import FORMS, MODELS, OPS
from .report import write_all
from .runner import Config, run
from .timing import Budget

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Seconds after which no new measurement starts; the margin to the promise (6 and 2 minutes)
# covers start-up, the last measurement (a torch.compile can take half a minute) and the chart.
TIME_BUDGET_S = {"full": 290.0, "quick": 75.0, "cpu": None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="one shape per op (GPU, ~2 min)")
    which.add_argument("--cpu", action="store_true", help="the CPU path on small shapes")
    which.add_argument("--hopper-report", action="store_true",
                       help="compile every kernel for sm_90 and tabulate registers, spills, HGMMA")
    p.add_argument("--out", default=RESULTS_DIR, help="output folder (default bench/results)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), help="override the preset's models")
    p.add_argument("--n", nargs="+", type=int, help="override the preset's token counts")
    p.add_argument("--ops", nargs="+", choices=list(OPS), help="only these ops")
    p.add_argument("--forms", nargs="+", choices=FORMS, help="only these forms")
    p.add_argument("--impls", nargs="+", choices=sorted(IMPLS), help="implementations to time")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (GPU bf16, CPU fp32)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--target-ms", type=float, help="time spent repeating each measurement")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--budget-s", type=float,
                   help="stop starting measurements after this many seconds (0: no limit)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a busy machine)")
    p.add_argument("--no-png", action="store_true")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    preset = "cpu" if args.cpu else "quick" if args.quick else "full"
    if preset != "cpu" and not torch.cuda.is_available():
        sys.exit("python -m bench: no CUDA device; use --cpu for the CPU path "
                 "or --hopper-report for the static compile report")
    cases = registry.preset(preset)
    # ops outside the presets (an objective at a parameter's end, e.g. opd_jsd_beta0) are timed
    # on the preset's grid when asked for
    extra_ops = [op for op in args.ops or () if op not in {c.op for c in cases}]
    if args.models or args.n or extra_ops:
        models = [MODELS[m] for m in args.models] if args.models else sorted(
            {c.model for c in cases}, key=lambda m: list(MODELS.values()).index(m))
        cases = registry.grid(models, args.n or sorted({c.n for c in cases}),
                              ops=tuple(args.ops or dict.fromkeys(c.op for c in cases)))
    cases = [c for c in cases if (not args.ops or c.op in args.ops)
             and (not args.forms or c.form in args.forms)]
    cpu = preset == "cpu"
    budget_s = TIME_BUDGET_S[preset] if args.budget_s is None else (args.budget_s or None)
    return Config(
        cases=cases,
        impls=tuple(args.impls or (CPU_IMPLS if cpu else GPU_IMPLS)),
        device=torch.device("cpu" if cpu else "cuda"),
        dtype=DTYPES[args.dtype or ("fp32" if cpu else "bf16")],
        preset=preset, temperature=args.temperature, k=args.k,
        budget=Budget(target_ms=(100.0 if cpu else 150.0) if args.target_ms is None else args.target_ms,
                      min_reps=args.min_reps),
        time_budget_s=budget_s,
        ceiling_copy_bytes=(64 << 20) if cpu else (2 << 30),
        ceiling_matmul_size=512 if cpu else 8192,
        priority=frozenset(registry.preset("quick")) if preset == "full" else frozenset(),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.hopper_report:
        from .hopper_report import main as hopper_main
        return hopper_main(["--out", args.out])
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = run(config_from_args(args),
                  checkpoint=lambda partial: write_all(partial, args.out, png=False))
    for path in write_all(payload, args.out, png=not args.no_png):
        print(f"wrote {path}")
    if args.cpu and not (args.ops or args.forms or args.models or args.n):
        from . import cpu_native
        for path in cpu_native.write(cpu_native.measure(), payload["meta"], args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
