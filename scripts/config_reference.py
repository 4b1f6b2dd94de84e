"""The configuration reference, generated from the config dataclasses' field comments.

Every key's row (type, default, what it does) comes from the schema itself: the walk starts at
the root ``Config`` class and follows ``dataclasses.fields`` into every nested dataclass; each
class's comments are read from its own source (``inspect.getsource``), wherever the class lives.
A field's text is the comment block right above it plus the comment at the end of its line(s).
A new field therefore appears here with no manual step, and a removed one disappears.

``make docs`` puts the tables into docs/configuration.md (scripts/mkdocs_hooks.py replaces the
``<!-- config-reference -->`` line); ``python scripts/config_reference.py`` prints them.
tests/unit/test_docs.py checks that the reference and the schema hold the same keys.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    key: str  # dotted key, e.g. "train.lr"
    type: str
    default: str
    text: str


@dataclass(frozen=True)
class Section:
    prefix: str  # "" for the top level, else the dotted path of the nested dataclass
    doc: str
    rows: tuple[Row, ...]


def root_config() -> type:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from dsft.config import Config

    return Config


def _comments_by_line(source: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _format_type(node: ast.expr) -> str:
    """Literal["a", "b"] -> "a" or "b", X | Y -> X or Y (no pipe in a table cell); else as written."""
    if isinstance(node, ast.Subscript):
        base = ast.unparse(node.value)
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base.split(".")[-1] == "Literal":
            return " or ".join(json.dumps(ast.literal_eval(i)) for i in items)
        return f"{base}[{', '.join(_format_type(i) for i in items)}]"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return f"{_format_type(node.left)} or {_format_type(node.right)}"
    return ast.unparse(node)


def field_sources(cls: type) -> dict[str, tuple[str, str]]:
    """Field name -> (type as written, comment text) from the class's own source."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = _comments_by_line(source)
    classdef = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    out: dict[str, tuple[str, str]] = {}
    for stmt in classdef.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        line = stmt.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        end = stmt.end_lineno or stmt.lineno
        trailing = [comments[n] for n in range(stmt.lineno, end + 1) if n in comments]
        text = " ".join(c for c in above + trailing if c)
        out[stmt.target.id] = (_format_type(stmt.annotation), text)
    return out


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return repr(value)


def sections(root: type | None = None) -> list[Section]:
    """The schema as sections, depth first: the top level, then each nested dataclass."""
    out: list[Section] = []

    def walk(cls: type, prefix: str) -> None:
        written = field_sources(cls)
        rows: list[Row] = []
        nested: list[tuple[type, str]] = []
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            # A section is a field whose default is a dataclass (default_factory=LoraConfig).
            if f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
                if dataclasses.is_dataclass(value):
                    nested.append((type(value), key))
                    continue
            type_text, text = written.get(f.name, (str(f.type), ""))
            rows.append(Row(key, type_text, _default(f), text))
        doc = inspect.cleandoc(cls.__doc__ or "") if cls.__doc__ else ""
        if doc.startswith(f"{cls.__name__}("):  # dataclass's generated signature, not a docstring
            doc = ""
        out.append(Section(prefix, doc, tuple(rows)))
        for sub, key in nested:
            walk(sub, key)

    walk(root or root_config(), "")
    return out


def keys(root: type | None = None) -> list[str]:
    return [row.key for section in sections(root) for row in section.rows]


def _escape(text: str) -> str:
    """Markdown-safe table-cell text: code spans kept, emphasis and HTML characters escaped."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        p = parts[i].replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
        parts[i] = p.replace("<", "&lt;").replace(">", "&gt;").replace("_", "\\_")
    if len(parts) % 2 == 0:  # an unpaired backtick: keep it literal
        return "\\`".join(parts)
    return "`".join(parts)


def render(root: type | None = None) -> str:
    lines: list[str] = []
    for section in sections(root):
        if not section.rows:
            continue
        lines.append(f"### {section.prefix or 'Top level'}")
        lines.append("")
        if section.doc:
            lines.append(_escape(section.doc.splitlines()[0]))
            lines.append("")
        lines.append("| key | type | default | what it does |")
        lines.append("|---|---|---|---|")
        for row in section.rows:
            default = f"`{row.default}`" if row.default else ""
            lines.append(f"| `{row.key}` | `{row.type}` | {default} | {_escape(row.text)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
