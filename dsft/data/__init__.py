"""Data layer: read -> normalise to messages -> template + mask -> split -> shard -> collate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsft.config import DataConfig
from dsft.data.formats import Example, load_examples
from dsft.data.split import split_indices, take
from dsft.data.tokenize import Tokenized, tokenize_example
from dsft.errors import DataError

__all__ = ["DataError", "Example", "Splits", "Tokenized", "prepare"]


@dataclass
class Splits:
    """Tokenised splits and the raw validation/test examples (for generation)."""

    train: list[Tokenized]
    val: list[Tokenized]
    test: list[Tokenized]
    val_raw: list[Example]
    test_raw: list[Example]
    stats: dict[str, Any]


def _drop_empty(items: list[Tokenized]) -> tuple[list[Tokenized], int]:
    # An example whose response was cut away entirely has nothing to learn from;
    # it is dropped and counted, never fed as an all-masked row.
    kept = [t for t in items if t.num_target_tokens > 0]
    return kept, len(items) - len(kept)


def prepare(cfg: DataConfig, tokenizer: Any) -> Splits:
    """Load, split and tokenise the configured files (identically on every rank)."""
    examples = load_examples(cfg.path, cfg.format, cfg.columns, cfg.on_bad_row).examples
    tr_idx, va_idx, te_idx = split_indices(
        len(examples), cfg.val_fraction, cfg.test_fraction, cfg.split_seed
    )
    out: dict[str, list[Tokenized]] = {}
    dropped = truncated = 0
    for name, idx in (("train", tr_idx), ("val", va_idx), ("test", te_idx)):
        toks = [tokenize_example(tokenizer, ex, cfg.max_len) for ex in take(examples, idx)]
        truncated += sum(t.truncated for t in toks)
        out[name], d = _drop_empty(toks)
        dropped += d
    if not out["train"]:
        raise DataError(
            f"{', '.join(cfg.path)}: no training examples left after the split "
            f"({len(examples)} examples, data.max_len={cfg.max_len})"
        )
    stats = {
        "examples": len(examples),
        "train": len(out["train"]),
        "val": len(out["val"]),
        "test": len(out["test"]),
        "truncated": truncated,
        "dropped_no_target": dropped,
        "train_target_tokens": sum(t.num_target_tokens for t in out["train"]),
        "train_tokens": sum(len(t.input_ids) for t in out["train"]),
    }
    return Splits(
        out["train"], out["val"], out["test"], take(examples, va_idx), take(examples, te_idx), stats
    )
