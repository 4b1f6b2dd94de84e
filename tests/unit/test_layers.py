"""The layering rules written in the README's "Layout" section: no import cycles inside
dsft/, no library module importing a command (dsft/recipes/), no recipe importing another,
and the CLI importing neither the benchmark nor TRL."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "dsft"
BOTTOM = {
    "dsft.errors",
    "dsft.flops",  # formulas and a table; imports nothing from dsft
    "dsft.config",
    "dsft.config.schema",
    "dsft.config.loading",
    "dsft.config.batch",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every dsft module -> the dsft modules it imports (at any depth of the file)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from dsft import data` imports dsft.data; `from dsft.x import f` dsft.x
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "dsft":
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles() -> None:
    assert _cycle(_imports()) is None, f"import cycle: {' -> '.join(_cycle(_imports()) or [])}"


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_commands_are_leaves() -> None:
    graph = _imports()
    bad = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        for d in deps
        if d.startswith("dsft.recipes.") and m not in ("dsft.cli",)
    ]
    assert not bad, bad
    # the bottom layer imports nothing from dsft but the bottom
    assert all(d in BOTTOM for m in BOTTOM for d in graph[m]), {m: graph[m] for m in BOTTOM}


def test_cli_imports_no_benchmark_and_no_trl() -> None:
    code = (
        "import sys, dsft.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('trl', 'benchmarks')]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_layout_names_every_module() -> None:
    """README "Layout" has a line for every module of dsft/ and benchmarks/ and every
    top-level folder, so it stays true to the tree."""
    root = PKG.parent
    text = (root / "README.md").read_text()
    block = text[text.index("## Layout") :]
    block = block[block.index("```") : block.index("```", block.index("```") + 3)]
    names = {line.split()[0].rstrip("/") for line in block.splitlines()[1:] if line.strip()}
    files = [
        p
        for folder in ("dsft", "benchmarks")
        for p in (root / folder).rglob("*")
        if p.suffix in (".py", ".sh") and "__pycache__" not in p.parts
    ]
    missing = [str(p.relative_to(root)) for p in files if p.name not in names]
    folders = {"dsft", "benchmarks", "tests", "slurm", "ds_configs", "data", "eval", "recipes"}
    missing += sorted(folders - names)
    assert not missing, f"README Layout lacks: {missing}"
