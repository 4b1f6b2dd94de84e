"""The README's main job: the demo really learns, on the real path, with no download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsft.synthetic import DEMO_DATA, generate_tasks

from ..conftest import run_dsft


def test_bundled_dataset_is_the_generator_output() -> None:
    rows = [json.loads(x) for x in DEMO_DATA.read_text().splitlines()]
    assert rows == generate_tasks()
    assert {r["instruction"] for r in rows} == {"Reverse", "Sort", "Capitalise", "Add"}


@pytest.mark.slow
def test_demo_learns_the_tasks(tmp_path: Path) -> None:
    proc = run_dsft(["demo", "--workdir", str(tmp_path)])
    assert proc.returncode == 0
    assert "test exact match" in proc.stdout
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["before"]["test"]["exact_match"] < 0.05
    assert s["after"]["test"]["exact_match"] >= 0.5
    assert s["after"]["test"]["examples"] == 200
    assert s["after"]["val"]["loss"] < s["before"]["val"]["loss"] / 4
    assert (tmp_path / "model" / "config.json").is_file()  # a normal from_pretrained dir
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
