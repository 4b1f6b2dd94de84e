"""MkDocs hooks (mkdocs.yml `hooks:`): the configuration reference, generated at build time.

docs/configuration.md holds a `<!-- config-reference ... -->` line; the tables that
scripts/config_reference.py renders from the config dataclasses replace it, so the site's
reference cannot drift from the schema. A page without the line fails the build.
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


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    return expand(markdown)
