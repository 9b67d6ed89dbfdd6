"""``python -m opd_train.measure``: the per-step cost of the loss and its diagnostics, with and
without the full diagnostics, at SmolLM2-like shapes on random data (no model is loaded: only
the lm_head part of a step is timed, the decoders' forwards are the same in every mode).

Counts the full-vocabulary lm_head products of each model by wrapping
opd_kernels.reference.linear_logits, through which the PyTorch path forms every one of them (in the
forward and in the backward's recomputation of checkpointed chunks), in units of one product
over all N rows. The dense backward's gradient GEMMs (dH, dW) are not products of the logits and
are not counted; the k-sparse ones of "topk" touch k rows of W a position.
"""
from __future__ import annotations

import argparse
import time

import torch

import opd_kernels
import opd_kernels.reference

from .batching import host_summary


def _counting(rows: dict):
    real = opd_kernels.reference.linear_logits

    def linear_logits(hidden, weight, *args, **kwargs):
        rows[weight.data_ptr()] = rows.get(weight.data_ptr(), 0) + hidden.shape[0]
        return real(hidden, weight, *args, **kwargs)

    return linear_logits


def step(tensors: dict, objective: str, k: int, diagnostics: bool) -> None:
    """The loss part of one training step: the fused pass, its backward and the host copy."""
    out = opd_kernels.fused_linear_opd_loss(
        tensors["hs"], tensors["ws"], tensors["ht"], tensors["wt"], objective=objective, k=k,
        tokens=tensors["tokens"], reduction="sum", return_stats=diagnostics)
    loss, stats = out if diagnostics else (out, None)
    loss.backward()
    host_summary([loss.detach()], stats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m opd_train.measure")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    shape = (args.rows, args.tokens, args.hidden)
    tensors = {"hs": torch.randn(shape, requires_grad=True), "ht": torch.randn(shape),
               "ws": (torch.randn(args.vocab, args.hidden) * 0.05).requires_grad_(),
               "wt": torch.randn(args.vocab, args.hidden) * 0.05,
               "tokens": torch.randint(0, args.vocab, shape[:2])}
    rows = {}
    real = opd_kernels.reference.linear_logits
    n = args.rows * args.tokens
    print(f"V={args.vocab} H={args.hidden} N={args.rows}x{args.tokens} k={args.k}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'objective':<10}{'diagnostics':<13}{'s/step (median)':>16}{'student products':>18}{'teacher products':>18}")
    for objective in ("topk", "full"):
        for diagnostics in (False, True):
            opd_kernels.reference.linear_logits = _counting(rows)
            try:
                rows.clear()
                step(tensors, objective, args.k, diagnostics)  # warm-up, and the count
                counts = [rows.get(tensors[w].data_ptr(), 0) / n for w in ("ws", "wt")]
            finally:
                opd_kernels.reference.linear_logits = real
            times = []
            for _ in range(args.repeats):
                began = time.perf_counter()
                step(tensors, objective, args.k, diagnostics)
                times.append(time.perf_counter() - began)
                tensors["hs"].grad = tensors["ws"].grad = None
            median = sorted(times)[len(times) // 2]
            print(f"{objective:<10}{'full' if diagnostics else 'loss only':<13}{median:>16.2f}"
                  f"{counts[0]:>18g}{counts[1]:>18g}")


if __name__ == "__main__":
    main()
