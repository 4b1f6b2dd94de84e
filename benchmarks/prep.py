"""Data-preparation benchmark: examples/s to read, template, tokenise, mask and pack.

Both sides start from the same ``.jsonl`` of chat records and end with packed training
rows whose labels cover the assistant turns only, with the same tokenizer and template,
one process each:

- dsft: ``dsft.data.prepare`` with ``data.cache=false`` and ``data.packing=true``
  (read, normalise, render, batched Rust tokenisation with offsets, numpy masks, BFD
  packing);
- TRL: ``datasets.Dataset.from_json`` (into a fresh cache directory) and then the code
  ``SFTTrainer.__init__`` runs on a raw dataset, ``SFTTrainer._prepare_dataset`` with
  ``assistant_only_loss=True`` and ``packing=True`` (per-example ``apply_chat_template``
  with assistant masks, label building, BFD packing).

A 50-example check confirms the two produce identical token ids and labels.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


def dsft_prepare(path: Path, tokenizer: Any, max_len: int) -> dict[str, Any]:
    from dsft.config import DataConfig
    from dsft.data import prepare

    cfg = DataConfig(
        path=[str(path)],
        max_len=max_len,
        packing=True,
        cache=False,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    t = time.perf_counter()
    splits = prepare(cfg, tokenizer)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "rows": len(splits.packs or []), "examples": len(splits.train)}


def _trl_prepare(dataset: Any, tokenizer: Any, max_len: int, packing: bool, out: str) -> Any:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=out,
        max_length=max_len,
        packing=packing,
        assistant_only_loss=True,
        dataset_num_proc=None,
        report_to=[],
        bf16=False,  # SFTConfig defaults to bf16, which it refuses on a CPU; unused here
    )
    # The attributes _prepare_dataset reads from the trainer; the template already has
    # generation markers, so SFTTrainer would not swap in a training template either.
    trainer = SimpleNamespace(_tokenizer=tokenizer, completion_only_loss=False, chat_template=None)
    return SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, args, packing, None, "train")


def trl_prepare(path: Path, tokenizer: Any, max_len: int) -> dict[str, Any]:
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        raw = datasets.Dataset.from_json(str(path), cache_dir=tmp)
        packed = _trl_prepare(raw, tokenizer, max_len, True, tmp)
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "rows": len(packed), "examples": len(raw)}


def same_tokens(path: Path, tokenizer: Any, n: int = 50) -> bool:
    """True when TRL's unpacked preparation gives dsft's token ids and labels.

    Compared untruncated: both keep the first max_len tokens, but TRL drops examples left
    without a target, which would shift the comparison.
    """
    max_len = 10**9
    import datasets

    from dsft.data.formats import load_examples
    from dsft.data.tokenize import IGNORE_INDEX, encode

    examples = load_examples([str(path)], "auto", {}, "error").examples[:n]
    enc = encode(tokenizer, examples)
    with tempfile.TemporaryDirectory() as tmp:
        raw = datasets.Dataset.from_json(str(path), cache_dir=tmp).select(range(len(examples)))
        trl = _trl_prepare(raw, tokenizer, max_len, False, tmp)
        for i, row in enumerate(trl):
            a, b = int(enc.offsets[i]), int(enc.offsets[i + 1])
            ids = enc.ids[a:b][:max_len]
            labels = np.where(enc.trained[a:b], enc.ids[a:b], IGNORE_INDEX)[:max_len]
            if row["input_ids"] != ids.tolist() or row["labels"] != labels.tolist():
                return False
    return True


def run_prep(
    path: Path, tokenizer: Any, max_len: int, repeats: int, log: Any = print
) -> dict[str, Any]:
    """Alternate dsft and TRL ``repeats`` times; medians of examples/s."""
    runs: dict[str, list[dict[str, Any]]] = {"dsft": [], "trl": []}
    n = sum(1 for _ in path.open())
    for r in range(repeats):
        for name, fn in (("dsft", dsft_prepare), ("trl", trl_prepare)):
            gc.collect()
            res = fn(path, tokenizer, max_len)
            res["examples_per_s"] = n / res["seconds"]
            runs[name].append(res)
            log(
                f"prep {r + 1}/{repeats} {name}: {n} examples in {res['seconds']:.1f}s "
                f"({res['examples_per_s']:.0f}/s, {res['rows']} packed rows)"
            )
    out: dict[str, Any] = {"examples": n, "max_len": max_len, "runs": runs}
    for name in runs:
        out[name] = float(np.median([x["examples_per_s"] for x in runs[name]]))
    out["ratio"] = out["dsft"] / out["trl"]
    out["tokens_identical"] = same_tokens(path, tokenizer)
    return out
