"""``prepare``: the data pipeline's driver, read -> normalise -> template + mask -> (cache)
-> split -> pack, and what it hands the loop (``Splits`` of ``Split`` index lists over a
``Corpus`` of token stores, ``Examples`` for generation).

``prepare`` gives every rank the same splits: index lists over memory-mapped token
stores (one per file), so a rank holds only the examples it touches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dsft.config import DataConfig
from dsft.data.build import BuildOptions, cached_store, fresh_store, usable_cores
from dsft.data.cache import KINDS, TokenStore, cache_root
from dsft.data.formats import Example
from dsft.data.packing import efficiency, pack
from dsft.data.readers import set_max_row_bytes
from dsft.data.split import carve_arrays, reweight, split_count
from dsft.data.template import ChatOptions, apply_template, set_chat_options
from dsft.data.tokenize import Tokenized, char_cap
from dsft.errors import ConfigError, DataError

log = logging.getLogger("dsft")


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

    def release(self) -> None:
        """Drop the per-example target counts (prepare's statistics need them, training not)."""
        self._targets.clear()

    def _concat(self, fn: Any) -> np.ndarray:
        parts = [fn(s) for s in self.stores]
        if len(parts) == 1:
            return parts[0]  # no copy: per-example arrays are what grows with the data
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


class Split(Sequence[Tokenized]):
    """The examples of one split (index list into a corpus), truncated to ``max_len``."""

    def __init__(self, corpus: Corpus, indices: Sequence[int] | np.ndarray, max_len: int) -> None:
        # an integer array: 4-8 bytes per example (a list of ints costs ~36)
        self.corpus, self.max_len = corpus, max_len
        idx = np.asarray(indices).reshape(-1)
        self.indices = idx if idx.dtype.kind in "iu" else idx.astype(np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Tokenized:  # type: ignore[override]
        store, i = self.corpus.locate(int(self.indices[k]))
        return store.item(i, self.max_len)

    def example(self, k: int) -> Example:
        store, i = self.corpus.locate(int(self.indices[k]))
        return store.examples[i]

    def lengths(self) -> np.ndarray:
        full = self.corpus.lengths
        return np.minimum(full[self.indices], self.max_len)


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
    # The name of each data.path file, and per unit the sampler deals out (training
    # example, or packed row) the index of the file it comes from (data.mix).
    sources: list[str] = field(default_factory=list)
    unit_source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _settings(cfg: DataConfig) -> dict[str, Any]:
    """Every data setting that changes the tokens (it keys the tokenisation cache)."""
    return {
        "format": cfg.format,
        "columns": dict(sorted(cfg.columns.items())),
        "loss_on": cfg.loss_on,
        "multi_turn": cfg.multi_turn,
        "on_bad_row": cfg.on_bad_row,
        "max_image_pixels": cfg.max_image_pixels,
        # how chat rows are rendered and masked (dsft.data.template.ChatOptions)
        "turn_end": list(cfg.turn_end),
        "fold_system": cfg.fold_system,
        "reasoning": cfg.reasoning,
        "template_kwargs": dict(sorted(cfg.template_kwargs.items())),
        "template_date": cfg.template_date,
        "max_line_mb": cfg.max_line_mb,  # longer lines are bad rows
    }


def _stores(paths: list[str], cfg: DataConfig, tokenizer: Any, builder: bool) -> Corpus:
    # only what data.max_len can use is tokenised: a huge line cannot exhaust memory
    settings = {**_settings(cfg), "char_cap": char_cap(tokenizer, cfg.max_len)}
    set_max_row_bytes(int(cfg.max_line_mb * 2**20))
    opts = build_options(cfg)
    if not cfg.cache:
        return Corpus([fresh_store(p, tokenizer, settings, opts) for p in paths])
    root = cache_root(cfg.cache_dir)
    return Corpus([cached_store(p, tokenizer, settings, root, builder, opts) for p in paths])


def build_options(cfg: DataConfig) -> BuildOptions:
    """``data.workers`` (0 = the usable cores) and the wait timeout, for building stores.

    Without the cache every rank of the node tokenises for itself, so the auto worker
    count is split between the node's ranks.
    """
    workers = cfg.workers
    if not workers:
        ranks = 1 if cfg.cache else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = max(1, usable_cores() // ranks)
    return BuildOptions(workers=workers, wait_timeout=cfg.wait_timeout)


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
    tr, va, te = carve_arrays(n, n_val, n_test, cfg.split_seed, cfg.kfold, max(cfg.fold, 0))
    if cfg.weights:
        groups = np.searchsorted(pool.starts, tr, side="right") - 1
        tr = reweight(tr, groups, cfg.weights, cfg.split_seed)

    stats: dict[str, Any] = {"examples": n, "skipped_rows": 0}
    val_corpus = _stores(cfg.val_path, cfg, tokenizer, builder) if cfg.val_path else pool
    test_corpus = _stores(cfg.test_path, cfg, tokenizer, builder) if cfg.test_path else pool
    if cfg.val_path:
        va = np.arange(len(val_corpus))
    if cfg.test_path:
        te = np.arange(len(test_corpus))
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
    # Per corpus, once: 1 byte per example (the per-example arrays are what grows with
    # the data, so no int64 temporaries indexed by split).
    flags: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for c in (pool, val_corpus, test_corpus):
        if id(c) not in flags:
            flags[id(c)] = (c.lengths > cfg.max_len, c.targets(cfg.max_len) == 0)
    for name, corpus, idx in (
        ("train", pool, tr),
        ("val", val_corpus, va),
        ("test", test_corpus, te),
    ):
        idx = np.asarray(idx)
        idx = idx if idx.dtype.kind in "iu" else idx.astype(np.int64)
        too_long, no_target = (f[idx] for f in flags[id(corpus)])
        # An example whose response was cut away has nothing to learn from: it is
        # dropped and counted, never fed as an all-masked row.
        drop = no_target | (too_long if cfg.truncation == "drop" else False)
        stats[f"{name}_dropped_too_long"] = (
            int((too_long & ~no_target).sum()) if cfg.truncation == "drop" else 0
        )
        stats[f"{name}_dropped_no_target"] = int(no_target.sum())
        stats[f"{name}_truncated"] = int((too_long & ~drop).sum())
        splits[name] = Split(corpus, idx[~drop] if drop.any() else idx, cfg.max_len)
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
    cuts = np.percentile(train_len, (50, 90, 99))  # one sorted copy, not three
    stats["train_length_percentiles"] = {
        f"p{q}": int(c) for q, c in zip((50, 90, 99), cuts, strict=True)
    } | {"max": int(train_len.max())}
    # the file of each training example: only data.mix needs it
    train_source = (
        np.searchsorted(pool.starts, splits["train"].indices, side="right") - 1
        if cfg.mix
        else np.zeros(0, np.int64)
    )
    unit_source = train_source
    packs = None
    image_rows = sum(getattr(st, "image_rows", 0) for st in pool.stores)
    if cfg.packing and image_rows and getattr(tokenizer, "dsft_mrope", False):
        raise ConfigError(
            [
                f"data.packing: {image_rows} rows have images and the model places tokens by "
                "multimodal RoPE (Qwen-VL, Qwen3.5: 3-D positions from each image's grid), "
                "which packed rows' restarting position ids cannot carry; set "
                "data.packing=false (text-only rows pack)"
            ]
        )
    if cfg.packing:
        if cfg.mix:  # rows never mix files, so each row has one source to draw it from
            packs = []
            for s in range(len(pool.stores)):
                at = np.flatnonzero(train_source == s)
                packs += [at[row].tolist() for row in pack(train_len[at].tolist(), cfg.max_len)]
            unit_source = train_source[[row[0] for row in packs]]
        else:
            packs = pack(train_len.tolist(), cfg.max_len)
        stats["packed_rows"] = len(packs)
        stats["packing_efficiency"] = round(efficiency(train_len.tolist(), packs, cfg.max_len), 4)
    names = [s.name for s in pool.stores]
    sources = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
    if cfg.mix:
        per_source = np.bincount(unit_source, minlength=len(sources))
        stats["train_per_source"] = dict(zip(sources, per_source.tolist(), strict=True))
        empty = [sources[i] for i, w in enumerate(cfg.mix) if w > 0 and per_source[i] == 0]
        if empty:
            raise DataError(
                f"data.mix: {', '.join(empty)} has no training examples left after the split; "
                "give it a proportion of 0 or more examples"
            )
    for c in (pool, val_corpus, test_corpus):
        c.release()
    return Splits(
        splits["train"],
        splits["val"],
        splits["test"],
        Examples(splits["val"]),
        Examples(splits["test"]),
        stats,
        packs,
        sources,
        unit_source,
    )
