"""Data-preparation benchmark: examples/s to read, template, tokenise, mask and pack.

Both sides start from the same ``.jsonl`` of chat records and end with packed training
rows whose labels cover the assistant turns only, with the same tokenizer and template,
one process each:

- dsft: ``dsft.data.prepare`` with ``data.cache=false`` and ``data.packing=true``
  (read, normalise, render, batched Rust tokenisation with offsets, numpy masks, BFD
  packing), once per ``--workers`` setting (``data.workers``: forked tokenising processes);
- TRL: ``datasets.Dataset.from_json`` (into a fresh cache directory) and then the code
  ``SFTTrainer.__init__`` runs on a raw dataset, ``SFTTrainer._prepare_dataset`` with
  ``assistant_only_loss=True`` and ``packing=True`` (per-example ``apply_chat_template``
  with assistant masks, label building, BFD packing).

A 50-example check confirms the two produce identical token ids and labels.

Standalone (a quiet machine gives the clean numbers)::

    python -m benchmarks.prep --examples 20000 --workers 1,2 --repeats 3
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


def dsft_prepare(path: Path, tokenizer: Any, max_len: int, workers: int = 1) -> dict[str, Any]:
    from dsft.config import DataConfig
    from dsft.data import prepare

    cfg = DataConfig(
        path=[str(path)],
        max_len=max_len,
        packing=True,
        cache=False,
        val_fraction=0.0,
        test_fraction=0.0,
        workers=workers,
    )
    c0 = _cpu()
    t = time.perf_counter()
    splits = prepare(cfg, tokenizer)
    seconds = time.perf_counter() - t
    c1 = _cpu()
    return {
        "seconds": seconds,
        "rows": len(splits.packs or []),
        "examples": len(splits.train),
        # CPU seconds of this process (the serial part: cutting ranges, merging, splits,
        # packing) and of its tokenising workers: the basis of the projection to more cores
        "cpu_parent": c1[0] - c0[0],
        "cpu_workers": c1[1] - c0[1],
    }


def _cpu() -> tuple[float, float]:
    import resource

    a, b = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return a.ru_utime + a.ru_stime, b.ru_utime + b.ru_stime


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
    path: Path,
    tokenizer: Any,
    max_len: int,
    repeats: int,
    log: Any = print,
    workers: tuple[int, ...] = (1,),
) -> dict[str, Any]:
    """Alternate dsft (once per worker count) and TRL ``repeats`` times; medians of examples/s.

    ``dsft`` is the rate with the most workers; ``dsft_w<N>`` each setting's.
    """
    names = [f"dsft_w{w}" for w in workers]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*names, "trl"]}
    n = sum(1 for _ in path.open())
    for r in range(repeats):
        for name in runs:
            gc.collect()
            if name == "trl":
                res = trl_prepare(path, tokenizer, max_len)
            else:
                res = dsft_prepare(path, tokenizer, max_len, int(name.removeprefix("dsft_w")))
            res["examples_per_s"] = n / res["seconds"]
            runs[name].append(res)
            log(
                f"prep {r + 1}/{repeats} {name}: {n} examples in {res['seconds']:.1f}s "
                f"({res['examples_per_s']:.0f}/s, {res['rows']} packed rows)"
            )
    out: dict[str, Any] = {"examples": n, "max_len": max_len, "runs": runs, "workers": workers}
    for name in runs:
        out[name] = float(np.median([x["examples_per_s"] for x in runs[name]]))
    out["dsft"] = out[names[-1]]
    out["ratio"] = out["dsft"] / out["trl"]
    out["ratios"] = {name: out[name] / out["trl"] for name in names}
    if workers[-1] > 1:
        # Amdahl from CPU seconds (wall time on a shared machine says little): the parent's
        # are serial, the workers' divide by the cores.
        runs_hi = runs[names[-1]]
        out["cpu_parent"] = float(np.median([x["cpu_parent"] for x in runs_hi]))
        out["cpu_workers"] = float(np.median([x["cpu_workers"] for x in runs_hi]))
        out["cpu_one"] = float(
            np.median([x["cpu_parent"] + x["cpu_workers"] for x in runs[names[0]]])
        )
    out["tokens_identical"] = same_tokens(path, tokenizer)
    return out


def projection(result: dict[str, Any], cores: int = 16) -> str:
    """The rate on ``cores`` cores projected from the measured CPU seconds (Amdahl)."""
    if "cpu_workers" not in result:
        return ""
    n, serial, par = result["examples"], result["cpu_parent"], result["cpu_workers"]
    rate = n / (serial + par / cores)
    return (
        f"projection for {cores} cores: {rate:,.0f} examples/s = {n} / ({serial:.1f} s serial "
        f"CPU in the parent + {par:.1f} s worker CPU / {cores}), from the data.workers="
        f"{result['workers'][-1]} runs (the same work took {result['cpu_one']:.1f} CPU s with "
        "one worker in-process: the parallel overhead). Assumes one free core per worker "
        "and storage that keeps up"
    )


def table(result: dict[str, Any]) -> str:
    lines = [
        "| data preparation (tokenise + template + mask + pack) | examples/s | / TRL |",
        "|---|---|---|",
    ]
    for w in result["workers"]:
        name = f"dsft_w{w}"
        lines.append(
            f"| dsft (data.prepare, cache off, data.workers={w}) | {result[name]:,.0f} "
            f"| {result['ratios'][name]:.2f}x |"
        )
    lines.append(
        f"| TRL (Dataset.from_json + SFTTrainer._prepare_dataset, one process) "
        f"| {result['trl']:,.0f} | 1.00x |"
    )
    lines += [
        "",
        f"{result['examples']} examples, max_len {result['max_len']}; identical token ids and "
        f"labels: {'yes' if result['tokens_identical'] else 'NO'}.",
    ]
    proj = projection(result)
    if proj:
        lines.append(proj)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.prep``: the data-preparation comparison alone."""
    import argparse
    import json
    import os

    from benchmarks.chat_data import build_tokenizer, generate_rows, write_jsonl
    from dsft.data.build import usable_cores

    p = argparse.ArgumentParser(prog="python -m benchmarks.prep", description=__doc__)
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--workers", default=f"1,{usable_cores()}", help="comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--scale", type=float, default=0.25, help="length scale of generated rows")
    p.add_argument("--out", default="runs/bench-prep")
    ns = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # one thread per process for every system: data.workers=N is N processes, TRL one
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import datasets

    datasets.disable_progress_bars()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = generate_rows(ns.examples, 7, ns.scale)
    path = write_jsonl(out / "prep.jsonl", rows)
    tok = build_tokenizer(out / "tokenizer", rows[:2000], 4096)
    del rows
    workers = tuple(sorted({int(x) for x in ns.workers.split(",")}))
    result = run_prep(path, tok, ns.max_len, ns.repeats, workers=workers)
    text = table(result)
    load = os.getloadavg()
    text += f"\nload average at the end: {load[0]:.1f} (1 min) on {usable_cores()} cores"
    (out / "prep.json").write_text(json.dumps(result, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
