"""CLI: user mistakes give one clear message and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dsft.cli import main
from dsft.ds_config import presets

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


def test_ds_config_is_generated_from_typed_config(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    cfg = write_config(tmp_path / "c.yaml", base_config(tiny_model, tiny_data, tmp_path / "o"))
    assert (
        main(
            [
                "ds-config",
                str(cfg),
                "deepspeed.zero_stage=3",
                "train.max_grad_norm=0",
                "train.global_batch=32",
                "--world-size",
                "2",
            ]
        )
        == 0
    )
    ds = json.loads(capsys.readouterr().out)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed's own default would be 1.0
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (4, 4, 32)


def test_shipped_presets_match_the_generator() -> None:
    """ds_configs/*.json are regenerated from dsft's defaults; they never drift."""
    for name, expected in presets().items():
        assert json.loads((ROOT / "ds_configs" / f"{name}.json").read_text()) == expected, name
