"""The launch/ wrappers (torchrun, deepspeed, mpirun, srun) hand their arguments over
verbatim. A real 2-rank run through each: tests/integration/test_e2e.py."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from ..conftest import ROOT


@pytest.mark.parametrize(
    ("script", "tool"),
    [("torchrun", "torchrun"), ("deepspeed", "deepspeed"), ("mpirun", "mpirun"), ("srun", "srun")],
)
def test_launch_scripts_pass_arguments_through(script: str, tool: str, tmp_path: Path) -> None:
    """launch/*.sh hand their arguments over verbatim (no shell string is ever built)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "deepspeed", "mpirun", "srun", "python"):
        fake = bin_dir / name
        fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name}" "$@"\n')
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    tricky = ["my cfg.yaml", "train.lr=2e-5", "data.path=[a b.jsonl]", "$(touch pwned)", "*"]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": "python"}
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / f"{script}.sh"), "2", *tricky],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()
    assert argv[0] == tool and argv[-len(tricky) :] == tricky
    assert argv[-len(tricky) - 2 : -len(tricky)] == ["dsft", "train"]
    assert not (tmp_path / "pwned").exists()
