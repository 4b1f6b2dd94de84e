"""Tokenise once: a content-addressed, memory-mapped cache of tokenised files.

One cache entry per data file, keyed by the file's bytes, the tokenizer (its
vocabulary, special tokens and chat template) and every setting that changes the
tokens (format, columns, loss_on, bad-row policy). Truncation is applied when an
example is read, so ``data.max_len`` changes reuse the entry.

In a multi-rank job each node's local rank 0 tries to take the entry's lock file
(``O_CREAT | O_EXCL``): the winner tokenises into a temporary directory and
renames it into place (atomic), everyone else polls for the finished entry. No
collective is involved, so a long tokenisation cannot hit a NCCL/gloo timeout; a
builder that fails leaves an ``.error`` file whose message the waiters raise, and
a lock whose process is gone (same host) is taken over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsft.config import is_hub_id
from dsft.data.formats import Example, load_examples
from dsft.data.tokenize import IGNORE_INDEX, ChatOptions, Encoded, Tokenized, encode
from dsft.errors import DataError

log = logging.getLogger("dsft")

CACHE_VERSION = "2"
KINDS = (
    "chat",
    "completion",
    "text",
)  # bump when the stored layout or the tokenisation rules change


@dataclass
class TokenStore:
    """The tokenised examples of one data file (arrays may be memory-mapped)."""

    name: str  # dataset name (file stem): metrics are reported per dataset
    ids: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray
    examples: Sequence[Example]  # the normalised examples (for generation and inspect)
    kinds: np.ndarray  # per example: index into KINDS
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def targets(self, max_len: int) -> np.ndarray:
        """Per example: tokens carrying loss within the first ``max_len`` (position 0 excluded)."""
        cs = np.concatenate([[0], np.cumsum(self.trained, dtype=np.int64)])
        start = self.offsets[:-1]
        end = np.minimum(self.offsets[1:], start + max_len)
        return np.maximum(cs[end] - cs[np.minimum(start + 1, end)], 0)

    def item(self, i: int, max_len: int) -> Tokenized:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        end = min(b, a + max_len)
        ids = np.asarray(self.ids[a:end])
        labels = np.where(self.trained[a:end], ids, IGNORE_INDEX)
        return Tokenized(ids.tolist(), labels.tolist(), b - a > max_len, self.name)


class _JsonlExamples(Sequence[Example]):
    """Normalised examples stored one JSON line each, read on demand by index."""

    def __init__(self, path: Path, offsets: np.ndarray) -> None:
        self.path, self.offsets = path, offsets
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = bytes(self._data[int(self.offsets[i]) : int(self.offsets[i + 1])])
        d = json.loads(raw)
        return Example(d["m"], d["s"], d["k"], d.get("t"))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _source_digest(path: str) -> str:
    if is_hub_id(path):  # a Hub dataset: its snapshot commit and options
        from dsft.hub import dataset_digest

        return dataset_digest(path)
    return _file_digest(Path(path))


def tokenizer_digest(tokenizer: Any) -> str:
    """What makes two tokenizers produce the same ids: vocabulary, specials, template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its saved files
        src = Path(getattr(tokenizer, "name_or_path", "") or ".")
        h.update(_file_digest(src).encode() if src.is_dir() else repr(tokenizer).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def cache_root(cache_dir: str) -> Path:
    return Path(cache_dir or os.environ.get("DSFT_CACHE") or Path.home() / ".cache" / "dsft")


def entry_key(path: str, tok_digest: str, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(CACHE_VERSION.encode())
    h.update(_source_digest(path).encode())
    h.update(tok_digest.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def build_store(path: str, tokenizer: Any, settings: dict[str, Any]) -> TokenStore:
    """Read, normalise and tokenise one file in memory."""
    loaded = load_examples([path], settings["format"], settings["columns"], settings["on_bad_row"])
    enc = encode(
        tokenizer, loaded.examples, settings["loss_on"], options=ChatOptions.from_settings(settings)
    )
    # rows the chat template refused (data.on_bad_row=skip) are left out and counted
    examples = loaded.examples if enc.kept is None else [loaded.examples[i] for i in enc.kept]
    if not examples:
        raise DataError(
            f"{path}: all rows are bad; the first ones:\n  " + "\n  ".join(enc.skipped[:5])
        )
    return TokenStore(
        Path(path).stem if not Path(path).is_dir() else Path(path).name,
        enc.ids,
        enc.trained,
        enc.offsets,
        examples,
        np.asarray([KINDS.index(e.kind) for e in examples], dtype=np.uint8),
        loaded.skipped + enc.skipped,
    )


def _write_entry(entry: Path, store: TokenStore) -> None:
    tmp = entry.with_name(f"{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "ids.npy", store.ids)
    np.save(tmp / "trained.npy", store.trained)
    np.save(tmp / "offsets.npy", store.offsets)
    np.save(tmp / "kinds.npy", store.kinds)
    ex_offsets = [0]
    with (tmp / "examples.jsonl").open("wb") as f:
        for ex in store.examples:
            d = {"m": ex.messages, "s": ex.source, "k": ex.kind, "t": ex.tools}
            line = json.dumps(d).encode() + b"\n"
            f.write(line)
            ex_offsets.append(ex_offsets[-1] + len(line))
    np.save(tmp / "example_offsets.npy", np.asarray(ex_offsets, dtype=np.int64))
    # meta.json last: its presence marks a complete entry (also inside the rename).
    (tmp / "meta.json").write_text(json.dumps({"name": store.name, "skipped": store.skipped}))
    try:
        os.replace(tmp, entry)
    except OSError:  # another builder got there first (shared file system): theirs is equal
        shutil.rmtree(tmp, ignore_errors=True)


def _read_entry(entry: Path) -> TokenStore:
    meta = json.loads((entry / "meta.json").read_text())
    enc = Encoded(
        np.load(entry / "ids.npy", mmap_mode="r"),
        np.load(entry / "trained.npy", mmap_mode="r"),
        np.load(entry / "offsets.npy"),
    )
    examples = _JsonlExamples(entry / "examples.jsonl", np.load(entry / "example_offsets.npy"))
    kinds = np.load(entry / "kinds.npy")
    return TokenStore(
        meta["name"], enc.ids, enc.trained, enc.offsets, examples, kinds, meta["skipped"]
    )


def _lock_is_stale(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split(":")
    except (OSError, ValueError):
        return False  # being written right now
    if host != socket.gethostname():
        return False  # cannot tell; the other node's builder finishes or leaves .error
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def cached_store(
    path: str, tokenizer: Any, settings: dict[str, Any], root: Path, builder: bool
) -> TokenStore:
    """The file's tokenised store from the cache, building it if this rank may."""
    key = entry_key(path, tokenizer_digest(tokenizer), settings)
    entry = root / key
    lock, error = entry.with_suffix(".lock"), entry.with_suffix(".error")
    waited = 0.0
    while True:
        if (entry / "meta.json").is_file():
            return _read_entry(entry)
        if error.is_file():
            raise DataError(error.read_text())
        # a waiter takes over a lock whose builder died (checked after a grace period)
        stale = (builder or waited > 10) and _lock_is_stale(lock)
        if builder or stale:
            if stale:
                lock.unlink(missing_ok=True)
            try:
                root.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                builder = False  # someone else builds it
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{socket.gethostname()}:{os.getpid()}")
                try:
                    t0 = time.time()
                    store = build_store(path, tokenizer, settings)
                    _write_entry(entry, store)
                    log.info(
                        "data: tokenised %s (%d examples) in %.1fs -> cache %s",
                        path,
                        len(store),
                        time.time() - t0,
                        entry,
                    )
                    return _read_entry(entry)
                except DataError as e:
                    error.write_text(str(e))  # the waiting ranks raise the same message
                    raise
                finally:
                    lock.unlink(missing_ok=True)
        time.sleep(0.2)
        waited += 0.2
        if int(waited * 5) % 300 == 0:  # once a minute
            log.info("data: waiting for another rank to tokenise %s (%s)", path, entry)
