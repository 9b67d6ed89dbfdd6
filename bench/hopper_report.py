"""Static Hopper report: every kernel of ``opd_kernels.aot.all_specs()`` compiled ahead of time
for sm_90 on this machine (no GPU needed), with registers, spills, shared memory and the number
of HGMMA (Hopper matrix) instructions in its SASS, as a markdown table.

    python -m bench.hopper_report          # or: python -m bench --hopper-report
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def collect(arch: int = 90) -> list[dict]:
    """One row a specialization; a compile failure is a row with its error, not an exception."""
    from opd_kernels.aot import all_specs, compile_spec, sass_report

    rows = []
    for spec in all_specs():
        row = {"kernel": spec.name, "module": getattr(spec.fn, "__module__", ""),
               "num_warps": spec.num_warps, "num_stages": spec.num_stages}
        start = time.perf_counter()
        try:
            row.update(sass_report(compile_spec(spec, arch)), status="ok")
        except Exception as exc:  # report every kernel, including the ones that do not compile
            row["status"] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        row["compile_s"] = time.perf_counter() - start
        rows.append(row)
    return rows


def _v(value) -> str:
    return "–" if value is None else str(value)


def markdown(rows: list[dict], arch: int, commit: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [
        f"# Static Hopper report (sm_{arch})", "",
        f"Every Triton kernel specialization listed in `AOT_SPECS`, compiled ahead of time with "
        f"`opd_kernels.aot.compile_spec` (no GPU), commit {commit}, {date}. Registers and HGMMA "
        "from `cuobjdump` on the cubin, spills from `ptxas -v`, shared memory from Triton's "
        "metadata. HGMMA > 0 means the SASS uses Hopper's warpgroup matrix instructions; a "
        "matmul kernel with 0 runs on the slower HMMA/FFMA path.", "",
    ]
    if not rows:
        return "\n".join(lines + ["No kernel specializations are listed yet (`all_specs()` is empty).", ""])
    ok = [r for r in rows if r["status"] == "ok"]
    spilling = [r for r in ok if (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) > 0]
    lines += [
        f"{len(rows)} specializations: {len(ok)} compiled, {len(rows) - len(ok)} failed; "
        f"{sum(1 for r in ok if r.get('hgmma'))} use HGMMA; {len(spilling)} spill.", "",
        "| kernel | warps | stages | registers | spill stores B | spill loads B | shared B "
        "| HGMMA | compile s | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        status = r["status"].replace("|", "/")
        lines.append(f"| {r['kernel']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{_v(r.get('registers'))} | {_v(r.get('spill_stores'))} | "
                     f"{_v(r.get('spill_loads'))} | {_v(r.get('shared_bytes'))} | "
                     f"{_v(r.get('hgmma'))} | {r['compile_s']:.1f} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hopper_report", description=__doc__)
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    from .runner import git_commit

    rows = collect(args.arch)
    commit, dirty = git_commit()
    os.makedirs(args.out, exist_ok=True)
    name = "hopper_report.md" if args.arch == 90 else f"sm{args.arch}_report.md"
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        f.write(markdown(rows, args.arch, commit + (" (with uncommitted changes)" if dirty else "")))
    print(f"wrote {path}: {len(rows)} kernels, "
          f"{sum(r['status'] != 'ok' for r in rows)} failed to compile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
