"""Rank sharding of example indices.

Training: every epoch all indices are permuted with ``seed + epoch`` (the same on
every rank), the tail that does not fill a global batch is dropped, and rank r
takes every ``world``-th micro-batch, so the ranks step in lockstep and never see
the same example in one epoch. With data.mix (:class:`Mixer`) the units of each
round are drawn from the sources in fixed proportions instead. Evaluation: rank r takes indices ``r::world`` with
no padding and no duplicates; metrics are sums, so uneven shards are exact.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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


# The golden-ratio Kronecker sequence frac(u * PHI) is as even as a sequence gets: over any
# run of slots each source's count stays within a few of its share (no drift, no streaks).
PHI = (math.sqrt(5) - 1) / 2


class Mixer:
    """data.mix: which source each global sample slot draws from, and which of its units.

    Slot ``u`` (counted from the run's start over all ranks and epochs) belongs to the
    source whose share of ``[0, 1)`` holds ``frac(u * PHI + offset)``: a pure function of
    ``u`` and the seed, so any rank computes any slot, and a resumed run the same ones.
    Within a source, its k-th slot takes its units in a seeded permutation that is
    redrawn each time the source is used up (small sources repeat, large ones are
    subsampled, in the proportions asked for).
    """

    def __init__(
        self, unit_source: np.ndarray, mix: Sequence[float], seed: int, shuffle: bool = True
    ) -> None:
        p = np.asarray(mix, dtype=np.float64)
        self.n_sources = len(p)
        self.bounds = np.cumsum(p / p.sum())[:-1]
        self.seed, self.shuffle = seed, shuffle
        self.offset = random.Random(seed * 1_000_003 + 17).random()
        src = np.asarray(unit_source)
        self.members = [np.flatnonzero(src == s) for s in range(self.n_sources)]
        empty = [s for s in range(self.n_sources) if p[s] > 0 and not len(self.members[s])]
        if empty:
            raise ValueError(f"data.mix: source(s) {empty} have no training examples")

    def sources(self, lo: int, hi: int) -> np.ndarray:
        """The source of each slot in ``[lo, hi)``."""
        x = np.mod(np.arange(lo, hi, dtype=np.float64) * PHI + self.offset, 1.0)
        return np.searchsorted(self.bounds, x, side="right")

    def counts(self, lo: int, hi: int, block: int = 1 << 20) -> np.ndarray:
        """Slots per source in ``[lo, hi)`` (in blocks: bounded memory for long runs)."""
        out = np.zeros(self.n_sources, dtype=np.int64)
        for a in range(lo, hi, block):
            out += np.bincount(self.sources(a, min(hi, a + block)), minlength=self.n_sources)
        return out

    def units(self, lo: int, hi: int) -> np.ndarray:
        """The unit drawn at each slot in ``[lo, hi)``."""
        src = self.sources(lo, hi)
        before = self.counts(0, lo)
        out = np.empty(hi - lo, dtype=np.int64)
        for s, members in enumerate(self.members):
            at = np.flatnonzero(src == s)
            if not len(at):
                continue
            k = before[s] + np.arange(len(at))
            rounds, pos = k // len(members), k % len(members)
            for r in np.unique(rounds):
                pick = rounds == r
                order = pos[pick]
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, s, int(r)])
                    order = rng.permutation(len(members))[order]
                out[at[pick]] = members[order]
        return out


def mixed_batches(
    mixer: Mixer,
    n: int,
    micro_batch: int,
    world_size: int,
    rank: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    multiple: int = 1,
) -> list[list[int]]:
    """:func:`train_batches` for data.mix: the same number of micro-batches per epoch (an
    epoch is still ``n`` units), dealt out the same way (rank r takes the r-th micro-batch
    of every round), but the units are the mixer's slots of this epoch, shuffled within
    each round."""
    per_round = micro_batch * world_size
    rounds = steps_per_epoch(n, micro_batch, world_size, multiple) * multiple
    lo = epoch * rounds * per_round
    units = mixer.units(lo, lo + rounds * per_round).reshape(rounds, per_round)
    if shuffle:
        keys = np.random.default_rng([seed, epoch, 1]).random((rounds, per_round))
        units = np.take_along_axis(units, np.argsort(keys, axis=1, kind="stable"), axis=1)
    mine = units[:, rank * micro_batch : (rank + 1) * micro_batch]
    return mine.tolist()


@dataclass
class Dealer:
    """This rank's training micro-batches, epoch by epoch: each epoch a permutation of the
    units, or with data.mix (``mixer``) units drawn from the sources in fixed proportions."""

    units: int  # training units: examples, or packed rows
    micro_batch: int
    data_parallel: int  # ranks that see different micro-batches
    rank: int  # this rank's data-parallel rank
    seed: int
    shuffle: bool
    grad_accum: int
    mixer: Mixer | None = None
    sources: list[str] = field(default_factory=list)  # the mixer's source names
    # data.mix: samples drawn per source so far (slots [0, upto) of the run), kept up to date
    # at each log line; a pure function of the step, so exact after a resume too
    upto: int = 0
    drawn: np.ndarray | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of unit indices) of ``epoch``."""
        args = (self.units, self.micro_batch, self.data_parallel, self.rank, epoch, self.seed)
        if self.mixer is not None:
            return mixed_batches(self.mixer, *args, self.shuffle, self.grad_accum)
        return train_batches(*args, self.shuffle, self.grad_accum)

    def mix_scalars(self, upto: int) -> dict[str, float]:
        """data.mix: the samples (units) drawn from each source in the run's first ``upto``
        slots, as ``mix/<source>`` scalars (none without data.mix)."""
        if self.mixer is None:
            return {}
        if self.drawn is None:
            self.drawn = np.zeros(len(self.sources), np.int64)
        self.drawn += self.mixer.counts(self.upto, upto)
        self.upto = upto
        return {f"mix/{name}": int(c) for name, c in zip(self.sources, self.drawn, strict=True)}

    def mix_summary(self, upto: int, mix: Sequence[float]) -> dict[str, Any]:
        """data.mix: per source, the share asked for and the samples drawn in ``upto`` slots."""
        self.mix_scalars(upto)
        assert self.drawn is not None
        total = max(int(self.drawn.sum()), 1)
        return {
            name: {"target": w / sum(mix), "drawn": int(c), "share": round(c / total, 4)}
            for name, w, c in zip(self.sources, mix, self.drawn, strict=True)
        }
