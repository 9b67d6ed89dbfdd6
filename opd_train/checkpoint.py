"""Atomic checkpoints and exact resume.

A checkpoint is a folder that ``AutoModelForCausalLM.from_pretrained`` loads (safetensors weights,
config, tokenizer) plus ``trainer_state.pt``: the step, the optimizer state and the torch, python
and numpy RNG states, so that a resumed run ends with the same weights as an uninterrupted one.

Atomicity: everything is written into a temporary folder beside the target, every file fsync'ed,
then the folder is renamed into place and the ``latest`` pointer file replaced (os.replace is
atomic). A crash at any moment leaves the previous checkpoint and pointer intact.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile

import numpy as np
import torch

LATEST = "latest"
STATE_FILE = "trainer_state.pt"


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model_dir(target: str, model, tokenizer, extra_state: dict | None = None) -> None:
    """Write ``target`` (model + tokenizer [+ trainer state]) atomically; replaces an old one."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra_state is not None:
            torch.save(extra_state, os.path.join(tmp, STATE_FILE))
        _fsync_tree(tmp)
        if os.path.exists(target):
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            os.replace(target, os.path.join(old, "x"))
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(checkpoint_dir: str, step: int, model, tokenizer, optimizer, keep: int = 2) -> str:
    """checkpoint_dir/step-NNNNNN, then the ``latest`` pointer; older ones beyond ``keep`` go."""
    name = f"step-{step:06d}"
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()}
    save_model_dir(os.path.join(checkpoint_dir, name), model, tokenizer, state)
    atomic_write_text(os.path.join(checkpoint_dir, LATEST), name + "\n")
    steps = sorted(d for d in os.listdir(checkpoint_dir) if d.startswith("step-"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(checkpoint_dir, old), ignore_errors=True)
    return os.path.join(checkpoint_dir, name)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    pointer = os.path.join(checkpoint_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(checkpoint_dir, f.read().strip())


def load_trainer_state(path: str) -> dict:
    return torch.load(os.path.join(path, STATE_FILE), weights_only=True)
