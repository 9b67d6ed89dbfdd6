"""Past one device: the option naming this rank's share of a vocabulary split across ranks
(:class:`VocabParallel`; the ops that take it run on backends/vocab_parallel.py), and DTensor
weights.

DTensor weights (``local_weight``): an lm_head weight or bias that is a DTensor on a 1-D mesh is
used as its placement says. Replicate: the local tensor. Shard(0) without ``vocab_parallel``
(FSDP2 ``fully_shard``): gathered, ``full_tensor()``, differentiable: each rank holds the whole
[V, H] weight for the loss (its all-gather costs V H elements a rank), and the backward
reduce-scatters the gradient averaged over the ranks, as FSDP2 reduces the gradients of the
parameters it gathers in its own forward: the lm_head gets the same gradient whether its logits
are computed inside the module's forward or by this loss outside it. Shard(0) with
``vocab_parallel``: the local rows, which must be the option's range (as torch.chunk splits V).
Other placements and meshes raise, naming the argument. Hidden states and logits may be
Replicate DTensors (their local tensor is used); sharded ones raise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard


@dataclass(frozen=True)
class VocabParallel:
    """This rank's ids [``start``, ``stop``) of a vocabulary of ``total`` ids (padding rows of
    the lm_heads included) split over the ranks of ``group`` (None: the default group).
    ``reduce_hidden_grad``: all-reduce the hidden states' gradient over the group in the
    backward (True: it equals the unsharded op's on every rank; False: each rank's partial sum).
    """

    start: int
    stop: int
    total: int
    group: Optional[dist.ProcessGroup] = None
    reduce_hidden_grad: bool = True

    def __post_init__(self):
        for name in ("start", "stop", "total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"vocab_parallel.{name} must be an int, got {value!r}")
        if not 0 <= self.start < self.stop <= self.total:
            raise ValueError(f"vocab_parallel range [{self.start}, {self.stop}) must satisfy "
                             f"0 <= start < stop <= total = {self.total}")
        if not isinstance(self.reduce_hidden_grad, bool):
            raise TypeError(f"vocab_parallel.reduce_hidden_grad must be True or False, got "
                            f"{self.reduce_hidden_grad!r}")

    @classmethod
    def even(cls, total: int, group: Optional[dist.ProcessGroup] = None,
             reduce_hidden_grad: bool = True) -> "VocabParallel":
        """This rank's range when ``total`` ids are split as torch.chunk (and DTensor's Shard(0))
        splits them: ceil(total / size) ids a rank, the last ones fewer."""
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        step = -(-total // size)
        start = min(rank * step, total)
        return cls(start, min(start + step, total), total, group, reduce_hidden_grad)

    @property
    def width(self) -> int:
        return self.stop - self.start


# ---- DTensor operands ----------------------------------------------------------------------------

def _placement_error(name: str, t: DTensor, supported: str) -> ValueError:
    return ValueError(f"{name} is a DTensor with placements {tuple(t.placements)} on a mesh of "
                      f"shape {tuple(t.device_mesh.shape)}, which is not supported here: "
                      f"{supported}")


def local_weight(name: str, t: Optional[torch.Tensor],
                 vocab_parallel: Optional[VocabParallel]) -> Optional[torch.Tensor]:
    """An lm_head weight [V, H] or bias [V] as the loss uses it (see the module docstring);
    a plain tensor is returned as it is."""
    if not isinstance(t, DTensor):
        return t
    supported = ("a 1-D mesh with Replicate, or Shard(0) (FSDP2, gathered; or the vocabulary "
                 "split of vocab_parallel)")
    if t.device_mesh.ndim != 1:
        raise _placement_error(name, t, supported)
    placement = t.placements[0]
    if isinstance(placement, Replicate):
        return t.to_local()
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise _placement_error(name, t, supported)
    if vocab_parallel is None:
        # the backward reduce-scatters the ranks' gradients averaged, FSDP2's own convention
        return t.full_tensor(grad_placements=[Partial("avg")])
    _check_vocab_shard(name, t, checked(vocab_parallel))
    return t.to_local()


def _check_vocab_shard(name: str, t: DTensor, vocab_parallel: VocabParallel) -> None:
    """A Shard(0) DTensor used as the vocabulary split: its group and rows must be the option's."""
    mesh_size = t.device_mesh.size()
    group_size = dist.get_world_size(vocab_parallel.group)
    if mesh_size != group_size:
        raise ValueError(f"{name} is sharded over a mesh of {mesh_size} ranks but "
                         f"vocab_parallel.group has {group_size}: pass the mesh's group "
                         f"({name}.device_mesh.get_group())")
    expected = VocabParallel.even(t.shape[0], t.device_mesh.get_group())
    if (expected.start, expected.stop, t.shape[0]) != (vocab_parallel.start, vocab_parallel.stop,
                                                        vocab_parallel.total):
        raise ValueError(f"{name} is sharded Shard(0) with rows [{expected.start}, "
                         f"{expected.stop}) of {t.shape[0]} on this rank but vocab_parallel says "
                         f"[{vocab_parallel.start}, {vocab_parallel.stop}) of "
                         f"{vocab_parallel.total} (VocabParallel.even gives the DTensor's split)")


def local_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """Hidden states or logits: a Replicate DTensor's local tensor; a sharded one raises (the
    loss is per position and would silently be this rank's positions only)."""
    if not isinstance(t, DTensor):
        return t
    if t.device_mesh.ndim == 1 and isinstance(t.placements[0], Replicate):
        return t.to_local()
    raise _placement_error(name, t, "pass this rank's positions as a plain tensor (to_local()); "
                                    "logits or weights split over the vocabulary take "
                                    "vocab_parallel=VocabParallel(start, stop, total, group)")


def checked(vp) -> VocabParallel:
    if not isinstance(vp, VocabParallel):
        raise TypeError(f"vocab_parallel must be an opd_kernels.VocabParallel or None, got "
                        f"{type(vp).__name__}")
    return vp
