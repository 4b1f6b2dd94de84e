"""Peak memory of preparing the data, against the number of rows.

For each row count a JSON-lines file of generated instruction records is written (in
this process), then a fresh Python process runs ``dsft.data.prepare`` on it into an
empty cache directory (``data.cache=true``, the training path) and reports its peak
resident set (``ru_maxrss``: anonymous memory plus mapped file pages) before and after
preparing, and the largest peak among its tokenising workers. Bounded memory means the
peak does not grow with the file; what does grow is the per-example index arrays
(offsets, lengths, kinds, split indices: ~40 bytes per example).

    python -m benchmarks.prep_memory --rows 200000,2000000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from dsft.config import DataConfig
from dsft.data import prepare
from dsft.synthetic import build_tokenizer

path, cache, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = build_tokenizer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
cfg = DataConfig(path=[path], cache_dir=cache, workers=workers, max_len=512,
                 val_fraction=0.001, test_fraction=0.001)
splits = prepare(cfg, tok)
seconds = time.perf_counter() - t
print(json.dumps({
    "rss_before_mb": before / 1024,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "examples": splits.stats["examples"],
    "train": len(splits.train),
    "tokens": int(sum(len(s.ids) for s in splits.train.corpus.stores)),
    "seconds": seconds,
}))
"""


def write_rows(path: Path, n: int) -> None:
    """``n`` generated instruction records, written in batches (never all in memory)."""
    from dsft.synthetic import generate_tasks

    with path.open("w", encoding="utf-8") as f:
        for start in range(0, n, 100_000):
            rows = generate_tasks(min(100_000, n - start), seed=start)
            f.write("".join(json.dumps(r) + "\n" for r in rows))


def measure(n: int, workers: int, work: Path) -> dict:
    path = work / f"rows_{n}.jsonl"
    if not path.is_file():
        write_rows(path, n)
    with tempfile.TemporaryDirectory(dir=work) as cache:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), cache, str(workers)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rows": n, "file_mb": path.stat().st_size / 2**20, "workers": workers, **res}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prep_memory", description=__doc__)
    p.add_argument("--rows", default="200000,2000000", help="comma-separated row counts")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/bench-prep-memory")
    ns = p.parse_args(argv)
    work = Path(ns.out)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(x) for x in ns.rows.split(",")):
        t = time.time()
        r = measure(n, ns.workers, work)
        results.append(r)
        print(
            f"{n:>9,} rows ({r['file_mb']:.0f} MB, {r['tokens']:,} tokens): peak RSS "
            f"{r['peak_rss_mb']:.0f} MB (after imports {r['rss_before_mb']:.0f} MB), workers "
            f"{r['worker_peak_rss_mb']:.0f} MB; {r['seconds']:.0f}s to prepare "
            f"({time.time() - t:.0f}s with writing the file)",
            flush=True,
        )
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(
            f"peak RSS {b['rows']:,} / {a['rows']:,} rows: "
            f"{b['peak_rss_mb'] / a['peak_rss_mb']:.3f}x (target <= 1.2x); workers "
            f"{b['worker_peak_rss_mb'] / max(a['worker_peak_rss_mb'], 1):.3f}x"
        )
    (work / "prep_memory.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
