"""The tree a newcomer reads: no stray file in git (an inspect dump, a scratch note at the
root), and one name per module: no two modules of dsft/ and benchmarks/ share a file name
(two train.py, two export.py and two bench.py made every "open train.py" a guess)."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What the repository root holds; a new top-level file or folder is a decision, made here.
ROOT_FILES = {".gitignore", "Makefile", "README.md", "pyproject.toml", "mkdocs.yml", "LICENSE"}
ROOT_FOLDERS = {".ci", ".github", "benchmarks", "docs", "ds_configs", "dsft", "launch",
                "scripts", "slurm", "tests"}  # fmt: skip
# Per folder, what its files may be (launch/: the launch wrappers; slurm/: sbatch scripts).
FOLDER_SUFFIXES = {"launch": {".sh"}, "slurm": {".sbatch"}, "ds_configs": {".json", ".md"}}
PACKAGES = ("dsft", "benchmarks")


def _tracked() -> list[str]:
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    # a file deleted in the work tree but not yet in git is not part of the tree being tested
    return [p for p in proc.stdout.decode().split("\0") if p and (ROOT / p).exists()]


def stray_files(paths: list[str]) -> list[str]:
    """Tracked paths outside the layout: unknown root files or folders, files of the wrong kind
    in launch/, slurm/ and ds_configs/, and caches or editor leftovers anywhere."""
    bad = []
    for p in paths:
        parts = Path(p).parts
        name = parts[-1]
        if len(parts) == 1:
            if name not in ROOT_FILES:
                bad.append(p)
        elif (
            parts[0] not in ROOT_FOLDERS
            or (parts[0] in FOLDER_SUFFIXES and Path(p).suffix not in FOLDER_SUFFIXES[parts[0]])
            or "__pycache__" in parts
            or name.endswith((".pyc", ".orig", ".rej", "~", ".swp"))
        ):
            bad.append(p)
    return bad


def duplicate_module_names(paths: list[str]) -> dict[str, list[str]]:
    """Module names used twice in dsft/ and benchmarks/: two files, or a file and a package
    (``__init__``/``__main__`` excepted: every package has its own)."""
    seen: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        path = Path(p)
        if path.parts[0] not in PACKAGES or path.suffix not in (".py", ".sh"):
            continue
        if path.stem not in ("__init__", "__main__"):
            seen[path.stem].append(p)
        if path.name == "__init__.py" and len(path.parts) > 2:  # a subpackage: dsft/data/
            seen[path.parent.name].append(str(path.parent) + "/")
    return {name: sorted(set(files)) for name, files in seen.items() if len(set(files)) > 1}


def test_no_stray_file_in_git() -> None:
    assert not stray_files(_tracked()), "outside the layout (see tests/unit/test_tree.py)"


def test_no_two_modules_share_a_name() -> None:
    assert not duplicate_module_names(_tracked())


def test_the_checks_catch_what_they_are_for() -> None:
    assert stray_files(["INSPECT_QWEN3.txt", "notes/x.md", "launch/setup.sh.bak",
                        "dsft/__pycache__/a.pyc", "slurm/run.sh"]) == [
        "INSPECT_QWEN3.txt", "notes/x.md", "launch/setup.sh.bak", "dsft/__pycache__/a.pyc",
        "slurm/run.sh"]  # fmt: skip
    assert stray_files(["README.md", "dsft/cli.py", "launch/torchrun.sh"]) == []
    dup = duplicate_module_names(["dsft/train.py", "dsft/recipes/train.py", "dsft/data/__init__.py",
                                  "benchmarks/data.py", "dsft/__init__.py", "benchmarks/__init__.py",
                                  "dsft/cli.py"])  # fmt: skip
    assert dup == {"train": ["dsft/recipes/train.py", "dsft/train.py"],
                   "data": ["benchmarks/data.py", "dsft/data/"]}  # fmt: skip
