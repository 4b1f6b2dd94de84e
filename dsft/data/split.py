"""Deterministic train / validation / test splits, k-fold folds and mixing weights."""

from __future__ import annotations

import array
import random
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def split_count(n: int, fraction: float, size: int) -> int:
    """Examples to carve: ``size`` when set, else ``round(n * fraction)`` (at least 1 if > 0)."""
    if size > 0:
        return min(size, n)
    return max(round(n * fraction), 1) if fraction > 0 and n else 0


def shuffled(n: int, seed: int) -> np.ndarray:
    """``random.Random(seed).shuffle(list(range(n)))`` as an integer array, without the list.

    The same Fisher-Yates steps with the same generator calls as CPython's
    ``Random.shuffle``, on a 4-byte-per-item array (8 past 2**31 items): a list of n ints
    costs ~36 bytes each, which at millions of examples dominated preparing the data.
    """
    rng = random.Random(seed)
    code, dtype = ("i", np.int32) if n < 2**31 else ("q", np.int64)
    a = array.array(code, range(n))
    randbelow = rng._randbelow  # what Random.shuffle calls; stable since Python 3.2
    for i in reversed(range(1, n)):
        j = randbelow(i + 1)
        a[i], a[j] = a[j], a[i]
    return np.frombuffer(a, dtype=dtype) if n else np.zeros(0, np.int32)


def carve_arrays(
    n: int, n_val: int, n_test: int, seed: int, kfold: int = 0, fold: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle ``range(n)`` with ``seed``; the first ``n_test`` are test, then validation.

    With ``kfold`` >= 2 the rest after the test split is cut into ``kfold`` near-equal
    folds and fold ``fold`` is the validation split (``n_val`` is ignored). The
    same arguments give the same split on every rank and machine (Python's Mersenne
    Twister is platform-independent). Index arrays, 8 bytes per example.
    """
    order = shuffled(n, seed)
    test = np.sort(order[:n_test])
    rest = order[n_test:]
    if kfold >= 2:
        bounds = [len(rest) * k // kfold for k in range(kfold + 1)]
        val = np.sort(rest[bounds[fold] : bounds[fold + 1]])
        train = np.concatenate([rest[: bounds[fold]], rest[bounds[fold + 1] :]])
        return train, val, test
    return rest[n_val:], np.sort(rest[:n_val]), test


def carve(
    n: int, n_val: int, n_test: int, seed: int, kfold: int = 0, fold: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """:func:`carve_arrays` as lists."""
    tr, va, te = carve_arrays(n, n_val, n_test, seed, kfold, fold)
    return tr.tolist(), va.tolist(), te.tolist()


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Train / val / test index lists by fractions (see :func:`carve`)."""
    return carve(n, split_count(n, val_fraction, 0), split_count(n, test_fraction, 0), seed)


def reweight(indices: Any, groups: Any, weights: list[float], seed: int) -> np.ndarray:
    """Repeat or subsample each group's indices by its weight (2.0 = twice, 0.5 = a half).

    ``groups[i]`` is the group (source file) of index ``indices[i]``. The integer part
    repeats every index; the fractional part adds a seeded sample of that size.
    """
    rng = random.Random(seed)
    indices, groups = np.asarray(indices), np.asarray(groups)
    out: list[np.ndarray] = []
    for g, w in enumerate(weights):
        mine = indices[groups == g]
        whole, frac = int(w), w - int(w)
        out.extend([mine] * whole)
        picked = rng.sample(range(len(mine)), round(frac * len(mine)))
        out.append(np.sort(mine[np.asarray(picked, dtype=np.int64)]))
    return np.concatenate(out) if out else indices[:0]


def take(items: list[T], idx: list[int]) -> list[T]:
    return [items[i] for i in idx]
