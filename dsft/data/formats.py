"""Reading example files and normalising every record to a list of chat messages.

Supported record shapes (detected per file, or forced with ``data.format``):
  * instruction: ``{"instruction": str, "input": str (optional), "output": str}``
  * chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
A bad row raises :class:`DataError` naming the file, line and field; nothing is
dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One conversation and where it came from (for error messages and reports)."""

    messages: list[Message]
    source: str  # "file.jsonl:12" (jsonl/json: line; csv: line; parquet/arrow: "file:row 7")
    # chat: rendered with the chat template; completion: raw prompt + completion text (the
    # messages are [user=prompt, assistant=completion]); text: raw text, all tokens trained
    # (messages are [assistant=text]).
    kind: str = "chat"

    @property
    def dataset(self) -> str:
        """The name of the file the example came from, without directory and suffix."""
        return Path(self.source.rsplit(":", 1)[0]).stem


def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    return "unknown"


def _require_str(record: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    if key not in record or record[key] is None:
        if optional:
            return ""
        raise DataError(f"{where}: missing field {key!r}")
    v = record[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def to_messages(record: Any, fmt: str, where: str) -> list[Message]:
    """Normalise one record to chat messages; ``where`` locates it for errors."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt == "instruction":
        instruction = _require_str(record, "instruction", where)
        extra = _require_str(record, "input", where, optional=True)
        output = _require_str(record, "output", where)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if fmt == "chat":
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list")
        out: list[Message] = []
        for i, m in enumerate(msgs):
            at = f"{where}: messages[{i}]"
            if not isinstance(m, dict):
                raise DataError(f"{at}: expected an object with 'role' and 'content'")
            role = _require_str(m, "role", at)
            if role not in ROLES:
                raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
            out.append({"role": role, "content": _require_str(m, "content", at)})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
        return out
    raise DataError(
        f"{where}: cannot tell the format (fields: {', '.join(sorted(record)) or 'none'}); "
        "expected 'instruction'/'output' or 'messages', or set data.format"
    )


def read_jsonl(path: str | Path, fmt: str = "auto") -> list[Example]:
    """Read a jsonl file of records into examples, failing on the first bad line."""
    path = Path(path)
    examples: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            examples.append(Example(to_messages(record, fmt, where), where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


@dataclass
class Loaded:
    """Examples of all files in file order, and why rows were skipped (on_bad_row=skip)."""

    examples: list[Example]
    skipped: list[str]  # one "file:line: reason" per skipped row


def load_examples(
    paths: list[str],
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    on_bad_row: str = "error",
) -> Loaded:
    """All examples of all files, in file order."""
    out: list[Example] = []
    for p in paths:
        out.extend(read_jsonl(p, fmt))
    return Loaded(out, [])
