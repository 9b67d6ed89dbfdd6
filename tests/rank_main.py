"""One process of a test's multi-process opd_train run: ``python tests/rank_main.py ARGS`` is
``python -m opd_train ARGS`` (torchrun's environment variables say which process it is), with
two test switches read from the environment:

- ``OPD_TEST_GREEDY=1``: greedy rollouts (training and held-out), the same whatever the number
  of processes, so that a run on two processes and one on one process train on the same global
  batch and measure the same held-out one;
- ``OPD_TEST_SIGINT=N:R``: the process of rank R sends itself a SIGINT before its N-th rollout
  generation (a Ctrl-C that reaches one process only).
"""
import functools
import os
import signal
import sys

import torch

from opd_train import cli, heldout, train

torch.set_num_threads(1)  # two processes share the test machine's cores
if os.environ.get("OPD_TEST_GREEDY"):
    for module in (train, heldout):
        module.generate = functools.partial(module.generate, greedy=True)
if os.environ.get("OPD_TEST_SIGINT"):
    at, rank = map(int, os.environ["OPD_TEST_SIGINT"].split(":"))
    real_generate, calls = train.generate, []

    def interrupting_generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == at and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGINT)
        return real_generate(*args, **kwargs)

    train.generate = interrupting_generate
sys.exit(cli.main(sys.argv[1:]))
