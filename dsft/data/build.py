"""Building token-cache entries (dsft/data/cache.py): chunked, forked, shared by nodes.

Building streams: a file is cut into chunks (byte ranges of a JSON-lines file, found
by one newline-counting pass; runs of ``chunk_rows`` rows for other types), each chunk
is read, normalised, tokenised and written as a *part* by one of ``data.workers``
forked processes, and the parts are concatenated into the entry's flat arrays with
plain file writes. Memory stays bounded by the chunk size and the number in flight,
whatever the file's size, and the entry is the same bytes for any number of workers
or nodes (parts are per chunk, and concatenated in chunk order).

Several builders share the work through the file system only: each node's local
rank 0 claims chunks one at a time (``O_CREAT | O_EXCL`` on ``<key>.parts/NNNNNN.claim``)
and skips those already done or claimed, so nodes that share the cache directory
each tokenise a share of the file, and nodes that do not share it each build all
of it, with no configuration. The builder that finds every part present takes the
entry lock, merges and renames the entry into place (atomic); the other ranks poll
for it. No collective is involved, so a long tokenisation cannot hit a NCCL/gloo
timeout. A builder that fails leaves an ``.error`` file whose message the others
raise; a claim or lock whose process is gone (same host) is taken over (dsft.locks); a wait past
``data.wait_timeout`` ends with a message naming what is awaited and who holds it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsft import distributed, faults, locks
from dsft.data.cache import (
    IMAGES,
    KINDS,
    TokenStore,
    _read_entry,
    _read_error,
    _store_name,
    _write_error,
    entry_key,
    image_lines,
    images_changed,
    tokenizer_digest,
)
from dsft.data.formats import Example, check_not_empty, examples_of, expand_turns, normaliser
from dsft.data.readers import line_ranges, read_range, read_rows, splittable
from dsft.data.template import ChatOptions
from dsft.data.tokenize import encode
from dsft.errors import DataError, Preempted

log = logging.getLogger("dsft")


@dataclass
class BuildOptions:
    """How an entry is built (none of it changes the entry's bytes)."""

    workers: int = 1  # tokenising processes (1 = in this process)
    chunk_bytes: int = 1 << 20  # a JSON-lines chunk: a byte range of about this size
    chunk_rows: int = 2000  # other file types: rows per chunk
    wait_timeout: float = 0.0  # seconds to wait for another builder; 0 = for ever


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as set by Slurm or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------ chunks and parts
# What a tokenising worker needs, set in the builder before it forks the workers (so it
# is inherited, not pickled) and read by _encode_chunk in this process or a worker.
_JOB: dict[str, Any] = {}


def _tasks(path: str, record_keys: Any, opts: BuildOptions) -> Iterator[tuple[int, tuple]]:
    """The file's chunks as ``(k, task)``, the same on every node for the same file."""
    if splittable(path):
        for k, (a, b, line) in enumerate(line_ranges(path, opts.chunk_bytes)):
            yield k, ("range", path, a, b, line)
        return
    rows: list[Any] = []
    k = 0
    for row in read_rows(path, record_keys):
        rows.append(row)
        if len(rows) == opts.chunk_rows:
            yield k, ("rows", path, rows)
            k, rows = k + 1, []
    if rows or k == 0:
        yield k, ("rows", path, rows)


def _part(parts: Path, k: int) -> Path:
    return parts / f"{k:06d}"


def _encode_chunk(k: int, task: tuple) -> tuple[str, Any]:
    """Read, normalise, tokenise one chunk and write it as part ``k``: ("ok", examples) or
    ("error", message)."""
    tokenizer, settings, norm, parts = (_JOB[x] for x in ("tokenizer", "settings", "norm", "parts"))
    kind, path, *rest = task
    examples: list[Example] = []
    try:
        rows = read_range(path, *rest) if kind == "range" else rest[0]
        bad: list[str] = []
        for item in examples_of(rows, norm, settings["on_bad_row"]):
            if isinstance(item, str):
                bad.append(item)
            else:
                examples.append(item)
        # data.multi_turn: per_turn = one example per assistant turn; both it and last_turn
        # train each example's last assistant turn
        multi_turn = settings.get("multi_turn", "as_rendered")
        examples = expand_turns(examples) if multi_turn == "per_turn" else examples
        loss_on = settings["loss_on"] if multi_turn == "as_rendered" else "last_assistant"
        enc = encode(tokenizer, examples, loss_on, options=ChatOptions.from_settings(settings))
    except DataError as e:  # with the chunk's images: fixing one retries the build
        return "error", (str(e), _image_lines(examples))
    faults.delay("DSFT_FAULT_SLOW_CHUNK")  # test hook: builders on two "nodes" overlap
    # digested here, in the workers, as the images were just read; a skipped row's too (a
    # fixed image brings it back)
    images = _image_lines(examples)
    # rows the chat template refused (data.on_bad_row=skip) are left out and counted
    if enc.kept is not None:
        examples = [examples[i] for i in enc.kept]
    bad += enc.skipped
    lines = [
        json.dumps(
            {"m": ex.messages, "s": ex.source, "k": ex.kind, "t": ex.tools, "i": ex.images}
        ).encode()
        + b"\n"
        for ex in examples
    ]
    out = _part(parts, k)
    tmp = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "ids.npy", enc.ids)
    np.save(tmp / "trained.npy", enc.trained)
    np.save(tmp / "lengths.npy", np.diff(enc.offsets))
    np.save(tmp / "kinds.npy", np.asarray([KINDS.index(e.kind) for e in examples], np.uint8))
    np.save(tmp / "exlen.npy", np.asarray([len(x) for x in lines], dtype=np.int64))
    (tmp / "examples.jsonl").write_bytes(b"".join(lines))
    (tmp / IMAGES).write_text("".join(images))
    meta = {"n": len(examples), "tokens": len(enc.ids), "bytes": sum(map(len, lines)),
            "images": sum(bool(ex.images) for ex in examples)}  # fmt: skip
    (tmp / "meta.json").write_text(json.dumps({**meta, "skipped": bad}))
    try:
        os.replace(tmp, out)
    except OSError:  # another builder wrote it first (after taking over a claim): equal
        shutil.rmtree(tmp, ignore_errors=True)
    return "ok", len(examples)


def _image_lines(examples: list[Example]) -> list[str]:
    return image_lines(r for ex in examples for r in ex.images or ())


class _ChunkError(DataError):
    """A chunk's error, with its image lines (recorded with the entry's error)."""

    def __init__(self, message: str, images: list[str]) -> None:
        super().__init__(message)
        self.images = images


# How long a finished pool's workers get to leave before they are killed and reported.
_JOIN_TIMEOUT = 60.0


def _worker_init() -> None:
    """Pool initializer: a forked worker drops the parent's stop handlers
    (``distributed.catch_stop_signals`` only records a stop for the training loop), so the
    pool's terminate() and a job's SIGTERM end it; SIGINT is left to the parent."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_stop() -> None:
    """Data preparation ends promptly on a stop request (SIGTERM/SIGUSR1 caught by the
    training recipe): there is nothing to save yet, so the job stops as preempted."""
    signum = distributed.stop_requested()
    if signum is not None:
        raise Preempted(
            f"stopped during data preparation by {signal.Signals(signum).name}; nothing was "
            "trained yet (the tokenised parts done so far stay in the cache for the next run)"
        )


class _Runner:
    """Runs chunks in forked worker processes, a bounded number in flight, results in
    chunk order (so the first bad row in file order is the one reported); or in this
    process with one worker or a single chunk."""

    def __init__(self, workers: int, on_done: Any) -> None:
        self.workers, self.on_done = workers, on_done
        self.pool: Any = None
        self.first: tuple[int, tuple] | None = None  # held until a second chunk shows up
        self.pending: deque[tuple[int, Any]] = deque()
        self.env: str | None = None  # TOKENIZERS_PARALLELISM before the workers

    def submit(self, k: int, task: tuple) -> None:
        _check_stop()
        if self.workers <= 1:
            self.on_done(k, _encode_chunk(k, task))
            return
        if self.pool is None:
            if self.first is None:
                self.first = (k, task)
                return
            # one thread per worker; also keeps tokenizers' fork warning quiet (restored
            # in close: the parent's own later tokenising keeps its threads)
            self.env = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            self.pool = mp.get_context("fork").Pool(self.workers, initializer=_worker_init)
            self.pending.append((self.first[0], self.pool.apply_async(_encode_chunk, self.first)))
            self.first = None
        self.pending.append((k, self.pool.apply_async(_encode_chunk, (k, task))))
        while len(self.pending) > 2 * self.workers:
            self._collect()

    def _collect(self) -> None:
        k, res = self.pending.popleft()
        while not res.ready():  # not a blocking get: a stop request is seen while waiting
            res.wait(0.2)
            _check_stop()
        self.on_done(k, res.get())

    def finish(self) -> None:
        if self.first is not None:
            self.on_done(self.first[0], _encode_chunk(*self.first))
            self.first = None
        while self.pending:
            self._collect()

    def close(self, finished: bool) -> None:
        """End the pool: a finished one is closed and joined (its workers leave at the end
        of their queue); after an error or a stop, the workers are terminated. A worker
        still alive after ``_JOIN_TIMEOUT`` seconds is killed and named in an error."""
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        workers = list(pool._pool)  # the pool's processes (no public accessor)
        if finished:
            pool.close()
        else:
            pool.terminate()
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        stuck = [w for w in workers if w.is_alive()]
        for w in stuck:
            w.kill()
            w.join()
        pool.join()
        if self.env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self.env
        if stuck and finished:
            raise DataError(
                "data: tokenising worker(s) "
                + ", ".join(f"pid {w.pid}" for w in stuck)
                + f" did not exit within {_JOIN_TIMEOUT:.0f}s of the end of the build; killed"
            )


def _fork_ok() -> bool:
    return "fork" in mp.get_all_start_methods()


class _Timeout(DataError):
    """Waited too long for another builder (not recorded as the entry's error)."""


class _Waiter:
    """Sleeps between polls, logs once a minute, and gives up after ``timeout`` seconds."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path, self.timeout, self.t0, self.last = path, timeout, time.time(), time.time()

    @property
    def waited(self) -> float:
        return time.time() - self.t0

    def sleep(self, doing: Any) -> None:
        time.sleep(0.2)
        _check_stop()
        if time.time() - self.last >= 60:
            self.last = time.time()
            log.info("data: waiting %.0fs for %s: %s", self.waited, self.path, doing())
        if self.timeout and self.waited > self.timeout:
            raise _Timeout(
                f"{self.path}: waited {self.waited:.0f}s (data.wait_timeout) for the tokenised "
                f"cache entry; {doing()}. If that process is gone (a crashed node), delete the "
                "file named to let this rank take the work over, or raise data.wait_timeout"
            )


def _progress(entry: Path) -> str:
    """Who is doing what for ``entry`` (for the waiting messages)."""
    parts = entry.with_name(entry.name + ".parts")
    lock = entry.with_suffix(".lock")
    if lock.exists():
        return f"{locks.owner(lock)} is merging it (lock {lock})"
    claims = sorted(parts.glob("*.claim")) if parts.is_dir() else []
    done = len([p for p in parts.iterdir() if p.name.isdigit()]) if parts.is_dir() else 0
    if not claims:
        return f"no builder has started yet (parts in {parts})"
    return (
        f"{done} chunks done, {len(claims)} being tokenised, e.g. chunk {claims[0].stem} by "
        f"{locks.owner(claims[0])} (claim {claims[0]})"
    )


def _abandoned(entry: Path) -> bool:
    """A claim or merge lock of a process that died on this host, with no entry yet."""
    parts = entry.with_name(entry.name + ".parts")
    held = [entry.with_suffix(".lock"), *(parts.glob("*.claim") if parts.is_dir() else [])]
    return any(p.exists() and locks.is_stale(p) for p in held)


def _build(
    path: str, tokenizer: Any, settings: dict[str, Any], entry: Path, opts: BuildOptions
) -> None:
    """Tokenise ``path`` into ``entry`` (sharing chunks with other builders); returns once the
    entry is complete, whoever finished it."""
    parts = entry.with_name(entry.name + ".parts")
    error = entry.with_suffix(".error")
    lock = entry.with_suffix(".lock")
    norm = normaliser(settings["format"], settings["columns"], settings["on_bad_row"])
    _JOB.update(tokenizer=tokenizer, settings=settings, norm=norm, parts=parts)
    t0 = time.time()
    built = examples = 0
    waiter = _Waiter(path, opts.wait_timeout)
    try:
        while not (entry / "meta.json").is_file():
            if error.is_file():
                raise DataError(_read_error(error, path))
            parts.mkdir(parents=True, exist_ok=True)
            n = 0

            def done(k: int, result: tuple[str, Any]) -> None:
                nonlocal built, examples
                if result[0] == "error":
                    raise _ChunkError(*result[1])
                built, examples = built + 1, examples + result[1]
                (parts / f"{k:06d}.claim").unlink(missing_ok=True)

            runner = _Runner(opts.workers if _fork_ok() else 1, done)
            finished = False
            try:
                for k, task in _tasks(path, norm.record_keys, opts):
                    n = k + 1
                    if _part(parts, k).is_dir() or not locks.take(parts / f"{k:06d}.claim"):
                        continue
                    runner.submit(k, task)
                runner.finish()
                finished = True
            finally:
                runner.close(finished)
            # Every chunk is done or claimed by another builder: wait for theirs, take
            # over any whose builder died here, then one builder merges.
            while not (entry / "meta.json").is_file():
                if error.is_file():
                    raise DataError(_read_error(error, path))
                missing = [k for k in range(n) if not _part(parts, k).is_dir()]
                if not missing:
                    if locks.take(lock):
                        try:
                            if not (entry / "meta.json").is_file():
                                _merge(path, entry, parts, n)
                        finally:
                            lock.unlink(missing_ok=True)
                        shutil.rmtree(parts, ignore_errors=True)
                    elif locks.is_stale(lock):
                        lock.unlink(missing_ok=True)
                    waiter.sleep(lambda: _progress(entry))
                    continue
                claim = parts / f"{missing[0]:06d}.claim"
                if not claim.exists() or locks.is_stale(claim):
                    if _part(parts, missing[0]).is_dir():
                        continue  # finished between the two looks
                    break  # abandoned: claim and build it (back to the chunk loop)
                waiter.sleep(lambda: _progress(entry))
    except DataError as e:
        if not isinstance(e, _Timeout) and not error.exists():
            # every waiting rank raises the same message
            _write_error(error, path, str(e), getattr(e, "images", None))
        raise
    if built:
        log.info(
            "data: tokenised %s: %d examples in %d chunks here in %.1fs (%d workers) -> %s",
            path, examples, built, time.time() - t0, opts.workers, entry,
        )  # fmt: skip


def _npy(f: Any, dtype: Any, n: int) -> None:
    """Write the header of a 1-d .npy array of ``n`` items (its data follows)."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": (n,)})


def _merge(path: str, entry: Path, parts: Path, n: int) -> None:
    """Concatenate parts ``0..n-1`` into the entry's arrays, one part in memory at a time."""
    metas = [json.loads((_part(parts, k) / "meta.json").read_text()) for k in range(n)]
    skipped = [r for m in metas for r in m["skipped"]]
    count = sum(m["n"] for m in metas)
    check_not_empty(path, count, skipped)
    tokens = sum(m["tokens"] for m in metas)
    tmp = entry.with_name(f"{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {
        "ids": (np.int32, tokens),
        "trained": (np.bool_, tokens),
        "offsets": (np.int64, count + 1),
        "kinds": (np.uint8, count),
        "example_offsets": (np.int64, count + 1),
    }
    out = {name: (tmp / f"{name}.npy").open("wb") for name in files}
    try:
        for name, (dtype, size) in files.items():
            _npy(out[name], dtype, size)
        np.zeros(1, np.int64).tofile(out["offsets"])
        np.zeros(1, np.int64).tofile(out["example_offsets"])
        at_token = at_byte = 0
        with (tmp / "examples.jsonl").open("wb") as ex:
            for k in range(n):
                d = _part(parts, k)
                np.load(d / "ids.npy").astype(np.int32, copy=False).tofile(out["ids"])
                np.load(d / "trained.npy").astype(np.bool_, copy=False).tofile(out["trained"])
                np.load(d / "kinds.npy").tofile(out["kinds"])
                lengths = np.load(d / "lengths.npy").astype(np.int64)
                (at_token + np.cumsum(lengths)).tofile(out["offsets"])
                exlen = np.load(d / "exlen.npy")
                (at_byte + np.cumsum(exlen)).tofile(out["example_offsets"])
                at_token += int(lengths.sum())
                at_byte += int(exlen.sum())
                with (d / "examples.jsonl").open("rb") as src:
                    shutil.copyfileobj(src, ex, 1 << 20)
                with (d / IMAGES).open("rb") as src, (tmp / IMAGES).open("ab") as images:
                    shutil.copyfileobj(src, images, 1 << 20)
    finally:
        for f in out.values():
            f.close()
    # meta.json last: its presence marks a complete entry (also inside the rename).
    meta = {"name": _store_name(path), "skipped": skipped,
            "image_rows": sum(m.get("images", 0) for m in metas)}  # fmt: skip
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, entry)
    except OSError:  # another builder got there first (shared file system): theirs is equal
        shutil.rmtree(tmp, ignore_errors=True)


def fresh_store(
    path: str, tokenizer: Any, settings: dict[str, Any], opts: BuildOptions
) -> TokenStore:
    """Tokenise one file without the cache (data.cache=false): built in a temporary
    directory, memory-mapped, and the directory removed (the maps stay readable)."""
    tmp = Path(tempfile.mkdtemp(prefix="dsft-prep-"))
    try:
        entry = tmp / "entry"
        _build(path, tokenizer, settings, entry, opts)
        return _read_entry(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_store(path: str, tokenizer: Any, settings: dict[str, Any]) -> TokenStore:
    """Tokenise one file without the cache, in this process (one worker)."""
    return fresh_store(path, tokenizer, settings, BuildOptions())


def cached_store(
    path: str,
    tokenizer: Any,
    settings: dict[str, Any],
    root: Path,
    builder: bool,
    opts: BuildOptions | None = None,
) -> TokenStore:
    """The file's tokenised store from the cache, building (a share of) it if this rank may.

    An entry whose rows name image files that changed since it was built is not used: the
    entry keyed by the files' current digests is (built if need be), so every rank, reading
    the same files, goes to the same one."""
    opts = opts or BuildOptions()
    key = entry_key(path, tokenizer_digest(tokenizer), settings)
    entry = root / key
    try:
        store = _cached_entry(path, tokenizer, settings, entry, builder, opts)
    except DataError:
        if (now := images_changed(entry)) is None:
            raise
    else:
        if (now := images_changed(entry)) is None:
            return store
    entry = entry.with_name(f"{key}-{now[:16]}")
    return _cached_entry(path, tokenizer, settings, entry, builder, opts)


def _cached_entry(
    path: str,
    tokenizer: Any,
    settings: dict[str, Any],
    entry: Path,
    builder: bool,
    opts: BuildOptions,
) -> TokenStore:
    error = entry.with_suffix(".error")
    waiter = _Waiter(path, opts.wait_timeout)
    while not builder and not (entry / "meta.json").is_file():
        if error.is_file():
            raise DataError(_read_error(error, path))
        # a waiter takes over work whose builder died here (after a grace period)
        builder = waiter.waited > 10 and _abandoned(entry)
        if not builder:
            waiter.sleep(lambda: _progress(entry))
    if builder:  # returns at once when the entry exists
        entry.parent.mkdir(parents=True, exist_ok=True)
        _build(path, tokenizer, settings, entry, opts)
    return _read_entry(entry, path)
