"""Validation/test splits, k-fold, per-file weights and the lean shuffle (dsft/data/split.py)."""

from __future__ import annotations

import pytest

from dsft.data.split import carve, reweight, split_indices


def test_split_is_deterministic_and_disjoint() -> None:
    a = split_indices(1000, 0.1, 0.05, seed=3)
    assert a == split_indices(1000, 0.1, 0.05, seed=3)
    assert a != split_indices(1000, 0.1, 0.05, seed=4)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (850, 100, 50)
    assert sorted(train + val + test) == list(range(1000))


def test_carve_counts_and_kfold() -> None:
    tr, va, te = carve(100, 7, 9, seed=1)
    assert (len(tr), len(va), len(te)) == (84, 7, 9)
    folds = [carve(100, 0, 10, seed=1, kfold=4, fold=f) for f in range(4)]
    vals = [set(v) for _, v, _ in folds]
    assert all(len(v) in (22, 23) for v in vals)
    assert set().union(*vals) == set(range(100)) - set(folds[0][2])  # folds cover the rest
    assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1 :])  # disjoint
    for t, v, te in folds:
        assert not set(t) & set(v) and not set(t) & set(te) and te == folds[0][2]


def test_reweight() -> None:
    idx = list(range(10))
    groups = [0] * 6 + [1] * 4
    out = reweight(idx, groups, [2.0, 0.5], seed=0)
    assert sorted(i for i in out if i < 6) == sorted(list(range(6)) * 2)
    assert len([i for i in out if i >= 6]) == 2


@pytest.mark.parametrize("n", [0, 1, 2, 257, 5000])
def test_lean_shuffle_equals_random_shuffle(n: int) -> None:
    """The splits of earlier versions are kept: same permutation as Random.shuffle."""
    import random

    from dsft.data.split import shuffled

    order = list(range(n))
    random.Random(11).shuffle(order)
    assert shuffled(n, 11).tolist() == order
