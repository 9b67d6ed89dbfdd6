"""Splitting a step's rollouts into micro-batches by a token budget, and getting a step's
numbers to the host in one copy (one synchronization a step)."""
from __future__ import annotations

from typing import Optional

import torch

from opd_kernels import TopKStats

from .distributed import SINGLE, World
from .loss import token_reward
from .rollout import Batch


def micro_batches(batch: Batch, budget: int, count: int = 0) -> list:
    """The batch as micro-batches of at most ``budget`` tokens each, a micro-batch costing its
    rows x its own trimmed length (longest real prompt + longest response among them). Rows go
    longest first, so that rows of similar length share a micro-batch and little of it is
    padding; a row longer than the budget is a micro-batch of its own. ``budget`` 0: the batch
    as it is, in one piece. ``count``: at least this many micro-batches (at most the rows), the
    largest split in two until there are: processes sharding a model run the same number of
    forwards (each gathers the shards)."""
    if not budget and count <= 1:
        return [batch]
    prompts = [n - r for n, r in zip(batch.lengths, batch.response_lengths)]
    order = sorted(range(len(prompts)), key=lambda i: -batch.lengths[i])
    groups, group, width = [], [], (0, 0)
    for i in order:
        grown = (max(width[0], prompts[i]), max(width[1], batch.response_lengths[i]))
        if group and (len(group) + 1) * sum(grown) > budget:
            groups.append(group)
            group, grown = [], (prompts[i], batch.response_lengths[i])
        group.append(i)
        width = grown
    groups.append(group)
    while len(groups) < min(count, len(order)):  # fewer rows a micro-batch: within the budget still
        largest = max(groups, key=len)
        groups.remove(largest)
        groups += [largest[:len(largest) // 2], largest[len(largest) // 2:]]
    return [batch.rows(sorted(g)) for g in groups]


def shared_micro_batches(batch: Batch, budget: int, world: World) -> list:
    """``micro_batches`` in as many pieces on every process as the most any of them needs."""
    parts = micro_batches(batch, budget)
    return micro_batches(batch, budget, world.most(len(parts))) if world.launched else parts


def to_host(tensors: list) -> list:
    """The tensors (any shapes, floating or bool) on the host after one device-to-host copy:
    a single synchronization however many there are. float64 holds fp32 values and bools exactly."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    host = flat.cpu().split([t.numel() for t in tensors])
    return [h.reshape(t.shape).to(t.dtype) for h, t in zip(host, tensors)]


def host_summary(scalars: list, stats: Optional[TopKStats], world: World = SINGLE) -> tuple:
    """(the device scalars as floats, the statistics' summary with the token reward, or {}),
    from one device-to-host copy. With several processes the summary is over every process's
    positions (theirs gathered on the host)."""
    fields = [*stats.tensors().values(), stats.mask] if stats is not None else []
    host = to_host([*scalars, *fields])
    numbers = [t.item() for t in host[:len(scalars)]]
    if stats is None:
        return numbers, {}
    *values, mask = world.concatenated(host[len(scalars):])
    summary = TopKStats(**dict(zip(stats.tensors(), values)), mask=mask,
                        teacher_entropy_is_bound=stats.teacher_entropy_is_bound).summary()
    return numbers, {**summary, "token_reward": token_reward(summary)}
