"""Data layer: read -> normalise -> template + mask -> (cache) -> split -> pack -> shard -> collate.

``prepare`` gives every rank the same splits: index lists over memory-mapped token
stores (one per file), so a rank holds only the examples it touches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dsft.config import DataConfig
from dsft.data.cache import KINDS, TokenStore, build_store, cache_root, cached_store
from dsft.data.formats import Example, load_examples
from dsft.data.packing import efficiency, pack
from dsft.data.split import carve, reweight, split_count
from dsft.data.tokenize import ChatOptions, Tokenized, apply_template, set_chat_options
from dsft.errors import DataError

log = logging.getLogger("dsft")

__all__ = ["DataError", "Example", "Splits", "Tokenized", "load_examples", "prepare"]


class Corpus:
    """Several token stores indexed as one sequence of examples."""

    def __init__(self, stores: list[TokenStore]) -> None:
        self.stores = stores
        self.starts = np.cumsum([0] + [len(s) for s in stores])
        # Per-example facts over all stores, computed once: every split indexes into them.
        self.lengths = self._concat(lambda s: s.lengths)
        self.kinds = self._concat(lambda s: s.kinds)
        self._targets: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[TokenStore, int]:
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.stores[s], i - int(self.starts[s])

    def targets(self, max_len: int) -> np.ndarray:
        """Per example: tokens carrying loss within ``max_len`` (a pass over every token, once)."""
        if max_len not in self._targets:
            self._targets[max_len] = self._concat(lambda s: s.targets(max_len))
        return self._targets[max_len]

    def _concat(self, fn: Any) -> np.ndarray:
        parts = [fn(s) for s in self.stores]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class Split(Sequence[Tokenized]):
    """The examples of one split (index list into a corpus), truncated to ``max_len``."""

    def __init__(self, corpus: Corpus, indices: Sequence[int], max_len: int) -> None:
        self.corpus, self.indices, self.max_len = corpus, list(indices), max_len

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Tokenized:  # type: ignore[override]
        store, i = self.corpus.locate(self.indices[k])
        return store.item(i, self.max_len)

    def example(self, k: int) -> Example:
        store, i = self.corpus.locate(self.indices[k])
        return store.examples[i]

    def lengths(self) -> np.ndarray:
        full = self.corpus.lengths
        return np.minimum(full[self.indices], self.max_len) if self.indices else full[:0]


class Examples(Sequence[Example]):
    """The raw examples of a split that have a reference answer (for generation)."""

    def __init__(self, split: Split) -> None:
        kinds = split.corpus.kinds
        self.split = split
        self.keep = [k for k, i in enumerate(split.indices) if KINDS[kinds[i]] != "text"]

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, k: int) -> Example:  # type: ignore[override]
        return self.split.example(self.keep[k])


@dataclass
class Splits:
    """Tokenised splits, the raw val/test examples (for generation) and statistics."""

    train: Split
    val: Split
    test: Split
    val_raw: Examples
    test_raw: Examples
    stats: dict[str, Any]
    # With data.packing: rows of training examples (indices into ``train``).
    packs: list[list[int]] | None = field(default=None)


def _settings(cfg: DataConfig) -> dict[str, Any]:
    """Every data setting that changes the tokens (it keys the tokenisation cache)."""
    return {
        "format": cfg.format,
        "columns": dict(sorted(cfg.columns.items())),
        "loss_on": cfg.loss_on,
        "on_bad_row": cfg.on_bad_row,
        # how chat rows are rendered and masked (dsft.data.tokenize.ChatOptions)
        "turn_end": list(cfg.turn_end),
        "fold_system": cfg.fold_system,
        "reasoning": cfg.reasoning,
        "template_kwargs": dict(sorted(cfg.template_kwargs.items())),
        "template_date": cfg.template_date,
    }


def _stores(paths: list[str], cfg: DataConfig, tokenizer: Any, builder: bool) -> Corpus:
    settings = _settings(cfg)
    if not cfg.cache:
        return Corpus([build_store(p, tokenizer, settings) for p in paths])
    root = cache_root(cfg.cache_dir)
    return Corpus([cached_store(p, tokenizer, settings, root, builder) for p in paths])


def prepare(cfg: DataConfig, tokenizer: Any, builder: bool = True) -> Splits:
    """Load (or read from the cache), split, filter and pack the configured data.

    Identical on every rank. ``builder``: this rank may tokenise into the cache (each
    node's local rank 0); the others wait for the cache entry.
    """
    apply_template(tokenizer, cfg.template)
    set_chat_options(tokenizer, ChatOptions.from_settings(_settings(cfg)))
    pool = _stores(cfg.path, cfg, tokenizer, builder)
    n = len(pool)
    n_test = 0 if cfg.test_path else split_count(n, cfg.test_fraction, cfg.test_size)
    n_val = 0 if (cfg.val_path or cfg.kfold) else split_count(n, cfg.val_fraction, cfg.val_size)
    tr, va, te = carve(n, n_val, n_test, cfg.split_seed, cfg.kfold, max(cfg.fold, 0))
    if cfg.weights:
        groups = (np.searchsorted(pool.starts, tr, side="right") - 1).tolist()
        tr = reweight(tr, groups, cfg.weights, cfg.split_seed)

    stats: dict[str, Any] = {"examples": n, "skipped_rows": 0}
    val_corpus = _stores(cfg.val_path, cfg, tokenizer, builder) if cfg.val_path else pool
    test_corpus = _stores(cfg.test_path, cfg, tokenizer, builder) if cfg.test_path else pool
    if cfg.val_path:
        va = list(range(len(val_corpus)))
    if cfg.test_path:
        te = list(range(len(test_corpus)))
    skipped = [
        r
        for c in {id(x): x for x in (pool, val_corpus, test_corpus)}.values()
        for s in c.stores
        for r in s.skipped
    ]
    stats["skipped_rows"] = len(skipped)
    if skipped:
        stats["skipped_first"] = skipped[:5]
        log.warning(
            "data: skipped %d bad rows (data.on_bad_row=skip), e.g.\n  %s",
            len(skipped),
            "\n  ".join(skipped[:5]),
        )

    splits: dict[str, Split] = {}
    for name, corpus, idx in (
        ("train", pool, tr),
        ("val", val_corpus, va),
        ("test", test_corpus, te),
    ):
        idx = np.asarray(idx, dtype=np.int64)
        too_long = corpus.lengths[idx] > cfg.max_len
        no_target = corpus.targets(cfg.max_len)[idx] == 0
        # An example whose response was cut away has nothing to learn from: it is
        # dropped and counted, never fed as an all-masked row.
        drop = no_target | (too_long if cfg.truncation == "drop" else False)
        stats[f"{name}_dropped_too_long"] = (
            int((too_long & ~no_target).sum()) if cfg.truncation == "drop" else 0
        )
        stats[f"{name}_dropped_no_target"] = int(no_target.sum())
        stats[f"{name}_truncated"] = int((too_long & ~drop).sum())
        splits[name] = Split(corpus, idx[~drop].tolist(), cfg.max_len)
        stats[name] = len(splits[name])
    if not len(splits["train"]):
        raise DataError(
            f"{', '.join(cfg.path)}: no training examples left after the split "
            f"({n} examples, data.max_len={cfg.max_len})"
        )
    train_len = splits["train"].lengths()
    train_targets = pool.targets(cfg.max_len)[splits["train"].indices]
    stats["truncated"] = sum(stats[f"{s}_truncated"] for s in ("train", "val", "test"))
    stats["dropped_too_long"] = sum(
        stats[f"{s}_dropped_too_long"] for s in ("train", "val", "test")
    )
    stats["dropped_no_target"] = sum(
        stats[f"{s}_dropped_no_target"] for s in ("train", "val", "test")
    )
    stats["train_tokens"] = int(train_len.sum())
    stats["train_target_tokens"] = int(train_targets.sum())
    stats["trained_fraction"] = round(
        stats["train_target_tokens"] / max(stats["train_tokens"], 1), 4
    )
    stats["train_length_percentiles"] = {
        f"p{q}": int(np.percentile(train_len, q)) for q in (50, 90, 99)
    } | {"max": int(train_len.max())}
    packs = None
    if cfg.packing:
        packs = pack(train_len.tolist(), cfg.max_len)
        stats["packed_rows"] = len(packs)
        stats["packing_efficiency"] = round(efficiency(train_len.tolist(), packs, cfg.max_len), 4)
    return Splits(
        splits["train"],
        splits["val"],
        splits["test"],
        Examples(splits["val"]),
        Examples(splits["test"]),
        stats,
        packs,
    )
