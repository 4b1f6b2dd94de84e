"""Reading rows out of example files: jsonl, json, csv, parquet, datasets.save_to_disk.

Every reader yields :class:`Row` objects located as ``"path:LINE"`` (jsonl, JSON-lines in a
.json file, csv; 1-based physical line, the csv header is line 1) or ``"path:row N"`` (JSON
arrays, parquet, save_to_disk directories; N is 1-based). A row that cannot be read (bad JSON,
bad UTF-8, a csv row with the wrong number of cells) comes back with ``error`` set, so the
caller can skip it; a problem with the whole file raises :class:`DataError`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dsft.config import is_hub_id
from dsft.errors import DataError

SUPPORTED = (
    ".jsonl, .json, .csv (each also .gz), .parquet, "
    "or a directory written by datasets' save_to_disk"
)
_BOM = b"\xef\xbb\xbf"
# Byte-order marks of encodings dsft does not read (UTF-32 first: its LE mark starts like UTF-16's).
_OTHER_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
# The longest line (jsonl) or JSON file read; longer ones are bad rows, not a MemoryError.
MAX_LINE_BYTES = 1 << 30
_DEEP = "JSON nested too deeply (deeper than Python's recursion limit)"
# Long documents in one csv cell are normal for SFT data; the csv module's default limit
# (128 KiB) would reject them.
csv.field_size_limit(2**31 - 1)


@dataclass(frozen=True)
class Row:
    """One record of a file, or why it could not be read."""

    where: str
    record: Any = None
    error: str | None = None  # the reason, without the location


def read_rows(path: str, record_keys: Collection[str] = ()) -> Iterator[Row]:
    """Rows of one file or save_to_disk directory, in order.

    ``record_keys`` are field names that mark a JSON object as a record rather than a
    wrapper such as ``{"data": [...]}``.
    """
    if is_hub_id(path):
        yield from _hub_dataset(path)
        return
    p = Path(path)
    if p.is_dir():
        yield from _saved_dataset(path)
        return
    if not p.exists():
        raise DataError(f"{path}: file not found")
    name = p.name.lower()
    gz = name.endswith(".gz")
    suffix = Path(name.removesuffix(".gz")).suffix
    if suffix == ".parquet" and not gz:
        yield from _parquet(path)
        return
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv"):
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; supported: {SUPPORTED}"
        )
    try:
        with gzip.open(p, "rb") if gz else p.open("rb") as f:
            _check_encoding(path, f.read(4))
            f.seek(0)
            if suffix == ".json":
                data = f.read(MAX_LINE_BYTES + 1)
                if len(data) > MAX_LINE_BYTES:
                    raise DataError(
                        f"{path}: a JSON document over {MAX_LINE_BYTES >> 20} MiB; "
                        "write one record per line (.jsonl) instead"
                    )
                yield from _json(path, data, record_keys)
            elif suffix == ".csv":
                yield from _csv(path, f)
            else:
                yield from _jsonl(path, _bounded_lines(f))
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise DataError(f"{path}: cannot read ({e})") from None


def _check_encoding(path: str, head: bytes) -> None:
    for bom, name in _OTHER_BOMS:
        if head.startswith(bom):
            raise DataError(
                f"{path}: the file is {name}-encoded (byte-order mark); dsft reads UTF-8: "
                f"convert it, e.g. iconv -f {name} -t UTF-8"
            )


def _no_bom(lines: Iterable[bytes | None]) -> Iterator[bytes | None]:
    # Editors on Windows start UTF-8 files with a byte-order mark; it is not data.
    for i, raw in enumerate(lines):
        yield raw.removeprefix(_BOM) if i == 0 and raw is not None else raw


def _utf8_error(e: UnicodeDecodeError, col: int) -> str:
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at column {col})"


def _bounded_lines(f: BinaryIO) -> Iterator[bytes | None]:
    """The file's lines; None for a line over MAX_LINE_BYTES (skipped without holding it)."""
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield raw


def _jsonl(
    path: str, lines: Iterable[bytes | None], first: int = 1, bom: bool = True
) -> Iterator[Row]:
    # Bytes, decoded line by line: a bad byte is one bad row, and only "\n" ends a line
    # (str.splitlines would also split on U+2028 inside a JSON string). ``first``: the
    # line number of the first line (a byte range of a file starts mid-way).
    for lineno, raw in enumerate(_no_bom(lines) if bom else lines, start=first):
        where = f"{path}:{lineno}"
        if raw is None:
            yield Row(where, error=f"a line longer than {MAX_LINE_BYTES >> 20} MiB")
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Row(where, error=_utf8_error(e, e.start + 1))
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))  # an error at the end points into the line
        except json.JSONDecodeError as e:
            yield Row(where, error=f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:
            yield Row(where, error=_DEEP)
            continue
        yield Row(where, record)


def splittable(path: str) -> bool:
    """Whether ``path`` can be cut into byte ranges read independently (plain JSON lines)."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson")


def line_ranges(path: str, size: int) -> list[tuple[int, int, int]]:
    """``(start, end, first line)`` byte ranges of about ``size`` bytes, each ending after a
    newline, covering the file. One streaming pass that counts newlines (I/O bound)."""
    ranges: list[tuple[int, int, int]] = []
    start, start_line = 0, 1
    pos, line = 0, 1  # the byte offset and line number at the start of ``block``
    with open(path, "rb") as f:
        _check_encoding(path, f.read(4))
        f.seek(0)
        for block in iter(lambda: f.read(1 << 22), b""):
            while start + size < pos + len(block):
                cut = block.find(b"\n", max(start + size - pos, 0))
                if cut < 0:
                    break  # the line goes on into the next block
                end = pos + cut + 1
                ranges.append((start, end, start_line))
                start, start_line = end, line + block.count(b"\n", 0, cut + 1)
            pos, line = pos + len(block), line + block.count(b"\n")
    if pos > start or not ranges:
        ranges.append((start, pos, start_line))
    return ranges


def read_range(path: str, start: int, end: int, first_line: int) -> Iterator[Row]:
    """The rows of the JSON-lines byte range ``[start, end)`` (see :func:`line_ranges`)."""

    def lines(f: BinaryIO) -> Iterator[bytes | None]:
        if f.tell() >= end:
            return
        for raw in _bounded_lines(f):
            yield raw
            if f.tell() >= end:
                return

    with open(path, "rb") as f:
        f.seek(start)
        yield from _jsonl(path, lines(f), first_line, bom=start == 0)


def _is_json_lines(data: bytes) -> bool:
    """True when the first non-blank line is a whole JSON object and more lines follow."""
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    if len(lines) < 2 or not lines[0].lstrip().startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(lines[0]), dict)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError
        return False


def _json(path: str, data: bytes, record_keys: Collection[str]) -> Iterator[Row]:
    data = data.removeprefix(_BOM)
    if _is_json_lines(data):
        yield from _jsonl(path, io.BytesIO(data))
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: {_utf8_error(e, col)}") from None
    if not text.strip():
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        ) from None
    except RecursionError:
        raise DataError(f"{path}: {_DEEP}") from None
    for i, record in enumerate(_json_records(path, doc, record_keys), start=1):
        yield Row(f"{path}:row {i}", record)


def _json_records(path: str, doc: Any, record_keys: Collection[str]) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(doc).__name__}")
    lists = [k for k, v in doc.items() if isinstance(v, list)]
    if any(k in doc for k in record_keys) or not lists:
        return [doc]  # a file holding a single record
    if len(lists) == 1:
        return doc[lists[0]]  # a wrapper such as {"data": [...], "version": 2}
    raise DataError(
        f"{path}: a JSON object with several lists ({', '.join(lists)}); expected a JSON "
        "array of records, or an object with one list of records"
    )


def _has_bad_bytes(cell: str) -> bool:
    try:
        cell.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates left by surrogateescape
        return True
    return False


def _csv(path: str, f: BinaryIO) -> Iterator[Row]:
    # surrogateescape keeps bad bytes as lone surrogates, so a bad byte spoils one row only
    # and a quoted cell may still span lines.
    lines = (raw.decode("utf-8", "surrogateescape") for raw in _no_bom(f))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is None:
            return
        if any(_has_bad_bytes(h) for h in header):
            raise DataError(f"{path}:1: the header is not valid UTF-8")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DataError(f"{path}:1: duplicate column(s) {', '.join(map(repr, dupes))}")
        start = reader.line_num + 1
        for cells in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                yield Row(where, error=f"{len(cells)} cells, but the header has {len(header)}")
                continue
            bad = [h for h, c in zip(header, cells, strict=True) if _has_bad_bytes(c)]
            if bad:
                yield Row(where, error=f"column {bad[0]!r}: not valid UTF-8")
                continue
            yield Row(where, dict(zip(header, cells, strict=True)))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _parquet(path: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    i = 0
    # Batches keep memory bounded on large files; rows come back as plain Python values.
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            i += 1
            yield Row(f"{path}:row {i}", record)


def _hub_dataset(path: str) -> Iterator[Row]:
    from dsft.hub import dataset_rows

    yield from _dataset_rows(path, dataset_rows(path))


def _saved_dataset(path: str) -> Iterator[Row]:
    p = Path(path)
    if not ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        raise DataError(
            f"{path}: a directory, but not one written by datasets' save_to_disk (no state.json "
            f"or dataset_dict.json); supported: {SUPPORTED}"
        )
    import datasets  # slow to import; only needed here

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises several types for a damaged directory
        raise DataError(f"{path}: datasets.load_from_disk failed ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(
                f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                f"point data.path at one split's directory, e.g. {p / next(iter(ds), 'SPLIT')}"
            )
        ds = ds["train"]
    yield from _dataset_rows(path, ds)


def _dataset_rows(path: str, ds: Any) -> Iterator[Row]:
    i = 0
    for batch in ds.with_format("arrow").iter(batch_size=1024):
        for record in batch.to_pylist():
            i += 1
            yield Row(f"{path}:row {i}", record)


# ------------------------------------------------------------------------------- images

# data.max_image_pixels when not configured: ~40 megapixels (8K is 33), far below a
# decompression bomb's billions.
MAX_IMAGE_PIXELS = 40_000_000


def image_label(ref: str) -> str:
    """How errors name an image: its path, or "a data: URI"."""
    return "a data: URI" if ref.startswith("data:") else ref


def open_image(ref: str, max_pixels: int = MAX_IMAGE_PIXELS, at: str = "") -> Any:
    """Decode the image at ``ref`` (a path or a ``data:`` URI) as an RGB PIL image.

    A missing file, a non-image, a truncated or corrupt file, a decompression bomb and an
    image above ``max_pixels`` raise :class:`DataError` prefixed with ``at`` (where the
    image was named), never a PIL traceback. The size is checked from the header, before
    any pixel is decoded."""
    import base64
    import binascii
    import urllib.parse
    import warnings

    from PIL import Image, UnidentifiedImageError

    what = f"{at}: {image_label(ref)}" if at else image_label(ref)
    try:
        if ref.startswith("data:"):
            head, _, data = ref.partition(",")
            raw = (
                base64.b64decode(data, validate=True)
                if head.endswith(";base64")
                else urllib.parse.unquote_to_bytes(data)
            )
            f: Any = io.BytesIO(raw)
        else:
            f = io.BytesIO(Path(ref).read_bytes())
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            w, h = img.size
            if w * h > max_pixels:
                raise DataError(
                    f"{what}: {w}x{h} = {w * h:,} pixels, above data.max_image_pixels="
                    f"{max_pixels:,}"
                )
            img.load()
            return img.convert("RGB")
    except DataError:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"{what}: no such image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{what}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise DataError(f"{what}: not an image (PIL cannot identify it)") from None
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{what}: not a valid data: URI ({e})") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise DataError(f"{what}: a truncated or corrupt image ({e})") from None
