"""A Hub model name and a Hub dataset name train end to end from a local Hub cache, offline
(HF_HUB_OFFLINE=1); an uncached name is a one-line error with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import base_config, read_summary, run_dsft, write_config
from ..unit.test_hub import build_hub_cache


@pytest.mark.slow
def test_train_from_hub_names_offline(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    rows = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    build_hub_cache(cache, tiny_model, rows)
    out = tmp_path / "run"
    tree = base_config(
        Path("dsft-test/tiny-llama"),
        Path("dsft-test/tasks?split=train"),
        out,
        train={"max_steps": 4},
        eval={"generate": False},
        checkpoint={"export": True},
    )
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_dsft(["train", str(write_config(tmp_path / "c.yaml", tree))], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(out)
    assert summary["data"]["examples"] == len(rows) // 2
    assert (out / "final" / "config.json").is_file()
    # the run records the names as given
    saved = (out / "config.yaml").read_text()
    assert "dsft-test/tiny-llama" in saved and "dsft-test/tasks?split=train" in saved


def test_cli_exit_2_for_an_uncached_name(tmp_path: Path, tiny_data: Path) -> None:
    cfg = write_config(
        tmp_path / "c.yaml", base_config(Path("dsft-test/absent"), tiny_data, tmp_path / "run")
    )
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1"}
    proc = run_dsft(["data", "inspect", str(cfg)], env=env, timeout=120)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsft: error:")]
    assert len(err) == 1 and "'dsft-test/absent' is not in the Hugging Face cache" in err[0]
    assert "Traceback" not in proc.stderr
