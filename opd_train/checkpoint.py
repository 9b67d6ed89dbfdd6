"""Atomic checkpoints and exact resume.

A checkpoint is ``checkpoints/step-NNNNNN/`` holding ``model/``, a folder that
``AutoModelForCausalLM.from_pretrained`` loads (safetensors weights, config, the tokenizer as it
came with the student), and beside it ``trainer_state.pt``: the step, the optimizer state, the
run's wall time so far and the torch, python and numpy RNG states, so that a resumed run ends
with the same weights as an uninterrupted one.

A run on several processes (distributed.py) keeps the same layout, the model and optimizer
state in ``dcp/`` instead, written by every process with torch.distributed.checkpoint (each its
shards), ``rng-rank-R.pt`` per process, and ``model/`` exported from the full state dict gathered
on the main process; ``trainer_state.pt`` then holds the step, the wall time and the number of
processes (a resume takes as many).

Atomicity: everything is written into a ``.tmp-*`` folder beside the target, every file fsync'ed,
then the folder is renamed into place and the ``latest`` pointer file replaced (os.replace is
atomic). A crash at any moment leaves the previous checkpoint and pointer intact; the leftover
temporary folder is removed by ``remove_leftovers`` when the run starts again. Files get the
permissions the umask gives (tempfile alone makes them private).
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
SHARDED_DIR = "dcp"
STEP_PREFIX = "step-"
_LEFTOVER_PREFIXES = (".tmp-", ".old-")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _new_tmp(target: str) -> str:
    """A temporary folder beside ``target``, to be filled and then committed in its place."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    return tmp


def _commit(tmp: str, target: str) -> None:
    _fsync_tree(tmp)
    if os.path.exists(target):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(target)), prefix=".old-")
        os.replace(target, os.path.join(old, "x"))
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def _write_dir(target: str, fill) -> None:
    """``fill(tmp)`` writes the folder's content; then it replaces ``target`` atomically."""
    tmp = _new_tmp(target)
    try:
        fill(tmp)
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_model(path: str, model, tokenizer) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def save_model_dir(target: str, model, tokenizer) -> None:
    """Write ``target`` (a Hugging Face model folder with its tokenizer) atomically."""
    _write_dir(target, lambda tmp: _save_model(tmp, model, tokenizer))


def remove_leftovers(folder: str) -> list:
    """Remove the temporary folders and files a kill during a write left in ``folder``."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in os.listdir(folder):
        if name.startswith(_LEFTOVER_PREFIXES):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            removed.append(name)
    return removed


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


def save_checkpoint(checkpoint_dir: str, step: int, model, tokenizer, optimizer, *, keep: int = 2,
                    wall_time_s: float = 0.0, rng: Optional[dict] = None) -> str:
    """checkpoint_dir/step-NNNNNN, then the ``latest`` pointer; of the older checkpoints, those
    beyond ``keep`` (0: none) go. Only older ones: a checkpoint of a higher step is never this
    run's past, so it is never deleted here. ``rng``: the RNG states as they were at the end of
    ``step`` (default: as they are now)."""
    name = f"{STEP_PREFIX}{step:06d}"
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng or rng_state(),
             "wall_time_s": wall_time_s}

    def fill(tmp):
        _save_model(os.path.join(tmp, MODEL_DIR), model, tokenizer)
        torch.save(state, os.path.join(tmp, STATE_FILE))

    _write_dir(os.path.join(checkpoint_dir, name), fill)
    _point_and_rotate(checkpoint_dir, name, keep)
    return os.path.join(checkpoint_dir, name)


def _point_and_rotate(checkpoint_dir: str, name: str, keep: int) -> None:
    atomic_write_text(os.path.join(checkpoint_dir, LATEST), name + "\n")
    older = sorted(d for d in os.listdir(checkpoint_dir) if d.startswith(STEP_PREFIX) and d < name)
    for old in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(os.path.join(checkpoint_dir, old), ignore_errors=True)


def _without_aliases(model, state: dict) -> dict:
    """``state`` without the second and later names of a parameter (a tied lm_head's): gathered
    copies no longer share storage, by which save_pretrained recognizes tied weights."""
    first = {}
    aliases = {name for name, p in model.named_parameters(remove_duplicate=False)
               if first.setdefault(id(p), name) != name}
    return {name: t for name, t in state.items() if name not in aliases}


def _rng_file(rank: int) -> str:
    return f"rng-rank-{rank}.pt"


def save_sharded_checkpoint(checkpoint_dir: str, step: int, model, tokenizer, optimizer, *, world,
                            keep: int = 2, wall_time_s: float = 0.0) -> str:
    """``save_checkpoint`` of a model sharded over ``world``'s processes (every one calls it):
    the main process makes the temporary folder, each writes its shards and RNG state into it,
    the main process exports the gathered model and commits the folder."""
    name = f"{STEP_PREFIX}{step:06d}"
    target = os.path.join(checkpoint_dir, name)
    tmp = world.from_main(_new_tmp(target) if world.main else None)
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=os.path.join(tmp, SHARDED_DIR))
        torch.save(rng_state(), os.path.join(tmp, _rng_file(world.rank)))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world.main:
            model.save_pretrained(os.path.join(tmp, MODEL_DIR), state_dict=_without_aliases(model, full),
                                  safe_serialization=True)
            tokenizer.save_pretrained(os.path.join(tmp, MODEL_DIR))
            torch.save({"step": step, "wall_time_s": wall_time_s, "processes": world.size},
                       os.path.join(tmp, STATE_FILE))
        world.barrier()  # every process's files are in place
        if world.main:
            _commit(tmp, target)
            _point_and_rotate(checkpoint_dir, name, keep)
    except BaseException:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    world.barrier()  # no process goes on before the checkpoint is committed
    return target


def restore_sharded(checkpoint: str, model, optimizer, world) -> None:
    """The model and optimizer state of ``save_sharded_checkpoint``'s folder, and this process's
    RNG state (the same number of processes saved it: cli checks)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=os.path.join(checkpoint, SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    set_rng_state(torch.load(os.path.join(checkpoint, _rng_file(world.rank)), weights_only=True))


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    pointer = os.path.join(checkpoint_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(checkpoint_dir, f.read().strip())


def model_dir(checkpoint: str) -> str:
    """The Hugging Face model folder of a checkpoint."""
    return os.path.join(checkpoint, MODEL_DIR)


def load_trainer_state(path: str) -> dict:
    """The checkpoint's trainer state; ``processes``: how many processes wrote it."""
    return {"processes": 1, **torch.load(os.path.join(path, STATE_FILE), weights_only=True)}
