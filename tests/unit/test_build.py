"""Building token-cache entries (dsft/data/build.py): chunked, parallel and multi-node
tokenisation give the same cache bytes; one rank builds, the others wait (and take over a
dead builder); a stop request or a finished pool ends the workers. Reading: test_cache.py."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from dsft.data import cache
from dsft.data.build import BuildOptions, cached_store
from dsft.data.cache import entry_key, tokenizer_digest
from dsft.data.readers import line_ranges
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


def test_cached_error_names_the_file_given_not_its_twin(tmp_path: Path, tok) -> None:
    """The cache keys a file by its contents: a byte-identical copy of a bad file at another
    path finds the first one's recorded error, which must name the copy."""
    strict = {**SETTINGS, "on_bad_row": "error"}
    first = _data(tmp_path / "first.jsonl")
    twin = tmp_path / "other" / "twin.jsonl"
    twin.parent.mkdir()
    twin.write_bytes(first.read_bytes())
    for path in (first, twin, first):
        with pytest.raises(DataError) as e:
            cached_store(str(path), tok, strict, tmp_path / "c", True)
        assert f"{path}:58: not valid JSON" in str(e.value)
        assert str(first if path == twin else twin) not in str(e.value)


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


@pytest.mark.distributed
@pytest.mark.parametrize("bad", [False, True])
def test_one_rank_builds_the_others_wait(tmp_path: Path, bad: bool) -> None:
    f = _write(tmp_path / "d.jsonl", 300)
    if bad:
        f.write_text(f.read_text() + "{oops\n")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    # rank 0 builds; ranks 1 and 2 (other local ranks) only wait for the entry
    procs = [
        ctx.Process(target=_cache_worker, args=(str(f), str(tmp_path / "c"), r == 0, q))
        for r in range(3)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    if bad:  # the builder's error reaches every rank, none hangs
        assert all(r[0] == "error" and "d.jsonl:301" in r[1] for r in results)
    else:
        assert all(r[0] == "ok" for r in results)
        assert results[0][1:] == results[1][1:] == results[2][1:]
        entries = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
        assert len(entries) == 1 and not list((tmp_path / "c").glob("*.lock"))


def _write(path: Path, n: int, start: int = 0) -> Path:
    path.write_text(
        "".join(
            json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n"
            for i in range(start, start + n)
        )
    )
    return path


STRICT_SETTINGS = {"format": "auto", "columns": {}, "loss_on": "assistant", "on_bad_row": "error"}


def _cache_worker(path: str, root: str, builder: bool, q) -> None:
    tok = build_tokenizer()
    try:
        store = cached_store(path, tok, STRICT_SETTINGS, Path(root), builder)
        q.put(("ok", np.asarray(store.ids).tolist(), store.offsets.tolist()))
    except DataError as e:
        q.put(("error", str(e), None))


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
