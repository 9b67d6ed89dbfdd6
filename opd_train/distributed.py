"""opd_train on several processes (``torchrun --nproc-per-node N -m opd_train ...``): the process
group, the sharding of both models with FSDP2, and the few collectives the loop needs.

Launched by torchrun (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in the environment), every process
joins the default group (gloo for CPU tensors, NCCL for CUDA ones, on the GPU of its
``LOCAL_RANK``) and checks with the others that they resolved the same configuration before any
work. Each decoder layer of both models, then the root (embedding, final norm, lm_head), is
``fully_shard``-ed over a 1-D mesh of all the processes: the student with its AdamW over the shards,
the teacher likewise with no optimizer (it only runs forwards, each layer gathered for its own
forward and freed after it). The root's parameters stay gathered from its forward to the end of
the backward (``reshard_after_forward=False``): the loss reads the lm_head weight there, as one
plain tensor shared with the tied embedding, and its gradient goes through FSDP's own
reduce-scatter with every other parameter's. FSDP averages the gradients over the processes, and
each process's loss sum is divided by the step's global count of response tokens over their
number, so N processes x B rollouts give the gradient of one process x N B.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from .errors import UsageError
from .models import OutputHead, final_hidden

# The root's forward method (registered with FSDP, so that it gathers the root's parameters)
# that returns the final hidden states with the output head as the module then holds it.
HIDDEN_AND_HEAD = "opd_hidden_and_head"
# Options that a run on several processes does not take, and why.
SINGLE_PROCESS_ONLY = {
    "teacher_server": "a served teacher's failure stops one process while the others go on",
    "cold_start": "its SFT is a one-process loop; cold-start the student in one process, then "
                  "give the result as --student",
}


class SharedError(UsageError):
    """A bad set-up that every process found alike (``agree``): the main process reports it."""


@dataclass(frozen=True)
class World:
    """The processes of this run: ``size`` 1 and no group for a plain ``python -m opd_train``."""
    rank: int = 0
    size: int = 1
    launched: bool = False  # by torchrun: the group exists, the models are sharded

    @property
    def main(self) -> bool:
        """The process that writes the run folder's logs, plots and console output."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.launched:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (in place; a no-op for one process)."""
        if self.launched:
            dist.all_reduce(values)
        return values

    def gather(self, value) -> list:
        """Every process's ``value`` (picklable), in rank order."""
        if not self.launched:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def most(self, value: int) -> int:
        """The largest ``value`` of the processes."""
        if not self.launched:
            return value
        box = torch.tensor([value])  # a host number: the group's CPU backend takes it
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return int(box)

    def concatenated(self, tensors: list) -> list:
        """Host tensors of every process concatenated along their first dimension (per-position
        statistics: each process has its own count of positions)."""
        if not self.launched:
            return tensors
        return [torch.cat(column) for column in zip(*self.gather(tensors))]

    def from_main(self, value):
        """The main process's ``value`` on every process."""
        if not self.launched:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def main_first(self):
        """The body runs on the main process first, then on the others (e.g. filling a cache
        that the others then read instead of writing it too)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def share(self, items: list) -> tuple:
        """(this process's equal share of ``items``, how many of them are real): the list is
        padded with its last item to a multiple of ``size``, so that every process runs the
        same number of (collective) forwards; the padding is not to be counted."""
        per = -(-len(items) // self.size)
        padded = items + items[-1:] * (per * self.size - len(items))
        mine = padded[self.rank * per:(self.rank + 1) * per]
        return mine, max(0, min(per, len(items) - self.rank * per))


SINGLE = World()


def launched_world() -> World:
    """The World of this process: joined to torchrun's group when launched by it."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" then means this process's GPU
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    return World(rank=int(os.environ["RANK"]), size=int(os.environ["WORLD_SIZE"]), launched=True)


def close(world: World) -> None:
    if world.launched:
        dist.destroy_process_group()


def check_options(cfg, world: World) -> None:
    """What a run on ``world.size`` processes cannot take (a message naming the option)."""
    if not world.launched:
        return
    for name, why in SINGLE_PROCESS_ONLY.items():
        if getattr(cfg, name):
            raise UsageError(f"--{name.replace('_', '-')} works in one process only ({why})")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {cfg.device}: under torchrun each process takes the GPU of its "
                         f"LOCAL_RANK; give --device cuda (or auto, or cpu)")
    if cfg.output_dir is None and cfg.resume is None:
        raise UsageError("--output-dir DIR is required under torchrun: the processes share one run "
                         "folder (the time-stamped default would differ between them)")
    rollouts = cfg.prompts_per_step * cfg.rollouts_per_prompt
    if rollouts % world.size:
        raise UsageError(f"--prompts-per-step {cfg.prompts_per_step} x --rollouts-per-prompt "
                         f"{cfg.rollouts_per_prompt} = {rollouts} rollouts a step do not split evenly "
                         f"over {world.size} processes")


def agree(world: World, outcome):
    """The resolved Config, once every process has one and they are all equal; ``outcome`` is
    this process's Config or its UsageError. Every process raises the same UsageError when any
    failed or they differ (each reaches this one collective, so a failure never leaves the
    others waiting)."""
    if not world.launched:
        if isinstance(outcome, UsageError):
            raise outcome
        return outcome
    seen = world.gather(str(outcome) if isinstance(outcome, UsageError) else dataclasses.asdict(outcome))
    errors = [(rank, s) for rank, s in enumerate(seen) if isinstance(s, str)]
    if errors:
        messages = {s for _, s in errors}
        where = "" if len(errors) == world.size and len(messages) == 1 else f"rank {errors[0][0]}: "
        raise SharedError(where + errors[0][1])
    differing = sorted(name for name in seen[0] if any(s[name] != seen[0][name] for s in seen))
    if differing:
        shown = "; ".join(f"--{n.replace('_', '-')}: "
                          + ", ".join(f"rank {r} {s[n]!r}" for r, s in enumerate(seen))
                          for n in differing)
        raise SharedError(f"the processes were given different options ({shown}); every process "
                          f"of a run must get the same command line")
    return outcome


def mesh(device: str):
    """The 1-D mesh of every process, on ``device``'s type."""
    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


def shard(model, head: OutputHead, device_mesh) -> OutputHead:
    """``fully_shard`` each decoder layer, then the root, and register the root's method that
    gives (final hidden states, ``head`` with the weight and bias the module then holds).
    Returns ``head`` over the sharded parameters (DTensors): the original full ones are neither
    trained nor kept."""
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh, reshard_after_forward=False)
    layer = model.get_output_embeddings()
    # the parameters the module holds when called: gathered inside a forward, sharded outside
    held = lambda: dataclasses.replace(head, weight=layer.weight,  # noqa: E731
                                       bias=None if head.bias is None else layer.bias)

    def root_forward(input_ids, attention_mask, position_ids):
        return final_hidden(model, input_ids, attention_mask, position_ids), held()

    setattr(model, HIDDEN_AND_HEAD, root_forward)
    register_fsdp_forward_method(model, HIDDEN_AND_HEAD)
    return held()


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def hidden_and_head(model, head: OutputHead, input_ids, attention_mask, position_ids) -> tuple:
    """(the model's final hidden states, its output head as the loss is to use it): a sharded
    model's from its registered root method (the root's parameters gathered)."""
    if is_sharded(model):
        return getattr(model, HIDDEN_AND_HEAD)(input_ids, attention_mask, position_ids)
    return final_hidden(model, input_ids, attention_mask, position_ids), head


def release(model) -> None:
    """Free the gathered root parameters of a sharded model after forwards that no backward
    follows (a backward reshards them itself). Until then the module holds the gathered ones in
    place of its sharded parameters."""
    if is_sharded(model):
        model.reshard()


def seed_of(*parts: int) -> int:
    """A torch seed that is a function of ``parts`` only (non-negative ints); the rollouts of a
    process at a step are sampled from seed_of(seed, step, rank), so that a resumed run samples
    what the uninterrupted one did."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int, device: str):
    """The torch RNG seeded with ``seed`` inside, restored after."""
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def global_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s total norm as a plain tensor (a DTensor over sharded gradients)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
