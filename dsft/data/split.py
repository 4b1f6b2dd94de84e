"""Deterministic train / validation / test splits, k-fold folds and mixing weights."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split_count(n: int, fraction: float, size: int) -> int:
    """Examples to carve: ``size`` when set, else ``round(n * fraction)`` (at least 1 if > 0)."""
    if size > 0:
        return min(size, n)
    return max(round(n * fraction), 1) if fraction > 0 and n else 0


def carve(
    n: int, n_val: int, n_test: int, seed: int, kfold: int = 0, fold: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """Shuffle ``range(n)`` with ``seed``; the first ``n_test`` are test, then validation.

    With ``kfold`` >= 2 the rest after the test split is cut into ``kfold`` near-equal
    folds and fold ``fold`` is the validation split (``n_val`` is ignored). The
    same arguments give the same split on every rank and machine (Python's Mersenne
    Twister is platform-independent).
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = sorted(order[:n_test])
    rest = order[n_test:]
    if kfold >= 2:
        bounds = [len(rest) * k // kfold for k in range(kfold + 1)]
        val = sorted(rest[bounds[fold] : bounds[fold + 1]])
        train = rest[: bounds[fold]] + rest[bounds[fold + 1] :]
        return train, val, test
    return rest[n_val:], sorted(rest[:n_val]), test


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Train / val / test index lists by fractions (see :func:`carve`)."""
    return carve(n, split_count(n, val_fraction, 0), split_count(n, test_fraction, 0), seed)


def reweight(indices: list[int], groups: list[int], weights: list[float], seed: int) -> list[int]:
    """Repeat or subsample each group's indices by its weight (2.0 = twice, 0.5 = a half).

    ``groups[i]`` is the group (source file) of index ``indices[i]``. The integer part
    repeats every index; the fractional part adds a seeded sample of that size.
    """
    rng = random.Random(seed)
    out: list[int] = []
    for g, w in enumerate(weights):
        mine = [i for i, grp in zip(indices, groups, strict=True) if grp == g]
        whole, frac = int(w), w - int(w)
        out.extend(mine * whole)
        out.extend(sorted(rng.sample(mine, round(frac * len(mine)))))
    return out


def take(items: list[T], idx: list[int]) -> list[T]:
    return [items[i] for i in idx]
