"""Real runs (one tiny trained run shared by every test): code planted in a checkpoint never
runs on export or resume, export takes trust_remote_code from the user only, a damaged
newest checkpoint is skipped on resume, a busy output_dir and a changed resume are
refused with one line, and a Hub name that is not available is one line (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsft import checkpoint

from ..conftest import base_config, run_dsft, write_config
from ..unit.test_checkpoint_safety import Evil

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tiny_data: Path, tmp_path_factory) -> Path:
    """A 4-step ZeRO-0 run with checkpoints at steps 2 and 4 (kept both)."""
    tmp = tmp_path_factory.mktemp("trained")
    tree = base_config(
        tiny_model,
        tiny_data,
        tmp / "run",
        train={"max_steps": 4},
        eval={"generate": False, "before_training": False},
        checkpoint={"every": 2, "keep_last": 0, "export": False},
    )
    cfg = write_config(tmp / "c.yaml", tree)
    assert run_dsft(["train", str(cfg)]).returncode == 0
    return tmp


def _copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run and a config whose output_dir is the copy."""
    out = tmp_path / "run"
    shutil.copytree(trained / "run", out)
    tree = json.loads(json.dumps(__import__("yaml").safe_load((trained / "c.yaml").read_text())))
    tree["output_dir"] = str(out)
    return out, write_config(tmp_path / "c.yaml", tree)


def _rewrite(tag: Path, name: str, edit) -> None:
    """Change one file of a checkpoint as an attacker would, manifest included."""
    edit(tag / name)
    (tag / checkpoint.MANIFEST).unlink()
    checkpoint._write_manifest(tag)


def _plant(tag: Path, marker: Path) -> None:
    def edit(f: Path) -> None:
        sd = torch.load(f, weights_only=False)
        sd["extra"] = Evil(marker)
        torch.save(sd, f)

    _rewrite(tag, "mp_rank_00_model_states.pt", edit)


def test_planted_code_never_runs_on_export_or_resume(trained: Path, tmp_path: Path) -> None:
    out, cfg = _copy(trained, tmp_path)
    marker = tmp_path / "marker"
    _plant(out / "checkpoints" / "step_00000004", marker)
    export = run_dsft(["export", str(out), str(tmp_path / "hf")])
    assert export.returncode == 2, export.stderr[-2000:]
    assert "mp_rank_00_model_states.pt" in export.stderr and "system" in export.stderr
    resume = run_dsft(["train", str(cfg), "train.max_steps=5"])
    assert resume.returncode == 2, resume.stderr[-2000:]
    assert "refused to unpickle" in resume.stderr
    assert not marker.exists()
    # the user vouches for the checkpoint: it loads (and the planted call runs)
    trusted = run_dsft(["export", str(out), str(tmp_path / "hf"), "--trust-checkpoint"])
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.exists()


def test_export_takes_trust_remote_code_from_the_user_only(
    trained: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out, _ = _copy(trained, tmp_path)
    marker = tmp_path / "marker"
    # a model folder whose config.json maps AutoConfig to a module that runs on import
    remote = tmp_path / "remote"
    shutil.copytree(tiny_model, remote)
    (remote / "evil_config.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    pass\n"
    )
    conf = json.loads((remote / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (remote / "config.json").write_text(json.dumps(conf))

    def edit(f: Path) -> None:
        meta = json.loads(f.read_text())
        meta["config"]["model"].update(path=str(remote), trust_remote_code=True)
        f.write_text(json.dumps(meta))

    _rewrite(out / "checkpoints" / "step_00000004", "dsft_state.json", edit)
    proc = run_dsft(["export", str(out), str(tmp_path / "hf")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()
    refused = run_dsft(["export", str(out), str(tmp_path / "hf2"), "--trust-remote-code"])
    assert refused.returncode == 2 and "--model-path" in refused.stderr


def test_damaged_newest_checkpoint_falls_back(trained: Path, tmp_path: Path) -> None:
    out, cfg = _copy(trained, tmp_path)
    states = out / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    proc = run_dsft(["train", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "mp_rank_00_model_states.pt" in log and "resumed from" in log
    assert "step_00000002: step 2" in log
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_busy_or_changed_output_dir_is_refused(trained: Path, tmp_path: Path) -> None:
    out, cfg = _copy(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".dsft-owner.lock").write_text(f"{socket.gethostname()}:{holder.pid}")
        busy = run_dsft(["train", str(cfg), "train.max_steps=5"])
        assert busy.returncode == 2 and f":{holder.pid}" in busy.stderr, busy.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()
    changed = run_dsft(["train", str(cfg), "train.lr=0.01", f"data.max_len={48 + 16}"])
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert "train.lr: 0.003 -> 0.01" in changed.stderr and "data.max_len" in changed.stderr
    assert "max_len: 48" in (out / "config.yaml").read_text()
    assert not any(out.glob("config.resume-*.yaml"))


def test_unavailable_hub_model_is_one_line(trained: Path, tmp_path: Path) -> None:
    _, cfg = _copy(trained, tmp_path)
    proc = run_dsft(
        ["train", str(cfg), "model.path=acme/missing", f"output_dir={tmp_path / 'x'}"],
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "acme/missing" in proc.stderr and "Traceback" not in proc.stderr
    assert os.environ.get("HF_HOME") != str(tmp_path / "hf")
