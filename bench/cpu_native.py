"""The native CPU backend's figures (``python -m bench --cpu`` runs them after the suite):

- the fused-linear ``full`` forward+backward at N = 2048, V = 65536, H = 64 (fp32 and bf16)
  against eager PyTorch and against its floor, the four lm_head block products alone (both
  models' logits, dh = g W, dW += g^T h) over the same row chunks, all in one run;
- the gradient in the forward of ``full`` and ``jsd`` (beta 0.5) by row_pass_grad against the
  separate reads it replaces (fp32);
- 1 against 2 threads for the headline ops (logits reverse KL fwd+bwd, topk_overlap,
  opd_loss topk fwd+bwd on the CPU preset's shapes; the fused ``full``);
- the peak resident-size growth of that fused forward+backward under glibc's default allocator
  (a fresh process, no MALLOC_* variable), for the native and the PyTorch backends.
Each figure is the minimum over interleaved repeats: the ratios come from one run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import torch

import opd_kernels as ok
from opd_kernels import reference

N, V, H = 2048, 65536, 64
LOGITS_N, LOGITS_V = 512, 32000  # the CPU preset's largest logits shape (registry.CPU_SMALL)
REPEATS = 3


def _fused_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: (torch.randn(*shape, generator=g) * 0.3).to(dtype)
    return make(N, H), make(V, H), make(N, H), make(V, H)


def _fused_full(backend, hs, ws, ht, wt, objective="full", **params):
    h, w = hs.detach().requires_grad_(), ws.detach().requires_grad_()  # fresh leaves, no copies
    if backend == "eager":
        loss = reference.opd_loss((h @ w.T).float(), (ht @ wt.T).float(), objective, **params)
    else:
        loss = ok.fused_linear_opd_loss(h, w, ht, wt, objective=objective, backend=backend, **params)
    loss.backward()


def _separate_reads(fn):
    """fn with the gradient in the forward of the native backend on its separate reads (the
    row pass, the mixture sums, the gradient) instead of row_pass_grad."""
    from opd_kernels.backends import cpp_fused

    def run():
        kernels = cpp_fused.KERNELS
        cpp_fused.KERNELS = kernels._replace(row_pass_grad=None)
        try:
            fn()
        finally:
            cpp_fused.KERNELS = kernels
    return run


def _four_products(hs, ws, ht, wt):
    """The lm_head products of the gradient-in-forward path alone, over its row chunks (fp32)."""
    from opd_kernels.backends import cpp_fused, triton_fused_grad  # where the extension is built

    hs, ws, ht, wt = (t.float() for t in (hs, ws, ht, wt))
    rows = triton_fused_grad.scratch_rows(N, V, cpp_fused.SCRATCH_BYTES, torch.float32)
    z_s, z_t = torch.empty(rows, V), torch.empty(rows, V)
    grad_hidden, grad_weight = torch.empty(N, H), torch.zeros(V, H)
    for c0 in range(0, N, rows):
        part = slice(c0, min(N, c0 + rows))
        m = part.stop - c0
        torch.mm(hs[part], ws.t(), out=z_s[:m])
        torch.mm(ht[part], wt.t(), out=z_t[:m])
        torch.mm(z_t[:m], ws, out=grad_hidden[part])
        grad_weight.addmm_(z_t[:m].t(), hs[part])


def _logits_ops(dtype):
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(LOGITS_N, LOGITS_V, generator=g) * 3).to(dtype)
    t = (torch.randn(LOGITS_N, LOGITS_V, generator=g) * 3).to(dtype)

    def with_grad(fn):
        def run(backend):
            x = s.clone().requires_grad_()
            fn(x, backend).backward()
        return run

    eager = {"reverse_kl": lambda x, b: reference.reverse_kl(x.float(), t.float()).mean(),
             "opd_topk": lambda x, b: reference.opd_loss(x.float(), t.float(), "topk", k=16)}
    ours = {"reverse_kl": lambda x, b: ok.reverse_kl(x, t, backend=b),
            "opd_topk": lambda x, b: ok.opd_loss(x, t, objective="topk", k=16, backend=b)}
    pick = lambda name: lambda x, b: (eager if b == "eager" else ours)[name](x, b)
    return {"reverse_kl fwd+bwd": with_grad(pick("reverse_kl")),
            "topk_overlap fwd": lambda b: (reference.topk_overlap(s.float(), t.float(), 16)
                                           if b == "eager" else ok.topk_overlap(s, t, k=16, backend=b)),
            "opd_loss topk fwd+bwd": with_grad(pick("opd_topk"))}


def _best_ms(runs: dict) -> dict:
    """Minimum wall time of each callable over REPEATS interleaved rounds (after a warm-up)."""
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(REPEATS):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import opd_kernels as ok
    backend = sys.argv[1]
    N, V, H = {N}, {V}, {H}
    torch.manual_seed(0)
    hs, ws = (torch.randn(N, H) * 0.3).requires_grad_(), (torch.randn(V, H) * 0.3).requires_grad_()
    ht, wt = torch.randn(N, H) * 0.3, torch.randn(V, H) * 0.3
    ok.fused_linear_opd_loss(hs[:8], ws[:64], ht[:8], wt[:64], objective="full", backend=backend).backward()
    ws.grad = hs.grad = None
    # the peak from here on (Linux: "5" resets VmHWM), over the resident size here, in KiB
    status = lambda key: int(next(line.split()[1] for line in open("/proc/self/status")
                                  if line.startswith(key + ":")))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    ok.fused_linear_opd_loss(hs, ws, ht, wt, objective="full", backend=backend).backward()
    if not (torch.isfinite(ws.grad).all() and torch.isfinite(hs.grad).all()):
        sys.exit("the gradients are not finite")
    print(json.dumps((status("VmHWM") - base) / 1024))
""").format(N=N, V=V, H=H)


def rss_growth_mib(backend: str) -> float:
    """The peak resident-size growth (MiB) of the fused ``full`` forward+backward at N, V, H in
    a fresh process, under the allocator a user's process has (glibc's defaults: no MALLOC_*
    variable); the tests hold the backends to it too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, backend], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the {backend} run failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(log=print) -> dict:
    threads = torch.get_num_threads()
    result = {"shape": {"N": N, "V": V, "H": H, "logits": [LOGITS_N, LOGITS_V]},
              "threads": threads, "fused": {}, "logits": {}, "scaling": {}}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = _fused_inputs(dtype)
        times = _best_ms({"cpp": lambda: _fused_full("cpp", *x),
                          "eager": lambda: _fused_full("eager", *x),
                          "four products": lambda: _four_products(*x)})
        result["fused"][label] = times
        log(f"fused full fwd+bwd {label}: {times}")
        ops = _logits_ops(dtype)
        result["logits"][label] = {name: _best_ms({"cpp": lambda: fn("cpp"),
                                                   "eager": lambda: fn("eager")})
                                   for name, fn in ops.items()}
        log(f"logits {label}: {result['logits'][label]}")
    ops, x = _logits_ops(torch.float32), _fused_inputs(torch.float32)
    runs = {}
    for name, params in (("full", {}), ("jsd", {"beta": 0.5})):
        one_read = lambda p=params, o=name: _fused_full("cpp", *x, objective=o, **p)
        runs[f"{name} one read"], runs[f"{name} separate reads"] = one_read, _separate_reads(one_read)
    result["one_read"] = _best_ms(runs)
    log(f"one read: {result['one_read']}")
    ops["fused full fwd+bwd"] = lambda b: _fused_full(b, *x)
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        result["scaling"][count] = _best_ms({name: (lambda fn=fn: fn("cpp")) for name, fn in ops.items()})
    torch.set_num_threads(threads)
    log(f"scaling: {result['scaling']}")
    result["rss_growth_mib"] = {backend: rss_growth_mib(backend) for backend in ("cpp", "torch")}
    log(f"rss: {result['rss_growth_mib']}")
    return result


def markdown(result: dict, meta: dict) -> str:
    ratio = lambda t, a, b: t[a] / t[b]
    lines = [f"# opd-kernels native CPU backend: {meta['device']}, commit {meta['commit']}"
             + (" (with uncommitted changes)" if meta["dirty"] else ""), "",
             f"{meta['date']}; torch {meta['torch']}; {result['threads']} threads. Minimum of "
             f"{REPEATS} interleaved repeats, every ratio from this one run; a shared machine's "
             "noise stays in the absolute times.", "",
             f"## Fused-linear `full` forward+backward, N={N}, V={V}, H={H}", "",
             "| dtype | cpp ms | eager ms | four lm_head products ms | x eager | cpp / products |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, t in result["fused"].items():
        lines.append(f"| {label} | {t['cpp']:.0f} | {t['eager']:.0f} | {t['four products']:.0f} | "
                     f"{ratio(t, 'eager', 'cpp'):.2f} | {ratio(t, 'cpp', 'four products'):.2f} |")
    one_read = result["one_read"]
    lines += ["", "## The gradient in the forward: row_pass_grad against the separate reads (fp32)",
              "", "| objective | one read ms | separate reads ms | separate / one read |",
              "| --- | ---: | ---: | ---: |"]
    for name in ("full", "jsd"):
        t = {k.split(" ", 1)[1]: v for k, v in one_read.items() if k.startswith(name + " ")}
        label = name if name == "full" else f"{name} (beta 0.5)"
        lines.append(f"| {label} | {t['one read']:.0f} | {t['separate reads']:.0f} | "
                     f"{ratio(t, 'separate reads', 'one read'):.2f} |")
    n, v = result["shape"]["logits"]
    lines += ["", f"## Logits form, N={n}, V={v}", "", "| op | dtype | cpp ms | eager ms | x eager |",
              "| --- | --- | ---: | ---: | ---: |"]
    for label, ops in result["logits"].items():
        for name, t in ops.items():
            lines.append(f"| {name} | {label} | {t['cpp']:.1f} | {t['eager']:.1f} | "
                         f"{ratio(t, 'eager', 'cpp'):.2f} |")
    counts = sorted(result["scaling"], key=int)
    lines += ["", "## Thread scaling (fp32, cpp)", "",
              "| op | " + " | ".join(f"{c} thread{'s' if int(c) > 1 else ''} ms" for c in counts)
              + " | speed-up |", "| --- | " + " | ".join("---:" for _ in counts) + " | ---: |"]
    for name in result["scaling"][counts[0]]:
        times = [result["scaling"][c][name] for c in counts]
        lines.append(f"| {name} | " + " | ".join(f"{t:.1f}" for t in times)
                     + f" | {times[0] / times[-1]:.2f} |")
    rss = result["rss_growth_mib"]
    lines += ["", "## Peak resident-size growth, fused `full` forward+backward, glibc defaults", "",
              f"N={N}, V={V}, H={H} (one [N, V] fp32 tensor: {N * V * 4 / 2**20:.0f} MiB): "
              + ", ".join(f"{backend} {mib:.0f} MiB" for backend, mib in rss.items()) + "."]
    return "\n".join(lines) + "\n"


def write(result: dict, meta: dict, out_dir: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"cpu-native_{meta['commit']}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "result": result}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(result, meta))
    return [base + ".json", base + ".md"]
