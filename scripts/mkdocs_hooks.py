"""MkDocs hooks (mkdocs.yml `hooks:`): the generated configuration reference, the page order.

docs/configuration.md holds a `<!-- config-reference ... -->` line; the tables that
scripts/config_reference.py renders from the config dataclasses replace it, so the site's
reference cannot drift from the schema. A page without the line fails the build.

mkdocs.yml has no `nav:`, so every page under docs/ is in the navigation by itself; MkDocs
would order it by file name. `extra.page_order` in mkdocs.yml lists the pages in reading
order; pages it does not name follow them by file name, then the sections (docs/results/).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- config-reference"
PAGE = "configuration.md"


def _generator() -> Any:
    path = Path(__file__).with_name("config_reference.py")
    spec = importlib.util.spec_from_file_location("dsft_config_reference", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def expand(markdown: str) -> str:
    """The page with its marker line replaced by the generated reference."""
    lines = markdown.splitlines()
    at = [i for i, line in enumerate(lines) if line.strip().startswith(MARKER)]
    if len(at) != 1:
        raise ValueError(f"docs/{PAGE} needs exactly one '{MARKER} ... -->' line, has {len(at)}")
    lines[at[0]] = _generator().render()
    return "\n".join(lines) + "\n"


def table_code_pipes(markdown: str) -> str:
    """`<\\|eot_id\\|>` in a table row -> `<|eot_id|>`. GitHub needs the backslash even inside a
    code span in a table; Python-Markdown splits cells outside code spans only and would show it."""
    out, fence = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        if not fence and line.lstrip().startswith("|") and "\\|" in line:
            parts = line.split("`")
            for i in range(1, len(parts), 2):  # inside code spans
                parts[i] = parts[i].replace("\\|", "|")
            line = "`".join(parts)
        out.append(line)
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == PAGE:
        markdown = expand(markdown)
    return table_code_pipes(markdown)


def _ordered(items: list[Any], order: list[str]) -> list[Any]:
    def key(item: Any) -> tuple[int, int, str]:
        src = item.file.src_uri if getattr(item, "is_page", False) else ""
        if src in order:
            return (0, order.index(src), "")
        return (2, 0, item.title or "") if getattr(item, "is_section", False) else (1, 0, src)

    return sorted(items, key=key)


def on_nav(nav: Any, config: Any, **kwargs: Any) -> Any:
    order = list((config.get("extra") or {}).get("page_order") or [])
    nav.items = _ordered(nav.items, order)
    pages: list[Any] = []

    def walk(items: list[Any]) -> None:
        for item in items:
            if getattr(item, "is_page", False):
                pages.append(item)
            walk(getattr(item, "children", None) or [])

    walk(nav.items)
    nav.pages = pages
    for before, page, after in zip([None, *pages[:-1]], pages, [*pages[1:], None], strict=True):
        page.previous_page, page.next_page = before, after
    return nav
