"""Reading example files and normalising every record to a list of chat messages.

Files (see :mod:`dsft.data.readers`): .jsonl, .json, .csv (each also .gz), .parquet, or a
``datasets`` save_to_disk directory. Record shapes, detected per record in this order (the
first match wins, so extra columns such as alpaca's pre-formatted ``text`` do not matter), or
forced with ``data.format``:

  * chat: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}``;
    a system message may only come first ("developer" is read as system, "ipython" and
    "function" as tool). ``content`` is a string or a list of OpenAI-style parts
    (``{"type": "text", "text": ...}``, joined; an image part ``{"type": "image", "path" |
    "url" | "image": ...}`` becomes an ``<image>`` placeholder in the text and its reference
    goes to :attr:`Example.images`: a path (relative to the data file), a ``data:`` URI or a
    datasets Image value; audio/video parts are refused). A row's ``images`` column (LLaMA-
    Factory / ms-swift) gives the images of its ``<image>`` placeholders. An assistant message may carry ``tool_calls`` (``{"function":
    {"name", "arguments"}}``, arguments an object or a JSON string; content may then be
    empty) and reasoning (``reasoning_content``, ``thinking`` or ``reasoning``); a tool
    message may carry ``tool_call_id`` and ``name``. A row's ``tools`` (a list of JSON
    schemas, or JSON text) is passed to the chat template.
  * sharegpt: ``{"conversations": [{"from": ..., "value": str}, ...]}`` with ``from`` one of
    system, human (-> user), user, gpt (-> assistant), assistant, function_call (-> an
    assistant tool call; the value is ``{"name", "arguments"}`` JSON), observation or tool
    (-> tool); role/content keys work too.
  * prompt_completion: ``{"prompt": str, "completion": str}`` -> kind "completion"; or both
    lists of messages (TRL's conversational form) -> kind "chat", prompt then completion.
  * instruction (alpaca): ``{"instruction": str, "input": str (optional), "output": str}``.
  * text: ``{"text": str}`` -> kind "text", trained on every token.

``data.columns`` maps a canonical field to the user's column name (role/content/from/value
apply inside message lists). In csv files a messages/conversations cell holds JSON text.
Every example needs a non-blank assistant response (user turns may be empty). A bad row
raises :class:`DataError` naming file, line or row, and field; with ``on_bad_row="skip"`` it
is left out and its reason kept in :attr:`Loaded.skipped`, never dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft.config import COLUMNS
from dsft.data.readers import Row, read_rows
from dsft.errors import DataError

Message = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")
CHAT_ROLES = {r: r for r in ROLES} | {"developer": "system", "ipython": "tool", "function": "tool"}
FORMATS = ("instruction", "chat", "sharegpt", "prompt_completion", "text")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "function_call",  # an assistant tool call, the value holds its JSON
    "observation": "tool",
    "tool": "tool",
}
# Content parts dsft cannot train on (audio, video, files); images are read (IMAGE_PARTS).
MEDIA_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "video", "file")
IMAGE_PARTS = ("image", "image_url", "input_image")
# What an image part leaves in the text (LLaMA-Factory's and ms-swift's placeholder); the
# model's processor expands it (dsft.data.tokenize).
IMAGE_PLACEHOLDER = "<image>"
_SURROGATE = re.compile("[\ud800-\udfff]")
# (canonical field, format) in detection order.
_DETECT = (
    ("messages", "chat"),
    ("conversations", "sharegpt"),
    ("prompt", "prompt_completion"),
    ("completion", "prompt_completion"),
    ("instruction", "instruction"),
    ("output", "instruction"),
    ("text", "text"),
)
# Top-level fields per format: data.columns naming those of one format only implies it, so a
# row missing the remapped column gets "missing field" rather than "cannot tell the format".
_FIELDS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "input", "output"),
    "text": ("text",),
}
_SHAPES = (
    "messages (chat), conversations (sharegpt), prompt + completion, "
    "instruction + output (+ input), text"
)


@dataclass(frozen=True)
class Example:
    """One conversation and where it came from (for error messages and reports)."""

    messages: list[Message]
    # "file.jsonl:12" (jsonl, JSON lines, csv: 1-based line, csv header = line 1);
    # "file.parquet:row 7" (parquet, JSON arrays, save_to_disk directories: 1-based row).
    source: str
    # chat: rendered with the chat template; completion: raw prompt + completion text (the
    # messages are [user=prompt, assistant=completion]); text: raw text, all tokens trained
    # (messages are [assistant=text]).
    kind: str = "chat"
    tools: list[dict[str, Any]] | None = None  # the row's tool schemas (chat only)
    # The row's images in placeholder order: absolute paths or data: URIs (None: text only).
    images: list[str] | None = None

    @property
    def dataset(self) -> str:
        """The name of the file the example came from, without directory and suffix."""
        name = Path(self.source.rsplit(":", 1)[0]).name
        return Path(name.removesuffix(".gz")).stem


@dataclass
class Loaded:
    """Examples of all files in file order, and why rows were skipped (on_bad_row=skip)."""

    examples: list[Example]
    skipped: list[str]  # one "file:line: reason" per skipped row


class _BadRow(Exception):
    """A problem with one record (the message has no location; the caller adds it)."""


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({v})"
    if isinstance(v, int | float):
        return f"a number ({v})"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    return "an object" if isinstance(v, dict) else type(v).__name__


def _missing(v: Any) -> bool:
    # parquet/pandas write an absent optional value (alpaca's `input`) as null or NaN
    return v is None or (isinstance(v, float) and math.isnan(v))


class _Normaliser:
    """Turns records into (messages, kind) for one format setting and column map."""

    def __init__(self, fmt: str, columns: dict[str, str]):
        if fmt != "auto" and fmt not in FORMATS:
            raise DataError(f"data.format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise DataError(
                f"data.columns: {', '.join(map(repr, unknown))} not canonical "
                f"({', '.join(COLUMNS)})"
            )
        self.fmt = fmt
        self.columns = columns
        # Names that make a JSON object a record, not a {"data": [...]} wrapper.
        self.record_keys = {self.key(f) for f, _ in _DETECT}
        implied = [fm for fm, fields in _FIELDS.items() if any(f in columns for f in fields)]
        self.implied = implied[0] if len(implied) == 1 else None

    def key(self, field: str) -> str:
        """The user's name for a canonical field."""
        return self.columns.get(field, field)

    def label(self, field: str) -> str:
        """How errors name a field: the user's column, and the data.columns entry if remapped."""
        k = self.key(field)
        return f"{k!r} (data.columns.{field})" if field in self.columns else repr(k)

    def __call__(self, record: Any) -> tuple[list[Message], str]:
        self.images: list[Any] = []  # this record's image references, in order
        if not isinstance(record, dict):
            raise _BadRow(f"expected an object, got {_describe(record)}")
        fmt = self.fmt if self.fmt != "auto" else self.detect(record)
        if fmt == "chat":
            return self.chat(record), "chat"
        if fmt == "sharegpt":
            return self.sharegpt(record), "chat"
        if fmt == "prompt_completion":
            return self.prompt_completion(record)
        if fmt == "instruction":
            return self.instruction(record), "chat"
        return self.text(record), "text"

    def detect(self, record: dict[str, Any]) -> str:
        for field, fmt in _DETECT:
            if self.key(field) in record:
                return fmt
        if self.implied:
            return self.implied
        fields = ", ".join(map(str, record)) or "none"
        raise _BadRow(
            f"cannot tell the format (fields: {fields}); accepted: {_SHAPES}; "
            "set data.format, or data.columns to map your field names"
        )

    def string(
        self, record: dict[str, Any], field: str, at: str = "", optional: bool = False
    ) -> str:
        """A string field; ``at`` prefixes errors inside a message list ("messages[2]: ")."""
        k = self.key(field)
        v = record.get(k)
        if isinstance(v, str):
            return _checked(v, at or f"field {self.label(field)}: ")
        if optional and _missing(v):
            return ""
        if k not in record:
            # the row's own fields show a typo or a needed data.columns entry at a glance
            has = "" if at else f"; the row has {', '.join(map(str, record)) or 'no fields'}"
            raise _BadRow(f"{at}missing field {self.label(field)}{has}")
        raise _BadRow(f"{at}field {self.label(field)} must be a string, got {_describe(v)}")

    def response(self, record: dict[str, Any], field: str) -> str:
        v = self.string(record, field)
        if not v.strip():
            raise _BadRow(f"field {self.label(field)}: empty response, nothing to train on")
        return v

    def message_list(
        self, record: dict[str, Any], field: str, role_f: str, content_f: str, roles: dict[str, str]
    ) -> list[Message]:
        k = self.key(field)
        if k not in record:
            raise _BadRow(f"missing field {self.label(field)}")
        msgs = record[k]
        if isinstance(msgs, str) and field in ("messages", "conversations"):
            # csv cells (and some parquet exports) hold the list as JSON text
            msgs = _json_text(msgs, f"field {self.label(field)}", "a list of messages")
        if not isinstance(msgs, list):
            raise _BadRow(
                f"field {self.label(field)} must be a list of messages, got {_describe(msgs)}"
            )
        if not msgs:
            raise _BadRow(f"field {self.label(field)} is an empty list")
        out: list[Message] = []
        for i, m in enumerate(msgs):
            at = f"{k}[{i}]"
            r_f, c_f = role_f, content_f
            if isinstance(m, dict) and self.key(r_f) not in m and self.key("role") in m:
                r_f, c_f = "role", "content"  # sharegpt lists written with role/content
            if not isinstance(m, dict):
                raise _BadRow(
                    f"{at}: expected an object with {self.key(r_f)!r} and {self.key(c_f)!r}, "
                    f"got {_describe(m)}"
                )
            role = self.string(m, r_f, f"{at}: ")
            if role not in roles:
                raise _BadRow(f"{at}.{self.key(r_f)}: {role!r} is not one of {', '.join(roles)}")
            role = roles[role]
            if role == "system" and i > 0:
                raise _BadRow(f"{at}.{self.key(r_f)}: a system message may only come first")
            ck = self.key(c_f)
            if role == "function_call":  # sharegpt: the value is the call's JSON
                call = m.get(ck)
                if isinstance(call, str):
                    call = _json_text(call, f"{at}.{ck}", "a function call object")
                out.append(
                    {"role": "assistant", "content": "", "tool_calls": _tool_calls(call, at)}
                )
                continue
            if ck not in m and role not in ("assistant", "tool"):
                self.string(m, c_f, f"{at}: ")  # the usual "missing field" message
            content = _content(
                m.get(ck), f"{at}.{ck}", optional=role in ("assistant", "tool"), images=self.images
            )
            msg: Message = {"role": role, "content": content}
            if role == "assistant":
                for name in ("reasoning_content", "thinking", "reasoning"):
                    r = m.get(name)
                    if isinstance(r, str) and r.strip():
                        msg["reasoning_content"] = _checked(r, f"{at}.{name}: ")
                        break
                calls = m.get("tool_calls")
                if calls is None and isinstance(m.get("function_call"), dict):  # OpenAI legacy
                    calls = [m["function_call"]]
                if calls:
                    msg["tool_calls"] = _tool_calls(calls, at)
                if not content.strip() and not msg.get("tool_calls"):
                    raise _BadRow(f"{at}.{ck}: empty assistant response")
            elif role == "tool":
                for name in ("tool_call_id", "name"):
                    if isinstance(m.get(name), str):
                        msg[name] = m[name]
            out.append(msg)
        return out

    def row_images(self, record: dict[str, Any], where: str) -> list[str] | None:
        """The record's images, resolved (:func:`resolve_image`): its image parts', else its
        ``images`` column's (LLaMA-Factory / ms-swift); None for a text-only row."""
        refs = list(self.images)
        column = record.get("images")
        if column is not None and not _missing(column) and not isinstance(column, str | dict):
            if refs:
                raise _BadRow("images given both as content parts and in the 'images' column")
            if not isinstance(column, list | tuple) and hasattr(column, "tolist"):
                column = column.tolist()  # a numpy array from parquet
            refs = list(column)
        elif isinstance(column, str | dict):
            refs = refs or [column]
        if not refs:
            return None
        base = Path(where.rsplit(":", 1)[0]).parent if ":" in where else Path(".")
        return [resolve_image(r, base.resolve(), f"images[{i}]") for i, r in enumerate(refs)]

    def tools(self, record: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The row's tool schemas (``tools`` field), each as {"type": "function", ...}."""
        v = record.get(self.key("tools"))
        if _missing(v) or v == "" or v == []:
            return None
        label = f"field {self.label('tools')}"
        if isinstance(v, str):
            v = _json_text(v, label, "a list of tool schemas")
        if isinstance(v, dict):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
            raise _BadRow(f"{label} must be a list of JSON schemas (objects), got {_describe(v)}")
        _checked(json.dumps(v, ensure_ascii=False), f"{label}: ")
        # Flat function schemas (LLaMA-Factory) become the OpenAI form templates expect.
        return [t if "type" in t else {"type": "function", "function": t} for t in v]

    def conversation(
        self, record: dict[str, Any], field: str, role_f: str, content_f: str, roles: dict[str, str]
    ) -> list[Message]:
        """A message list with at least one assistant turn."""
        out = self.message_list(record, field, role_f, content_f, roles)
        if not any(m["role"] == "assistant" for m in out):
            raise _BadRow(f"field {self.label(field)}: no assistant message, nothing to train on")
        return out

    def chat(self, record: dict[str, Any]) -> list[Message]:
        return self.conversation(record, "messages", "role", "content", CHAT_ROLES)

    def sharegpt(self, record: dict[str, Any]) -> list[Message]:
        return self.conversation(record, "conversations", "from", "value", SHAREGPT_ROLES)

    def prompt_completion(self, record: dict[str, Any]) -> tuple[list[Message], str]:
        p, c = record.get(self.key("prompt")), record.get(self.key("completion"))
        if isinstance(p, list) and isinstance(c, list):  # TRL conversational
            roles = CHAT_ROLES
            prompt = self.message_list(record, "prompt", "role", "content", roles)
            if any(m["role"] == "system" for m in prompt[1:]):
                raise _BadRow(f"field {self.label('prompt')}: a system message may only come first")
            completion = self.conversation(record, "completion", "role", "content", roles)
            if any(m["role"] == "system" for m in completion):
                raise _BadRow(f"field {self.label('completion')}: holds a system message")
            return prompt + completion, "chat"
        if isinstance(p, list) or isinstance(c, list):
            raise _BadRow(
                f"fields {self.label('prompt')} and {self.label('completion')} must both be "
                "strings or both be lists of messages"
            )
        prompt = self.string(record, "prompt")
        completion = self.response(record, "completion")
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ], "completion"

    def instruction(self, record: dict[str, Any]) -> list[Message]:
        instruction = self.string(record, "instruction")
        extra = self.string(record, "input", optional=True)
        output = self.response(record, "output")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]

    def text(self, record: dict[str, Any]) -> list[Message]:
        return [{"role": "assistant", "content": self.response(record, "text")}]


def _checked(s: str, at: str) -> str:
    """``s``, if it is valid Unicode text (JSON may hold unpaired surrogate escapes)."""
    bad = _SURROGATE.search(s)
    if bad:
        raise _BadRow(
            f"{at}an unpaired surrogate \\u{ord(bad.group()):04x} (not valid Unicode text)"
        )
    return s


def _json_text(s: str, label: str, expected: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise _BadRow(
            f"{label}: a string that is not valid JSON ({e.msg} at column {e.colno}); "
            f"expected {expected}"
        ) from None
    except RecursionError:
        raise _BadRow(f"{label}: JSON nested too deeply") from None


def _image_ref(part: dict[str, Any], at: str) -> Any:
    """The reference of an image part (``path``, ``url``, ``image`` or OpenAI's
    ``image_url.url``), unresolved."""
    for key in ("path", "url", "image", "image_url", "input_image"):
        v = part.get(key)
        if isinstance(v, dict) and key in ("image_url", "input_image"):
            v = v.get("url")
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return v
    raise _BadRow(f'{at}: an image part without its image ("path", "url" or "image")')


def resolve_image(ref: Any, base: Path, at: str) -> str:
    """An image reference as what the loader opens: an absolute path or a ``data:`` URI.

    Paths are relative to the data file's folder (``file://`` URLs are paths); bytes (a
    datasets Image value ``{"bytes", "path"}``) become a base64 ``data:`` URI. Remote URLs are
    refused: training reads local files only."""
    import base64

    if isinstance(ref, dict):  # datasets Image feature in parquet / save_to_disk
        if isinstance(ref.get("bytes"), bytes | bytearray):
            return "data:image;base64," + base64.b64encode(ref["bytes"]).decode()
        ref = ref.get("path")
    if isinstance(ref, bytes | bytearray):
        return "data:image;base64," + base64.b64encode(ref).decode()
    if not isinstance(ref, str):
        raise _BadRow(f"{at}: an image must be a path, a data: URI or bytes, got {_describe(ref)}")
    if ref.startswith("data:"):
        return ref
    if ref.startswith(("http://", "https://")):
        raise _BadRow(f"{at}: {ref}: remote images are not downloaded; save them and give paths")
    ref = ref.removeprefix("file://")
    return str(base / ref) if not Path(ref).is_absolute() else ref


def _content(v: Any, at: str, optional: bool = False, images: list[Any] | None = None) -> str:
    """Message content as text: a string, or text parts joined (an image part: the image
    placeholder, its reference appended to ``images``)."""
    if isinstance(v, str):
        return _checked(v, f"{at}: ")
    if _missing(v):
        if optional:
            return ""
        raise _BadRow(f"{at}: must be a string or a list of content parts, got null")
    if isinstance(v, list):
        texts: list[str] = []
        for j, part in enumerate(v):
            where = f"{at}[{j}]"
            kind = (
                part.get("type", "text" if "text" in part else None)
                if isinstance(part, dict)
                else None
            )
            if isinstance(part, dict) and kind in IMAGE_PARTS and images is not None:
                images.append(_image_ref(part, where))
                texts.append(IMAGE_PLACEHOLDER)
                continue
            if kind in MEDIA_PARTS or (
                isinstance(part, dict) and any(k in part for k in MEDIA_PARTS[:-1])
            ):
                raise _BadRow(
                    f"{where}: {kind or 'media'} parts are not supported (dsft trains on text "
                    "and images)"
                )
            if kind != "text" or not isinstance(part.get("text"), str):
                raise _BadRow(
                    f'{where}: expected a text part {{"type": "text", "text": ...}}, '
                    f"got {_describe(part) if not isinstance(part, dict) else repr(kind)}"
                )
            texts.append(_checked(part["text"], f"{where}.text: "))
        return "".join(texts)
    if isinstance(v, dict) and optional:  # a tool result given as an object
        return json.dumps(v, ensure_ascii=False)
    raise _BadRow(f"{at}: must be a string or a list of content parts, got {_describe(v)}")


def _tool_calls(v: Any, at: str) -> list[dict[str, Any]]:
    """Tool calls as {"type": "function", "function": {"name", "arguments"}} (+ "id")."""
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        raise _BadRow(f"{at}.tool_calls must be a list of calls, got {_describe(v)}")
    out = []
    for k, tc in enumerate(v):
        where = f"{at}.tool_calls[{k}]"
        fn = tc.get("function", tc) if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            raise _BadRow(f'{where}: expected {{"function": {{"name", "arguments"}}}}')
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _BadRow(f"{where}: missing the function name")
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str) and args.strip():
            # Kept as written (DeepSeek's templates concatenate the JSON text, others need
            # an object): checked only.
            _json_text(args, f"{where}.arguments", "a JSON object")
        elif isinstance(args, str):
            args = {}
        if _missing(args):
            args = {}
        _checked(json.dumps(args, ensure_ascii=False), f"{where}.arguments: ")
        call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(tc, dict) and isinstance(tc.get("id"), str):
            call["id"] = tc["id"]
        out.append(call)
    return out


def load_examples(
    paths: list[str],
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    on_bad_row: str = "error",
) -> Loaded:
    """All examples of all files, in file order.

    ``on_bad_row="error"`` raises on the first bad row; ``"skip"`` leaves bad rows out and
    lists them in :attr:`Loaded.skipped`. A missing, empty or unreadable file raises either
    way, and so does a file whose rows are all bad.
    """
    norm = normaliser(fmt, columns, on_bad_row)
    examples: list[Example] = []
    skipped: list[str] = []
    for path in map(str, paths):
        n = len(examples)
        bad: list[str] = []
        for item in examples_of(read_rows(path, norm.record_keys), norm, on_bad_row):
            if isinstance(item, str):
                bad.append(item)
            else:
                examples.append(item)
        check_not_empty(path, len(examples) - n, bad)
        skipped.extend(bad)
    return Loaded(examples, skipped)


def normaliser(fmt: str, columns: dict[str, str] | None, on_bad_row: str) -> _Normaliser:
    """The record normaliser for ``data.format`` / ``data.columns`` (settings checked here)."""
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row: {on_bad_row!r} is not one of error, skip")
    return _Normaliser(fmt, dict(columns or {}))


def examples_of(rows: Iterable[Row], norm: _Normaliser, on_bad_row: str) -> Iterator[Example | str]:
    """The examples of ``rows`` in order, streamed; a bad row raises (``on_bad_row="error"``)
    or comes back as its ``"file:line: reason"`` string (``"skip"``)."""
    for row in rows:
        try:
            if row.error is not None:
                raise _BadRow(row.error)
            messages, kind = norm(row.record)
            tools = norm.tools(row.record) if kind == "chat" else None
            images = norm.row_images(row.record, row.where)
        except _BadRow as e:
            if on_bad_row == "error":
                raise DataError(f"{row.where}: {e}") from None
            yield f"{row.where}: {e}"
            continue
        yield Example(messages, row.where, kind, tools, images)


def check_not_empty(path: str, examples: int, bad: list[str]) -> None:
    """A file that gave no example is an error, whatever the bad-row policy."""
    if examples:
        return
    if not bad:
        raise DataError(f"{path}: no rows (the file is empty)")
    raise DataError(
        f"{path}: all {len(bad)} rows are bad; the first ones:\n  " + "\n  ".join(bad[:5])
    )


def read_jsonl(path: str | Path, fmt: str = "auto") -> list[Example]:
    """The examples of one file (any supported type), failing on the first bad row."""
    return load_examples([str(path)], fmt).examples


@dataclass
class Survey:
    """What a set of files holds (``dsft init``): rows per format, bad rows, a sample."""

    formats: dict[str, int]  # detected (or forced) format -> rows
    rows: int  # good rows
    bad: list[str]  # "file:line: reason" of every bad row
    sample: list[Example]  # up to ``limit`` good examples, spread over the files


def survey(
    paths: list[str], fmt: str = "auto", columns: dict[str, str] | None = None, limit: int = 2000
) -> Survey:
    """Read every row once: count formats and bad rows, keep a sample of examples."""
    norm = _Normaliser(fmt, dict(columns or {}))
    formats: dict[str, int] = {}
    bad: list[str] = []
    sample: list[Example] = []
    rows = 0
    per_file = max(1, limit // max(1, len(paths)))
    for path in map(str, paths):
        kept = 0
        for row in read_rows(path, norm.record_keys):
            try:
                if row.error is not None:
                    raise _BadRow(row.error)
                messages, kind = norm(row.record)
                name = norm.fmt if norm.fmt != "auto" else norm.detect(row.record)
            except _BadRow as e:
                bad.append(f"{row.where}: {e}")
                continue
            formats[name] = formats.get(name, 0) + 1
            rows += 1
            if kept < per_file:
                sample.append(Example(messages, row.where, kind))
                kept += 1
    return Survey(formats, rows, bad, sample)
