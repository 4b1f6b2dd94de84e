"""The CLI (dsft/cli.py): user mistakes give one clear message and exit code 2, never a
traceback; `python -m dsft train` and `dsft launch` reach the train command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dsft.cli import main

from ..conftest import ROOT, base_config, cpu_env, write_config


def test_bad_config_exits_2_with_all_problems(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lrr: 1\nmodel:\n  path: /nope\n")
    rc = main(["train", str(cfg), "deepspeed.zero_stage=7"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.lrr: unknown key" in err and "Traceback" not in err


def test_bad_data_row_names_file_and_line(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model, data, tmp_path / "out"))
    proc = subprocess.run(
        [sys.executable, "-m", "dsft", "train", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        # A stale rendezvous address in the shell (TEST-NET, unroutable) must not stall a
        # plain process: one rank rendezvouses in memory, it never dials MASTER_ADDR.
        env={**cpu_env(), "MASTER_ADDR": "192.0.2.1", "MASTER_PORT": "9"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{data}:2: missing field 'output'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_python_m_dsft_train_is_dsft_train(tmp_path: Path) -> None:
    """`python -m dsft train` (what launch/*.sh and torchrun -m run) is `dsft train`."""
    bad = tmp_path / "c.yaml"
    bad.write_text("train:\n  lrr: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dsft", "train", str(bad), "train.epochs=0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "train.lrr: unknown key" in proc.stderr


def test_dsft_launch_picks_torchrun(tiny_model: Path, tiny_data: Path, tmp_path, monkeypatch):
    from dsft import distributed

    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model, tiny_data, tmp_path / "o"))
    calls = []
    monkeypatch.setattr(distributed, "launch_local", lambda n, args: calls.append((n, args)) or 0)
    assert main(["launch", str(cfg), "--nproc", "3", "train.lr=1e-3"]) == 0
    assert calls == [(3, ["train", str(cfg), "train.lr=1e-3"])]
    assert main(["launch", str(cfg), "train.lr=oops"]) == 2  # validated before launching
