"""Rank shards of training batches and of evaluation, and the data.mix dealer
(dsft/data/sampler.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dsft.data.sampler import eval_shard, steps_per_epoch, train_batches


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_train_shards_disjoint_and_lockstep(world: int) -> None:
    n, mb, accum = 103, 4, 2
    per_rank = [
        train_batches(n, mb, world, r, epoch=1, seed=5, multiple=accum) for r in range(world)
    ]
    counts = {len(b) for b in per_rank}
    assert counts == {steps_per_epoch(n, mb, world, accum) * accum}  # same steps everywhere
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen))  # no example twice in an epoch
    assert len(seen) > n - mb * world * accum  # only less than one global batch dropped
    # a new epoch reshuffles, the same epoch is reproducible
    assert per_rank[0] == train_batches(n, mb, world, 0, epoch=1, seed=5, multiple=accum)
    assert per_rank[0] != train_batches(n, mb, world, 0, epoch=2, seed=5, multiple=accum)


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 3), (7, 1), (13, 2)])
def test_eval_shards_cover_exactly(n: int, world: int) -> None:
    shards = [eval_shard(n, world, r) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))


def _mixer(sizes=(40, 400), mix=(0.7, 0.3), seed=5):
    from dsft.data.sampler import Mixer

    return Mixer(np.repeat(np.arange(len(sizes)), sizes), list(mix), seed)


def test_mix_proportions_hold_over_every_stretch_of_the_run() -> None:
    m = _mixer()
    for lo, hi in ((0, 1000), (1000, 1100), (0, 100_000), (123_457, 123_557)):
        counts = m.counts(lo, hi, block=333)
        assert counts.sum() == hi - lo
        assert abs(counts[0] - 0.7 * (hi - lo)) <= 3, (lo, hi, counts)
    assert m.counts(0, 10).tolist() == np.bincount(m.sources(0, 10), minlength=2).tolist()
    with pytest.raises(ValueError, match="no training examples"):
        _mixer(sizes=(40, 0))
    assert _mixer(sizes=(40, 0), mix=(1.0, 0.0)).counts(0, 50).tolist() == [50, 0]


def test_mix_small_source_cycles_through_fresh_orders() -> None:
    m = _mixer()
    units = m.units(0, 2000)
    small = units[units < 40]
    passes = [small[i : i + 40] for i in range(0, len(small) - 39, 40)]
    assert len(passes) >= 30 and all(sorted(p) == list(range(40)) for p in passes)
    assert passes[0].tolist() != passes[1].tolist()  # a new order each pass
    assert np.array_equal(m.units(700, 900), units[700:900])  # any stretch, same slots
    big = units[units >= 40]
    assert len(big) == 600 and sorted(big[:400].tolist()) == list(range(40, 440))  # one pass


@pytest.mark.parametrize("world", [1, 2, 3])
def test_mixed_batches_shard_lockstep_and_resume(world: int) -> None:
    from dsft.data.sampler import mixed_batches, train_batches

    m = _mixer()
    n, mb, accum = 440, 4, 2
    for epoch in (0, 3):
        per_rank = [mixed_batches(m, n, mb, world, r, epoch, 9, True, accum) for r in range(world)]
        plain = train_batches(n, mb, world, 0, epoch, 9, True, accum)
        assert all(len(b) == len(plain) for b in per_rank)  # same steps per epoch: lockstep
        assert all(len(x) == mb for b in per_rank for x in b)
        # a round's micro-batches are that round's slots, whichever rank takes them
        rounds = len(plain)
        lo = epoch * rounds * mb * world
        slots = m.units(lo, lo + rounds * mb * world).reshape(rounds, -1)
        for r in range(rounds):
            got = sorted(u for b in per_rank for u in b[r])
            assert got == sorted(slots[r].tolist())
        # resuming: the same epoch computed afresh (another process) is the same
        again = _mixer()
        assert mixed_batches(again, n, mb, world, 0, epoch, 9, True, accum) == per_rank[0]
