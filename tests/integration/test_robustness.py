"""A rank that dies or hangs ends the whole job, non-zero, within a bounded time.

torchrun notices a dead worker itself; a rank that hangs (alive, never reaching the
next collective) is caught by the collective timeout ``DSFT_DIST_TIMEOUT``: the
waiting ranks give up, exit non-zero, and the launcher takes the hung one down.
(The same under Slurm's srun: tests/cluster/test_slurm.py.)
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from dsft.distributed import local_launch_argv

from ..conftest import ROOT, base_config, cpu_env, train_rows, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def fault_config(model: Path, data: Path, out: Path) -> dict:
    """Many steps (the fault comes long before the end), nothing evaluated or exported."""
    return base_config(
        model,
        data,
        out,
        train={"max_steps": 400},
        eval={"generate": False, "before_training": False},
        checkpoint={"save_final": False, "export": False},
        logging={"every": 1},
    )


def _torchrun(cfg: Path, env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    cmd = local_launch_argv(2, ["dsft", "train", str(cfg)])
    t0 = time.time()
    proc = subprocess.run(
        cmd, env={**cpu_env(), **env}, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    return proc.returncode, proc.stdout + proc.stderr, time.time() - t0


def test_dead_rank_ends_the_job(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed after step 3: torchrun stops rank 0 and exits non-zero at once."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", fault_config(tiny_model, tiny_data, out))
    rc, log, seconds = _torchrun(
        cfg, {"DSFT_FAULT_KILL_AT_STEP": "3", "DSFT_FAULT_RANK": "1"}, timeout=300
    )
    assert rc != 0, log[-3000:]
    assert "Signal 9" in log or "SIGKILL" in log, log[-3000:]
    assert max(r["step"] for r in train_rows(out)) <= 4  # nobody trained on alone
    assert seconds < 120, seconds


def test_hung_rank_times_out(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    """Rank 1 stops responding after step 3: rank 0's next all-reduce gives up after
    DSFT_DIST_TIMEOUT, and the job ends non-zero (not after torch's 30 minutes)."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", fault_config(tiny_model, tiny_data, out))
    timeout = 10
    rc, log, seconds = _torchrun(
        cfg,
        {"DSFT_FAULT_HANG_AT_STEP": "3", "DSFT_FAULT_RANK": "1", "DSFT_DIST_TIMEOUT": str(timeout)},
        timeout=300,
    )
    assert rc != 0, log[-3000:]
    assert "rank 1 hangs after step 3" in log
    assert "timed out" in log.lower() or "timeout" in log.lower(), log[-3000:]
    assert max(r["step"] for r in train_rows(out)) <= 4
    # start-up + the timeout + torchrun's 30 s grace before it SIGKILLs the hung rank
    assert seconds < timeout + 100, seconds
