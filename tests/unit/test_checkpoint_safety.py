"""Checkpoints are data (no code runs from them), retention never drops the checkpoint just
written, a damaged checkpoint is skipped on resume, a full disk is one line, one run per
output_dir, and a resume that changes the run is refused (docs/long-jobs-guarantees.md)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dsft import checkpoint, locks, run_dir, safe_load
from dsft.config import load_config, to_dict
from dsft.errors import CheckpointError, ConfigError

from ..conftest import base_config, write_config


class Evil:
    """A pickle that calls os.system on load (it only creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_names_file_and_global(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    f = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": Evil(marker)}, f)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt.*(posix|os)\.system"):
        safe_load.verify(f)
    with pytest.raises(CheckpointError):  # DeepSpeed's resume reads through the same loader
        safe_load.VerifiedCheckpointEngine(object()).load(str(f), map_location="cpu")
    assert not marker.exists()
    safe_load.load(f, trust=True)  # --trust-checkpoint: the user's call
    assert marker.exists()


def test_deepspeed_globals_are_allowed(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    f = tmp_path / "optim_states.pt"
    state = {
        "loss_scaler": LossScaler(1.0),
        "zero_stage": ZeroStageEnum.gradients,
        "frag": fragment_address(numel=4, start=0),
        "t": torch.arange(3),
    }
    torch.save(state, f)
    safe_load.verify(f)
    back = safe_load.load(f)
    assert back["zero_stage"] == ZeroStageEnum.gradients and back["frag"].numel == 4


def test_damaged_file_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "a.pt"
    torch.save({"t": torch.zeros(1000)}, f)
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="damaged"):
        safe_load.load(f)


def test_rng_state_is_safetensors_and_restores(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "rng_rank0.safetensors"
    checkpoint._save_rng(path)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.restore_rng(checkpoint._load_rng(path))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # tensors and metadata, nothing else
        assert set(f.keys()) >= {"python", "numpy", "torch"}


class FakeEngine:
    """What checkpoint.save needs of a DeepSpeed engine: a module and save_checkpoint."""

    def __init__(self, fail: Exception | None = None):
        self.module = torch.nn.Linear(2, 2)
        self.fail = fail

    def module_state_dict(self, exclude_frozen_parameters: bool = False):
        return self.module.state_dict()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, **kw):
        if self.fail is not None:
            raise self.fail
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"module": self.module.state_dict(), **client_state}, d / "mp_rank_00_model_states.pt"
        )


def _save(out: Path, step: int, keep_last: int = 0) -> Path:
    return checkpoint.save(FakeEngine(), out, step, {"step": step}, keep_last, {})


def test_keep_last_never_removes_the_checkpoint_just_written(tmp_path: Path) -> None:
    # an older run left higher step numbers in the folder (e.g. --no-resume into it)
    for step in (10, 20):
        _save(tmp_path, step)
    _save(tmp_path, 2, keep_last=1)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002"
    assert (root / "step_00000002" / "dsft_state.json").is_file()
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002"]
    assert checkpoint.choose_resume(tmp_path, True, "") == root / "step_00000002"


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path, caplog) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    assert json.loads((root / "step_00000002" / "manifest.json").read_text())["files"]
    states = root / "step_00000002" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING", logger="dsft"):
        assert checkpoint.choose_resume(tmp_path, True, "") == root / "step_00000001"
    assert "mp_rank_00_model_states.pt" in caplog.text
    with pytest.raises(CheckpointError, match="damaged"):  # asked for explicitly: an error
        checkpoint.find(root / "step_00000002")
    # `latest` naming a checkpoint that is gone: a warning and the newest intact one
    (root / "latest").write_text("step_00000009")
    assert checkpoint.choose_resume(tmp_path, True, "") == root / "step_00000001"


def test_renames_are_fsynced(tmp_path: Path, monkeypatch) -> None:
    synced: list[Path] = []
    real = checkpoint._fsync
    monkeypatch.setattr(checkpoint, "_fsync", lambda p: (synced.append(Path(p)), real(p)))
    _save(tmp_path, 3)
    root = tmp_path / "checkpoints"
    assert root in synced  # the directory holding the renamed step and `latest`
    assert any(p.name == "mp_rank_00_model_states.pt" for p in synced)


def test_full_disk_is_one_line(tmp_path: Path, monkeypatch) -> None:
    err = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(checkpoint, "_disk_full", lambda out: True)
    with pytest.raises(CheckpointError, match=r"no space left on device at .*checkpoints"):
        checkpoint.save(FakeEngine(fail=err), tmp_path, 5, {"step": 5}, 0, {})
    with pytest.raises(CheckpointError, match="no space left"):
        checkpoint.save(FakeEngine(fail=OSError(28, "No space left")), tmp_path, 5, {}, 0, {})


# ------------------------------------------------------------------ one run per output_dir


@pytest.fixture
def cfg_factory(tiny_model: Path, tiny_data: Path, tmp_path: Path):
    def make(out: Path, *overrides: str):
        c = write_config(tmp_path / "c.yaml", base_config(tiny_model, tiny_data, out))
        return load_config(c, list(overrides))

    return make


def test_a_second_run_into_a_busy_output_dir_is_refused(tmp_path: Path, cfg_factory) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / run_dir.LOCK).write_text(f"{os.uname().nodename}:{holder.pid}")
        with pytest.raises(CheckpointError, match=f"in use .*:{holder.pid}"):
            run_dir.open_run(cfg_factory(out), 8, {})
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its stale lock is taken over
    time.sleep(0.1)
    run_dir.open_run(cfg_factory(out), 8, {})
    assert locks.owner(out / run_dir.LOCK).endswith(f":{os.getpid()}")
    run_dir._release()
    assert not (out / run_dir.LOCK).exists()


def test_no_resume_into_an_old_run_asks_for_overwrite(tmp_path: Path, cfg_factory) -> None:
    out = tmp_path / "run"
    _save(out, 4)
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(CheckpointError, match="--overwrite"):
        run_dir.open_run(cfg_factory(out, "checkpoint.resume=false"), 8, {})
    run_dir.open_run(
        cfg_factory(out, "checkpoint.resume=false", "checkpoint.overwrite=true"), 8, {}
    )
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    run_dir._release()


@pytest.mark.parametrize(
    "bad", [str, "output_dir", "not writable"], ids=["file", "empty", "unwritable"]
)
def test_output_dir_must_be_a_writable_folder(bad, tmp_path: Path, cfg_factory) -> None:
    if bad is str:  # a file
        (tmp_path / "f").write_text("x")
        with pytest.raises(ConfigError, match="is a file"):
            run_dir.open_run(cfg_factory(tmp_path / "f"), 8, {})
    elif bad == "output_dir":
        with pytest.raises(ConfigError, match="output_dir: required"):
            cfg_factory(tmp_path, "output_dir=")
    else:  # read-only /proc stops root too
        with pytest.raises(ConfigError, match=r"cannot create|not writable"):
            run_dir.open_run(cfg_factory(Path("/proc/dsft-test/run")), 8, {})


def test_resume_refuses_changes_of_meaning_and_keeps_each_segment_config(
    tmp_path: Path, cfg_factory
) -> None:
    out = tmp_path / "run"
    first = cfg_factory(out)
    run_dir.open_run(first, 8, {})
    checkpoint.save(FakeEngine(), out, 3, {"step": 3, "global_batch": 8}, 0, to_dict(first))
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.003 -> 0\.01.*global batch: 8 -> 16"):
        run_dir.open_run(cfg_factory(out, "train.lr=0.01"), 16, {})
    # logging, eval cadence and a longer run are allowed (and recorded)
    got = run_dir.open_run(cfg_factory(out, "logging.every=5", "train.max_steps=20"), 8, {})
    assert got == out / "checkpoints" / "step_00000003"
    seg = (out / "config.resume-1.yaml").read_text()
    assert "# changed: train.max_steps: 12 -> 20" in seg
    assert "max_steps: 12" in (out / "config.yaml").read_text()
    run_dir.open_run(cfg_factory(out, "train.lr=0.01", "checkpoint.allow_changes=true"), 8, {})
    assert "train.lr: 0.003 -> 0.01" in (out / "config.resume-2.yaml").read_text()
    run_dir._release()


def test_meaningful_settings() -> None:
    for key in (
        "data.path",
        "model.path",
        "train.lr",
        "train.seed",
        "train.schedule",
        "data.max_len",
    ):
        assert run_dir.meaningful(key), key
    for key in ("logging.every", "eval.every", "train.max_steps", "checkpoint.keep_last",
                "deepspeed.zero_stage", "train.micro_batch", "data.workers"):  # fmt: skip
        assert not run_dir.meaningful(key), key


def test_a_requeued_slurm_job_takes_over_its_own_lock(
    tmp_path: Path, cfg_factory, monkeypatch
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # held by this job's earlier run on another node (cannot be judged stale from here)
    (out / run_dir.LOCK).write_text("other-node:12345")
    (out / ".dsft-owner.job").write_text("777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(CheckpointError, match="other-node:12345"):
        run_dir.open_run(cfg_factory(out), 8, {})
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    run_dir.open_run(cfg_factory(out), 8, {})
    assert locks.owner(out / run_dir.LOCK).endswith(f":{os.getpid()}")
    run_dir._release()
