"""The README front door and the docs/ site stay true: links and anchors resolve, the generated
configuration reference holds exactly the schema's keys, the make targets and layout paths the
README names exist. Pure Python and fast; the one test that builds the site with MkDocs skips
where MkDocs is not installed (`pip install -e '.[docs]'`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import unicodedata
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from dsft.config import Config

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CONFIG_PAGE = DOCS / "configuration.md"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"dsft_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


HOOKS = _load("mkdocs_hooks")
REFERENCE = _load("config_reference")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@cache
def _text(path: Path) -> str:
    """A page as the site renders it (the configuration page with its generated reference)."""
    text = path.read_text(encoding="utf-8")
    return HOOKS.expand(text) if path == CONFIG_PAGE else text


def _prose(text: str) -> str:
    """Text outside fenced code blocks and inline code spans."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slugs(heading: str) -> set[str]:
    """The anchor of a heading on the site (Python-Markdown's toc) and on GitHub."""
    explicit = re.search(r"\{#([^}\s]+)\}\s*$", heading)
    if explicit:
        return {explicit.group(1)}
    plain = re.sub(r"[`*]", "", heading).strip()
    site = unicodedata.normalize("NFKD", plain).encode("ascii", "ignore").decode()
    site = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", site).strip().lower())
    github = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
    return {site, github}


@cache
def _anchors(path: Path) -> tuple[set[str], set[str]]:
    """(site anchors, GitHub anchors) of a page's headings."""
    site: set[str] = set()
    github: set[str] = set()
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", _text(path), flags=re.M | re.S)
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M):
        slugs = _slugs(match.group(1))
        explicit = len(slugs) == 1
        (a, b) = (next(iter(slugs)),) * 2 if explicit else sorted(slugs, key=lambda s: "--" in s)
        site.add(a)
        github.add(b)
    return site, github


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(_text(path)))


def test_every_relative_link_and_anchor_in_the_readme_and_docs_resolves() -> None:
    broken: list[str] = []
    for page in _pages():
        for target in _links(page):
            if re.match(r"^[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
                continue
            where = f"{page.relative_to(ROOT)}: ({target})"
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{where}: no such file")
                continue
            if page.is_relative_to(DOCS) and not dest.is_relative_to(DOCS):
                broken.append(f"{where}: outside docs/, which the site cannot serve (use `code`)")
                continue
            if anchor and dest.suffix == ".md":
                site, github = _anchors(dest)
                if anchor not in site or anchor not in github:
                    broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_finds_a_broken_file_and_anchor(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# Title\n\n## A `code` heading\n\n[x](missing.md) [y](#a-code-heading)\n")
    assert _links(page) == ["missing.md", "#a-code-heading"]
    assert "a-code-heading" in _anchors(page)[0] and "a-code-heading" in _anchors(page)[1]
    assert _slugs("dsft — distributed") == {"dsft-distributed", "dsft--distributed"}
    assert _links_in("`[not](a-link.md)`\n```\n[nor](this.md)\n```\n") == []


def _links_in(text: str) -> list[str]:
    return LINK.findall(_prose(text))


def _schema_keys(obj: object, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _schema_keys(value, f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


def _reference_keys(markdown: str) -> set[str]:
    return set(re.findall(r"^\| `([\w.]+)` \| `", markdown, flags=re.M))


def test_the_generated_configuration_reference_holds_exactly_the_schema_keys() -> None:
    schema = _schema_keys(Config())
    page = _text(CONFIG_PAGE)
    generated = _reference_keys(page[page.index("## Every key") :])
    assert generated - schema == set(), f"in the reference, not in the schema: {generated - schema}"
    assert schema - generated == set(), f"in the schema, not in the reference: {schema - generated}"
    assert set(REFERENCE.keys()) == schema


def test_the_reference_reads_each_field_comment_from_the_source() -> None:
    rows = {row.key: row for section in REFERENCE.sections() for row in section.rows}
    # A trailing comment, a comment block above the field, and a comment inside a wrapped value.
    assert rows["train.max_grad_norm"].text == "0 disables clipping"
    assert rows["data.template"].text.startswith('Chat template: "" = the tokenizer\'s own;')
    assert "recompute activations" in rows["model.gradient_checkpointing"].text
    assert rows["train.precision"].type == '"fp32" or "bf16" or "fp16"'
    assert rows["train.micro_batch"].default == "4"
    assert rows["model.lora.target_modules"].default == '["all-linear"]'


def test_a_new_config_field_appears_in_the_reference_by_itself() -> None:
    @dataclasses.dataclass
    class Inner:
        depth: int = 3  # how deep

    @dataclasses.dataclass
    class Root:
        # A field added later, with its comment above.
        fresh: str = "x"
        inner: Inner = dataclasses.field(default_factory=Inner)

    text = REFERENCE.render(Root)
    assert '| `fresh` | `str` | `"x"` | A field added later, with its comment above. |' in text
    assert "| `inner.depth` | `int` | `3` | how deep |" in text


def test_the_configuration_page_names_only_schema_keys() -> None:
    """The hand-written tables above the generated reference: each key in a first column."""
    schema = _schema_keys(Config())
    page = CONFIG_PAGE.read_text(encoding="utf-8")
    unknown: list[str] = []
    for cell in re.findall(r"^\| ([^|\n]*`[^|\n]*) \|", page, flags=re.M):
        prefix = ""
        for token in re.findall(r"`([^`]+)`", cell):
            key = token if "." in token or token in schema else f"{prefix}{token}"
            prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
            if key not in schema:
                unknown.append(key)
    assert not unknown, f"docs/configuration.md names keys the schema lacks: {unknown}"


def _schema_defaults(obj: object, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _schema_defaults(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def test_the_defaults_the_configuration_page_states_are_the_schema_defaults() -> None:
    """| `a.b`, `a.c` | `x`, `y` | note |: each stated default, read as YAML, is the schema's."""
    defaults = _schema_defaults(Config())
    page = CONFIG_PAGE.read_text(encoding="utf-8")
    page = page[: page.index("## Every key")]
    wrong: list[str] = []
    for key_cell, default_cell in re.findall(r"^\| (`[^|\n]*) \| ([^|\n]*) \|", page, flags=re.M):
        stated = re.findall(r"`([^`]*)`", default_cell)
        prefix, keys = "", []
        for token in re.findall(r"`([^`]+)`", key_cell):
            key = token if "." in token or token in defaults else f"{prefix}{token}"
            prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
            keys.append(key)
        for key, text in zip(keys, stated, strict=False):
            if key in defaults and yaml.safe_load(text or '""') != defaults[key]:
                wrong.append(f"{key}: the page says {text!r}, the schema {defaults[key]!r}")
    assert not wrong, "docs/configuration.md:\n" + "\n".join(wrong)


def test_escaped_pipes_in_table_code_render_without_their_backslash() -> None:
    row = "| `<\\|eot_id\\|>` | a \\| b |"
    assert HOOKS.table_code_pipes(row) == "| `<|eot_id|>` | a \\| b |"
    fenced = "```\n| `<\\|x` |\n```"
    assert HOOKS.table_code_pipes(fenced) == fenced


def test_the_configuration_page_has_one_marker_for_the_reference() -> None:
    assert HOOKS.expand(CONFIG_PAGE.read_text()).count("| `train.lr` |") == 1
    with pytest.raises(ValueError, match="exactly one"):
        HOOKS.expand("# no marker\n")


def test_every_make_target_the_docs_name_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))
    named = {
        (page.name, t)
        for page in _pages()
        for t in re.findall(r"(?:^|`)make ([a-z][\w-]*)", _text(page), flags=re.M)
    }
    assert {"demo", "test", "check", "docs"} <= {t for _, t in named}
    assert not [n for n in named if n[1] not in targets], named


def test_the_readme_opens_with_its_two_commands_and_stays_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    head = "\n".join(lines[:8])
    assert "make demo" in head and "make test" in head
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move detail to docs/"


def test_every_path_in_the_readme_layout_exists() -> None:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout") :]
    start = block.index("```\n") + 4
    block = block[start : block.index("```", start)]
    parents: list[str] = []
    missing: list[str] = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent >= 20:  # a description's continuation line
            continue
        depth, token = indent // 2, line.split()[0]
        path = "".join(parents[:depth]) + token
        parents[depth:] = [path[len("".join(parents[:depth])) :]] if token.endswith("/") else []
        if not list(ROOT.glob(path.rstrip("/"))):
            missing.append(path)
    assert not missing, f"README Layout names paths that do not exist: {missing}"


REPO_PATH = re.compile(
    r"`((?:dsft|benchmarks|tests|launch|slurm|scripts|ds_configs|docs|\.ci)/[^`\s]*)`"
)


def test_every_repository_path_the_docs_name_exists() -> None:
    """`dsft/loss.py`, `tests/cluster/slurm_cluster.py`...: a moved or renamed file shows here."""
    stale = [
        f"{page.relative_to(ROOT)}: {path}"
        for page in _pages()
        for path in REPO_PATH.findall(_text(page))
        if not re.search(r"[*<>{}$]", path)
        and not (ROOT / path.split("::")[0].rstrip(",.:;")).exists()
    ]
    assert not stale, "paths that do not exist:\n" + "\n".join(stale)


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = (tmp_path / "configuration" / "index.html").read_text()
    assert "<code>train.lr</code>" in html
    # No nav in mkdocs.yml: every page is in the site's navigation, named in page_order or not.
    home = (tmp_path / "index.html").read_text()
    links = set(re.findall(r'<a href="([^"]+)" class="md-nav__link', home))
    for page in DOCS.rglob("*.md"):
        url = page.relative_to(DOCS).with_suffix("").as_posix() + "/"
        url = "." if url == "index/" else url.removesuffix("index/")
        assert url in links, f"{page.relative_to(ROOT)} is not in the site's navigation"
