"""Deterministic train / validation / test splits."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into train / val / test index lists.

    The same (n, fractions, seed) always gives the same split, on every rank and
    every machine (Python's Mersenne Twister is platform-independent).
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    if test_fraction > 0:
        n_test = max(n_test, 1)
    if val_fraction > 0:
        n_val = max(n_val, 1)
    test = sorted(order[:n_test])
    val = sorted(order[n_test : n_test + n_val])
    train = order[n_test + n_val :]
    return train, val, test


def take(items: list[T], idx: list[int]) -> list[T]:
    return [items[i] for i in idx]
