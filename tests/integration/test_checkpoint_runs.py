"""Checkpoints: a killed and resumed run is indistinguishable from an uninterrupted one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsft.distributed import local_launch_argv

from ..conftest import ROOT, base_config, cpu_env, run_dsft, train_rows, weights, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _config(model: Path, data: Path, out: Path, precision: str = "fp32") -> dict:
    return base_config(
        model,
        data,
        out,
        deepspeed={"zero_stage": 2},
        train={"max_steps": 8, "weight_decay": 0.1, "precision": precision},
        eval={"generate": False, "before_training": False},
        checkpoint={"every": 3, "keep_last": 1},
        logging={"every": 1},
    )


def _straight(model: Path, data: Path, tmp: Path, precision: str) -> Path:
    cfg = write_config(tmp / "c.yaml", _config(model, data, tmp / "run", precision))
    assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model: Path, tiny_data: Path, tmp_path_factory) -> Path:
    return _straight(tiny_model, tiny_data, tmp_path_factory.mktemp("straight"), "fp32")


def test_bf16_resume_within_tolerance(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    straight = _straight(tiny_model, tiny_data, tmp_path / "a", "bf16")
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "b.yaml", _config(tiny_model, tiny_data, out, "bf16"))
    killed = run_dsft(["train", str(cfg)], nproc=2, env={"DSFT_FAULT_KILL_AT_STEP": "5"})
    assert killed.returncode != 0
    assert run_dsft(["train", str(cfg)], nproc=2).returncode == 0
    a = {r["step"]: r["loss"] for r in train_rows(straight)}
    b = {r["step"]: r["loss"] for r in train_rows(out)}
    for step in range(4, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-3), step


@pytest.mark.parametrize(
    "fault", ["DSFT_FAULT_KILL_AT_STEP=5", "DSFT_FAULT_KILL_IN_SAVE=6"], ids=["crash", "torn-save"]
)
def test_sigkill_then_resume_is_bit_identical(
    fault: str, tiny_model: Path, tiny_data: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", _config(tiny_model, tiny_data, out))
    name, value = fault.split("=")
    killed = run_dsft(["train", str(cfg)], nproc=2, env={name: value})
    assert killed.returncode != 0
    # the kill left `latest` on the last complete checkpoint, step 3
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    assert (ckpts / "step_00000003" / "dsft_state.json").is_file()
    assert not (ckpts / "step_00000006").exists()

    resumed = run_dsft(["train", str(cfg)], nproc=2)
    assert resumed.returncode == 0
    assert "resumed from" in resumed.stdout
    straight = {r["step"]: r["loss"] for r in train_rows(uninterrupted)}
    again = {r["step"]: r["loss"] for r in train_rows(out)}
    assert sorted(again) == list(range(1, 9))  # the dead run's rows past step 3 were replaced
    for step in range(4, 9):
        assert again[step] == straight[step], step  # fp32 on CPU: bit-identical
    a, b = weights(uninterrupted / "final"), weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000008"]  # keep_last: 1
    assert not list((ckpts / ".incomplete").glob("step_*"))  # the torn save is cleaned up


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        path = out / "metrics.jsonl"
        if path.is_file() and any(r["step"] >= step for r in train_rows(out)):
            return
        time.sleep(0.5)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.mark.parametrize(("nproc", "sig"), [(1, signal.SIGUSR1), (2, signal.SIGTERM)])
def test_signal_saves_and_exits_then_resumes(
    nproc: int, sig: int, tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """A real signal mid-run: every rank stops at the same step, saves, exits; resume ends it."""
    out = tmp_path / "run"
    tree = _config(tiny_model, tiny_data, out)
    tree["train"]["max_steps"] = 400
    tree["checkpoint"]["every"] = 0
    cfg = write_config(tmp_path / "c.yaml", tree)
    if nproc == 1:
        cmd = [sys.executable, "-m", "dsft", "train", str(cfg)]
    else:  # torchrun passes SIGTERM on to its workers, as under Slurm
        cmd = local_launch_argv(nproc, ["dsft", "train", str(cfg)])
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)  # fmt: skip
    _wait_for_step(out, 3, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    if nproc == 1:
        assert proc.returncode == 75, stderr[-3000:]
    else:
        assert proc.returncode != 0
    assert stderr.count("stopped by a signal at step") == nproc
    tag = (out / "checkpoints" / "latest").read_text()
    stopped_at = int(tag.split("_")[1])
    assert 3 <= stopped_at < 400
    assert all(r["step"] <= stopped_at for r in train_rows(out))
    # resuming (with a shorter budget, to keep the test short) continues from there
    resumed = run_dsft(["train", str(cfg), f"train.max_steps={stopped_at + 2}"], nproc=nproc)
    assert resumed.returncode == 0
    assert [r["step"] for r in train_rows(out)][-2:] == [stopped_at + 1, stopped_at + 2]


def test_resume_on_another_rank_count_and_stage(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    """Saved by 2 ranks at ZeRO-2, resumed by 1 process at ZeRO-0 with the same global batch."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", _config(tiny_model, tiny_data, out))
    killed = run_dsft(["train", str(cfg)], nproc=2, env={"DSFT_FAULT_KILL_AT_STEP": "5"})
    assert killed.returncode != 0
    resumed = run_dsft(["train", str(cfg), "deepspeed.zero_stage=0", "train.grad_accum=4"])
    assert resumed.returncode == 0
    assert "optimizer moments reset" in resumed.stdout
    straight = {r["step"]: r for r in train_rows(uninterrupted)}
    again = {r["step"]: r for r in train_rows(out)}
    assert sorted(again) == list(range(1, 9))
    # Step 4 runs the weights saved after step 3 on the same global batch: same loss,
    # and the LR schedule continues where it was.
    assert again[4]["loss"] == pytest.approx(straight[4]["loss"], rel=1e-5)
    assert again[8]["lr/all/decay"] == pytest.approx(straight[8]["lr/all/decay"])
