"""``python -m opd_train.experiments NAME``: one of the paper's phenomena on the toy world, on a CPU.

The world's student and teachers are trained by SFT on first use and cached (--cache-dir); each
arm of the experiment is then an ordinary opd_train run in a folder of its own under --out, and
the experiment's figure, table and JSON are written beside them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .. import cli
from ..config import default_cache_dir
from ..errors import UsageError
from . import report
from .arms import FULL, QUICK, model_dirs, run_arm
from .specs import EXPERIMENTS, teachers
from .world import World, WorldSpec

# The seconds-long version's world: the same vocabulary and task, a few questions of each set.
QUICK_WORLD = WorldSpec(sft_questions=64, opd_questions=16, cold_start_questions=4, eval_questions=8)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m opd_train.experiments", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=list(EXPERIMENTS),
                   help="; ".join(f"{e.name}: {e.claim}" for e in EXPERIMENTS.values()).replace("%", "%%"))
    p.add_argument("--out", help="run folder, new or empty (default: runs/experiments/NAME-<time>)")
    p.add_argument("--cache-dir", help="where the world's trained models are cached "
                                       "(default: $XDG_CACHE_HOME/opd_train, else ~/.cache/opd_train)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: models this small gain nothing from more, and on "
                        "a busy machine they lose much)")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long version (a few SFT and OPD steps): the wiring, not the phenomenon")
    return p


def run(name: str, out: str, cache_dir: str, quick: bool) -> dict:
    """Runs experiment ``name`` in ``out``; returns the paths of its JSON, table and figure."""
    began = time.time()
    if os.path.isdir(out) and os.listdir(out):
        raise UsageError(f"--out {out}: not empty; give a new folder")
    experiment, scale = EXPERIMENTS[name], QUICK if quick else FULL
    world = World(QUICK_WORLD if quick else WorldSpec())
    dirs = model_dirs(world, teachers(experiment), scale, cache_dir)
    trained = time.time()
    records = {arm.label: run_arm(world, arm, scale, dirs, os.path.join(out, f"arm-{i}"), cache_dir)
               for i, arm in enumerate(experiment.arms)}
    reproduced = bool(experiment.verdict(records))
    extra = {"quick": quick, "models_s": trained - began, "wall_time_s": time.time() - began,
             "vocabulary": len(world.tokenizer)}
    return report.write(out, experiment, records, reproduced, extra)


def main(argv=None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", "experiments", time.strftime(f"{args.name}-%Y%m%d-%H%M%S"))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        paths = run(args.name, out, args.cache_dir or default_cache_dir(), args.quick)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; the arms run so far are in {out}", file=sys.stderr)
        return cli.INTERRUPTED
    finally:  # a caller in the same process keeps its own setting
        torch.set_num_threads(threads)
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
