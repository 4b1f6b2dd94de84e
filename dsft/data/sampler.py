"""Rank sharding of example indices.

Training: every epoch all indices are permuted with ``seed + epoch`` (the same on
every rank), the tail that does not fill a global batch is dropped, and rank r
takes every ``world``-th micro-batch, so the ranks step in lockstep and never see
the same example in one epoch. Evaluation: rank r takes indices ``r::world`` with
no padding and no duplicates; metrics are sums, so uneven shards are exact.
"""

from __future__ import annotations

import random


def train_batches(
    n: int,
    micro_batch: int,
    world_size: int,
    rank: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    multiple: int = 1,
) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for one epoch.

    ``multiple`` (the gradient accumulation) makes every rank's batch count a
    multiple of it, so an epoch ends on an optimizer-step boundary.
    """
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_round = micro_batch * world_size
    rounds = steps_per_epoch(n, micro_batch, world_size, multiple) * multiple
    batches = []
    for r in range(rounds):
        chunk = order[r * per_round : (r + 1) * per_round]
        batches.append(chunk[rank * micro_batch : (rank + 1) * micro_batch])
    return batches


def steps_per_epoch(n: int, micro_batch: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch of ``n`` examples (the tail short of a step is dropped)."""
    return n // (micro_batch * world_size * grad_accum)


def eval_shard(n: int, world_size: int, rank: int) -> list[int]:
    """This rank's evaluation indices: disjoint, covering, no padding."""
    return list(range(rank, n, world_size))
