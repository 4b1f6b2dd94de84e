"""Data at scale: chunked, parallel and multi-node tokenisation give the same cache bytes."""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from dsft.data import cache
from dsft.data.cache import BuildOptions, cached_store, entry_key, tokenizer_digest
from dsft.data.readers import line_ranges, read_range
from dsft.errors import DataError
from dsft.synthetic import build_tokenizer, generate_tasks, write_tasks

SETTINGS = {"format": "auto", "columns": {}, "loss_on": "assistant", "on_bad_row": "skip"}
FILES = ("ids.npy", "trained.npy", "offsets.npy", "kinds.npy", "examples.jsonl",
         "example_offsets.npy", "meta.json")  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _data(path: Path, n: int = 400, bad: bool = True) -> Path:
    write_tasks(path, generate_tasks(n=n, seed=3))
    if bad:  # bad rows in the middle: skipped, and reported in file order
        lines = path.read_text().splitlines(keepends=True)
        lines[57] = "{oops\n"
        lines[301] = '{"messages": []}\n'
        path.write_text("".join(lines))
    return path


def _entry_bytes(root: Path) -> dict[str, bytes]:
    (entry,) = [p for p in root.iterdir() if p.is_dir()]
    return {f: (entry / f).read_bytes() for f in FILES}


def _build(path: Path, root: Path, tok, **opts) -> dict[str, bytes]:
    cached_store(str(path), tok, SETTINGS, root, True, BuildOptions(**opts))
    return _entry_bytes(root)


def test_line_ranges_cover_the_file_at_line_boundaries(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "x" * (i % 37)}) + "\n" for i in range(500)]
    f.write_text("".join(lines) + '{"text": "no newline at the end"}')
    for size in (1, 100, 1000, 10**6):
        ranges = line_ranges(str(f), size)
        assert ranges[0][0] == 0 and ranges[-1][1] == f.stat().st_size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        rows = [r for a, b, line in ranges for r in read_range(str(f), a, b, line)]
        assert [r.where for r in rows] == [f"{f}:{i}" for i in range(1, 502)]
        assert rows[-1].record == {"text": "no newline at the end"}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_one_and_two_workers_write_identical_bytes(tmp_path: Path, tok, suffix: str) -> None:
    """Byte ranges (jsonl) and row runs (csv), several chunks, bad rows skipped."""
    src = _data(tmp_path / "d.jsonl")
    if suffix == ".csv":
        import csv

        rows = generate_tasks(n=400, seed=3)
        rows[57]["output"] = rows[301]["output"] = " "  # no response: skipped
        src = tmp_path / "d.csv"
        with src.open("w", newline="") as fh:
            w = csv.DictWriter(fh, ["instruction", "input", "output"])
            w.writeheader()
            w.writerows(rows)
    whole = _build(src, tmp_path / "one", tok, workers=1, chunk_bytes=1 << 30, chunk_rows=10**6)
    small = {"chunk_bytes": 2000, "chunk_rows": 37}
    assert _build(src, tmp_path / "w1", tok, workers=1, **small) == whole
    assert _build(src, tmp_path / "w2", tok, workers=2, **small) == whole
    meta = json.loads(whole["meta.json"])
    assert len(meta["skipped"]) == 2
    store = cache._read_entry(next(p for p in (tmp_path / "w2").iterdir() if p.is_dir()))
    assert len(store) == 398
    assert store.examples[100].source.startswith(str(src))
    assert not list((tmp_path / "w2").glob("*.parts"))  # merged and cleaned up


def test_first_bad_row_in_file_order_with_workers(tmp_path: Path, tok) -> None:
    src = _data(tmp_path / "d.jsonl")
    strict = {**SETTINGS, "on_bad_row": "error"}
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"d\.jsonl:58: not valid JSON"):
            cached_store(str(src), tok, strict, tmp_path / f"c{workers}", True,
                         BuildOptions(workers=workers, chunk_bytes=1500))  # fmt: skip


def _node(path: str, root: str, node: int, q, start) -> None:
    os.environ["NODE_RANK"] = str(node)  # two "nodes": separate processes, one shared cache
    os.environ["DSFT_FAULT_SLOW_CHUNK"] = "0.1"
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("dsft").addHandler(Keep())
    logging.getLogger("dsft").setLevel(logging.INFO)
    tok = build_tokenizer()
    start.wait()  # both "nodes" ready: neither can finish before the other begins
    store = cached_store(path, tok, SETTINGS, Path(root), True,
                         BuildOptions(workers=1, chunk_bytes=1500))  # fmt: skip
    built = [m for m in messages if "chunks here" in m]
    q.put((node, len(store), built[0].split(" chunks here")[0].rsplit(" ", 1)[1] if built else "0"))


@pytest.mark.distributed
def test_two_nodes_share_the_work_and_the_bytes(tmp_path: Path, tok) -> None:
    src = _data(tmp_path / "d.jsonl")
    whole = _build(src, tmp_path / "one", tok, workers=1, chunk_bytes=1 << 30)
    ctx = mp.get_context("spawn")
    q, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_node, args=(str(src), str(tmp_path / "shared"), n, q, start))
             for n in (0, 1)]  # fmt: skip
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [r[1] for r in results] == [398, 398]
    chunks = [int(r[2]) for r in results]
    n_chunks = len(line_ranges(str(src), 1500))
    assert sum(chunks) == n_chunks and min(chunks) > 0  # each node tokenised a share
    assert _entry_bytes(tmp_path / "shared") == whole


def test_builder_waits_for_a_claim_then_takes_over_a_dead_one(tmp_path: Path, tok) -> None:
    """A chunk claimed by a process that died on this host is rebuilt, not waited for."""
    src = _data(tmp_path / "d.jsonl", bad=False)
    whole = _build(src, tmp_path / "one", tok, workers=1, chunk_bytes=1 << 30)
    root = tmp_path / "c"
    key = entry_key(str(src), tokenizer_digest(tok), SETTINGS)
    parts = root / f"{key}.parts"
    parts.mkdir(parents=True)
    dead = mp.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    (parts / "000001.claim").write_text(f"{os.uname().nodename}:{dead.pid}")
    assert _build(src, root, tok, workers=1, chunk_bytes=1500) == whole


def test_wait_timeout_names_the_holder(tmp_path: Path, tok) -> None:
    src = _data(tmp_path / "d.jsonl", bad=False)
    root = tmp_path / "c"
    key = entry_key(str(src), tokenizer_digest(tok), SETTINGS)
    (root / f"{key}.parts").mkdir(parents=True)
    (root / f"{key}.parts" / "000000.claim").write_text("othernode:123")
    with pytest.raises(DataError, match=r"waited .*othernode:123.*data.wait_timeout"):
        cached_store(str(src), tok, SETTINGS, root, False, BuildOptions(wait_timeout=0.5))
    assert not (root / f"{key}.error").exists()  # a timeout is not the entry's error


def test_targets_by_blocks_equal_the_whole_array(tmp_path: Path, tok) -> None:
    src = _data(tmp_path / "d.jsonl", bad=False)
    store = cached_store(str(src), tok, SETTINGS, tmp_path / "c", True)
    assert isinstance(store.trained, np.memmap)
    cs = np.concatenate([[0], np.cumsum(np.asarray(store.trained), dtype=np.int64)])
    start = store.offsets[:-1]
    for max_len in (8, 48, 10**6):
        end = np.minimum(store.offsets[1:], start + max_len)
        expected = np.maximum(cs[end] - cs[np.minimum(start + 1, end)], 0)
        assert np.array_equal(store.targets(max_len, block=7), expected)


@pytest.mark.parametrize("n", [0, 1, 2, 257, 5000])
def test_lean_shuffle_equals_random_shuffle(n: int) -> None:
    """The splits of earlier versions are kept: same permutation as Random.shuffle."""
    import random

    from dsft.data.split import shuffled

    order = list(range(n))
    random.Random(11).shuffle(order)
    assert shuffled(n, 11).tolist() == order


def _mixer(sizes=(40, 400), mix=(0.7, 0.3), seed=5):
    from dsft.data.sampler import Mixer

    return Mixer(np.repeat(np.arange(len(sizes)), sizes), list(mix), seed)


def test_mix_proportions_hold_over_every_stretch_of_the_run() -> None:
    m = _mixer()
    for lo, hi in ((0, 1000), (1000, 1100), (0, 100_000), (123_457, 123_557)):
        counts = m.counts(lo, hi, block=333)
        assert counts.sum() == hi - lo
        assert abs(counts[0] - 0.7 * (hi - lo)) <= 3, (lo, hi, counts)
    assert m.counts(0, 10).tolist() == np.bincount(m.sources(0, 10), minlength=2).tolist()
    with pytest.raises(ValueError, match="no training examples"):
        _mixer(sizes=(40, 0))
    assert _mixer(sizes=(40, 0), mix=(1.0, 0.0)).counts(0, 50).tolist() == [50, 0]


def test_mix_small_source_cycles_through_fresh_orders() -> None:
    m = _mixer()
    units = m.units(0, 2000)
    small = units[units < 40]
    passes = [small[i : i + 40] for i in range(0, len(small) - 39, 40)]
    assert len(passes) >= 30 and all(sorted(p) == list(range(40)) for p in passes)
    assert passes[0].tolist() != passes[1].tolist()  # a new order each pass
    assert np.array_equal(m.units(700, 900), units[700:900])  # any stretch, same slots
    big = units[units >= 40]
    assert len(big) == 600 and sorted(big[:400].tolist()) == list(range(40, 440))  # one pass


@pytest.mark.parametrize("world", [1, 2, 3])
def test_mixed_batches_shard_lockstep_and_resume(world: int) -> None:
    from dsft.data.sampler import mixed_batches, train_batches

    m = _mixer()
    n, mb, accum = 440, 4, 2
    for epoch in (0, 3):
        per_rank = [mixed_batches(m, n, mb, world, r, epoch, 9, True, accum) for r in range(world)]
        plain = train_batches(n, mb, world, 0, epoch, 9, True, accum)
        assert all(len(b) == len(plain) for b in per_rank)  # same steps per epoch: lockstep
        assert all(len(x) == mb for b in per_rank for x in b)
        # a round's micro-batches are that round's slots, whichever rank takes them
        rounds = len(plain)
        lo = epoch * rounds * mb * world
        slots = m.units(lo, lo + rounds * mb * world).reshape(rounds, -1)
        for r in range(rounds):
            got = sorted(u for b in per_rank for u in b[r])
            assert got == sorted(slots[r].tolist())
        # resuming: the same epoch computed afresh (another process) is the same
        again = _mixer()
        assert mixed_batches(again, n, mb, world, 0, epoch, 9, True, accum) == per_rank[0]


@pytest.mark.parametrize("mix", [[], [0.5, 0.5]])
def test_packing_with_and_without_mix(tmp_path: Path, tok, mix: list[float]) -> None:
    """Packed rows never mix files under data.mix; each row knows its file."""
    from dsft.config import DataConfig
    from dsft.data import prepare

    a, b = _data(tmp_path / "a.jsonl", 120, bad=False), _data(tmp_path / "b.jsonl", 80, bad=False)
    cfg = DataConfig(path=[str(a), str(b)], packing=True, max_len=96, mix=mix,
                     cache_dir=str(tmp_path / "c"), val_fraction=0.0, test_fraction=0.0)  # fmt: skip
    s = prepare(cfg, tok)
    assert sorted(i for row in s.packs for i in row) == list(range(len(s.train)))
    if mix:
        files = np.searchsorted(s.train.corpus.starts, s.train.indices, side="right") - 1
        assert all(len({files[i] for i in row}) == 1 for row in s.packs)
        assert s.unit_source.tolist() == [files[row[0]] for row in s.packs]
        assert s.stats["train_per_source"] == {"a": int((s.unit_source == 0).sum()),
                                               "b": int((s.unit_source == 1).sum())}  # fmt: skip


def _build_with_stop_handlers(path: str, root: str, q) -> None:
    """A forked-worker build in a process that installed the training recipe's stop
    handlers first (as `dsft train` does before data preparation)."""
    from dsft import distributed

    distributed.catch_stop_signals()
    tok = build_tokenizer()
    for i in range(6):  # repeated: the hang was a race between the pool's end and its workers
        cached_store(path, tok, SETTINGS, Path(root) / str(i), True,
                     BuildOptions(workers=2, chunk_bytes=1500))  # fmt: skip
    q.put(sorted(p.pid for p in mp.active_children()))


@pytest.mark.distributed
def test_worker_pool_finishes_with_stop_handlers_installed(tmp_path: Path) -> None:
    """Workers inherit SIGTERM/SIGUSR1 handlers that only record a stop: the pool must
    still end (workers reset the signals; a finished pool closes, never terminates)."""
    src = _data(tmp_path / "d.jsonl", n=400, bad=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_build_with_stop_handlers, args=(str(src), str(tmp_path / "c"), q))
    p.start()
    p.join(timeout=120)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive, "the forked-worker build hung"
    assert p.exitcode == 0
    assert q.get(timeout=5) == []  # no worker left behind


def _stop_during_prep(path: str, root: str) -> None:
    from dsft import distributed

    distributed.catch_stop_signals()
    os.environ["DSFT_FAULT_SLOW_CHUNK"] = "0.5"  # a slow build: the signal lands during it
    cached_store(path, build_tokenizer(), SETTINGS, Path(root), True,
                 BuildOptions(workers=2, chunk_bytes=500))  # fmt: skip


@pytest.mark.distributed
def test_sigterm_during_data_preparation_stops_promptly(tmp_path: Path) -> None:
    import signal
    import time

    src = _data(tmp_path / "d.jsonl", n=400, bad=False)
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_stop_during_prep, args=(str(src), str(tmp_path / "c")))
    p.start()
    time.sleep(6)  # started, tokenising (300 rows in ~100 chunks of 0.5 s each, 2 workers)
    assert p.is_alive()
    t0 = time.time()
    os.kill(p.pid, signal.SIGTERM)
    p.join(timeout=30)
    stopped = not p.is_alive()
    if not stopped:
        p.kill()
    assert stopped and time.time() - t0 < 15, "data preparation ignored the stop request"
    assert p.exitcode != 0
