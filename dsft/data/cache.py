"""Tokenise once: a content-addressed, memory-mapped cache of tokenised files.

One cache entry per data file, keyed by the file's bytes, the tokenizer (its
vocabulary, special tokens and chat template) and every setting that changes the
tokens (format, columns, loss_on, bad-row policy), and by the image files its rows name
(:func:`images_changed`). Truncation is applied when an example is read, so ``data.max_len``
changes reuse the entry.

This module: the key of an entry, its layout and reading it (``TokenStore``, memory-mapped).
Building an entry (chunks, forked workers, several builders): dsft/data/build.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsft.config import is_hub_id
from dsft.data.formats import Example
from dsft.data.tokenize import IGNORE_INDEX, Encoded, Tokenized

CACHE_VERSION = "3"
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
        """Tokens per example (int32 while that fits: 4 bytes per example)."""
        d = np.diff(self.offsets)
        return d.astype(np.int32) if not len(d) or d.max() < 2**31 else d

    def targets(self, max_len: int, block: int = 1 << 20) -> np.ndarray:
        """Per example: tokens carrying loss within the first ``max_len`` (position 0 excluded).

        One pass over ``trained`` in blocks of about ``block`` tokens, read with file reads
        rather than through the memory map, so memory stays bounded and the pass does not
        leave the whole array resident.
        """
        n = len(self)
        out = np.zeros(n, dtype=np.int32 if max_len < 2**31 else np.int64)
        a = 0
        while a < n:
            # the examples whose tokens fit the block (at least one)
            b = int(np.searchsorted(self.offsets, self.offsets[a] + block, side="right")) - 1
            b = min(max(b, a + 1), n)
            lo, hi = int(self.offsets[a]), int(self.offsets[b])
            trained = _read_slice(self.trained, lo, hi)
            cs = np.zeros(hi - lo + 1, dtype=np.int64)
            np.cumsum(trained, out=cs[1:])
            start = self.offsets[a:b] - lo
            end = np.minimum(self.offsets[a + 1 : b + 1] - lo, start + max_len)
            out[a:b] = np.maximum(cs[end] - cs[np.minimum(start + 1, end)], 0)
            a = b
        return out

    def item(self, i: int, max_len: int) -> Tokenized:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        end = min(b, a + max_len)
        ids = np.asarray(self.ids[a:end])
        labels = np.where(self.trained[a:end], ids, IGNORE_INDEX)
        return Tokenized(ids.tolist(), labels.tolist(), b - a > max_len, self.name)


class _JsonlExamples(Sequence[Example]):
    """Normalised examples stored one JSON line each, read on demand by index."""

    def __init__(self, path: Path, offsets: np.ndarray) -> None:
        # Mapped now: a store built in a temporary directory (data.cache=false) stays
        # readable after the directory is removed.
        self.offsets = offsets
        self._data = np.memmap(path, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        raw = bytes(self._data[int(self.offsets[i]) : int(self.offsets[i + 1])])
        d = json.loads(raw)
        return Example(d["m"], d["s"], d["k"], d.get("t"), d.get("i"))


def _update(h: Any, f: Path) -> None:
    """Feed ``f``'s bytes to ``h``, a megabyte at a time."""
    with f.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        _update(h, f)
    return h.hexdigest()


# ------------------------------------------------------------------------- image files
# An image row's token layout depends on its image (the size sets Idefics3's tiles, for
# one), but the data file holds only the image's path: so an entry lists the image files
# its rows name with their digests (images.jsonl: [sha256, size, mtime_ns, path]; data: URIs
# and embedded bytes are in the data file's own bytes), and a reader whose files no
# longer match is sent to the entry keyed by the current digests (build.cached_store). A
# file whose size and mtime are unchanged keeps its recorded digest: one stat per image,
# as make and rsync judge, and only a changed file is read again, so a million images
# cost a million stats per run, not their bytes. Pixels are never stored.
IMAGES = "images.jsonl"


def _image_digest(path: str) -> str:
    h = hashlib.sha256()
    try:
        _update(h, Path(path))
    except OSError:  # missing or unreadable: the build that follows says which and why
        return "-"
    return h.hexdigest()


def image_lines(refs: Iterable[str]) -> list[str]:
    """The images.jsonl lines of the image files among ``refs`` (each once, in order)."""
    lines = []
    for ref in dict.fromkeys(refs):
        if ref.startswith("data:"):
            continue
        try:
            st = os.stat(ref)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # missing: the row was refused or skipped, until the file appears
            size = mtime = -1
        lines.append(json.dumps([_image_digest(ref), size, mtime, ref]) + "\n")
    return lines


def images_changed(entry: Path) -> str | None:
    """The current digest of the image files named by ``entry``'s rows (or, for a build
    that failed, by the failing chunk's rows: a fixed image is retried) when one changed
    since the build; None when none did, or they name none. Read a line at a time: memory
    stays flat for any number of images."""
    listed, error = entry / IMAGES, entry.with_suffix(".error")
    if listed.is_file() and listed.stat().st_size:
        with listed.open(encoding="utf-8") as f:
            return _compare(f)
    if not listed.is_file() and error.is_file():
        try:
            lines = json.loads(error.read_text()).get("images")
        except (ValueError, AttributeError):  # an older cache's plain message
            return None
        return _compare(lines) if lines else None
    return None


def _compare(lines: Iterable[str]) -> str | None:
    was, now = hashlib.sha256(), hashlib.sha256()
    for line in lines:
        digest, size, mtime, path = json.loads(line)
        try:
            st = os.stat(path)
            same = (st.st_size, st.st_mtime_ns) == (size, mtime)
        except OSError:
            same = False
        was.update(json.dumps([digest, path]).encode())
        now.update(json.dumps([digest if same else _image_digest(path), path]).encode())
    return None if was.digest() == now.digest() else now.hexdigest()


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
    proc = getattr(tokenizer, "dsft_processor", None)  # image rows: how images expand
    if proc is not None:
        h.update(proc.image_processor.to_json_string().encode())
        h.update(json.dumps({k: str(v) for k, v in sorted(vars(proc).items())
                             if isinstance(v, int | str)}).encode())  # fmt: skip
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


def _read_slice(arr: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``arr[lo:hi]``; for a memory-mapped .npy, by a file read that leaves no mapped pages."""
    if isinstance(arr, np.memmap) and arr.filename is not None and arr.ndim == 1:
        try:
            return np.fromfile(
                arr.filename, dtype=arr.dtype, count=hi - lo, offset=arr.offset + lo * arr.itemsize
            )
        except FileNotFoundError:  # data.cache=false: the file is gone, the map is not
            pass
    return np.asarray(arr[lo:hi])


def _store_name(path: str) -> str:
    return Path(path).stem if not Path(path).is_dir() else Path(path).name


def _write_error(error: Path, path: str, message: str, images: list[str] | None = None) -> None:
    """Record a build's error for the ranks waiting on the entry. The entry is keyed by the
    file's contents, so a byte-identical copy at another path finds it too: the path is
    stored apart and put back as the reader's own (:func:`_read_error`). ``images``: the
    failing chunk's image lines (:func:`image_lines`), so a fixed image is retried."""
    error.write_text(json.dumps({"path": path, "message": message, "images": images or []}))


def _read_error(error: Path, path: str) -> str:
    """The recorded error, naming ``path`` (the file this reader was given)."""
    text = error.read_text()
    try:
        record = json.loads(text)
        message, written = record["message"], record["path"]
    except (ValueError, KeyError, TypeError):  # an older cache's plain message
        return text
    return message.replace(written, path) if written and written != path else message


def _read_entry(entry: Path, path: str | None = None) -> TokenStore:
    meta = json.loads((entry / "meta.json").read_text())
    enc = Encoded(
        np.load(entry / "ids.npy", mmap_mode="r"),
        np.load(entry / "trained.npy", mmap_mode="r"),
        np.load(entry / "offsets.npy"),
    )
    # mapped: only the examples generation reads (validation, test) are ever touched
    offsets = np.load(entry / "example_offsets.npy", mmap_mode="r")
    examples = _JsonlExamples(entry / "examples.jsonl", offsets)
    kinds = np.load(entry / "kinds.npy")
    name = _store_name(path) if path is not None else meta["name"]  # a copy: its own name
    store = TokenStore(name, enc.ids, enc.trained, enc.offsets, examples, kinds, meta["skipped"])
    store.image_rows = int(meta.get("image_rows", 0))  # rows with images (packing refuses)
    return store
