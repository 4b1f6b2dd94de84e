"""The fault hooks (dsft/faults.py) do nothing unless their variable names this step and this
rank; the recovery tests that use them: tests/integration/test_robustness.py and
test_checkpoint_runs.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dsft import faults


def test_steps_parse_and_unset_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSFT_FAULT_NAN_STEPS", raising=False)
    assert faults.steps("DSFT_FAULT_NAN_STEPS") == set()
    monkeypatch.setenv("DSFT_FAULT_NAN_STEPS", "3, 4,,")
    assert faults.steps("DSFT_FAULT_NAN_STEPS") == {3, 4}


def test_hooks_hit_only_the_listed_step_on_the_fault_rank(monkeypatch) -> None:
    monkeypatch.setenv("DSFT_FAULT_KILL_AT_STEP", "5")
    monkeypatch.setenv("DSFT_FAULT_HANG_AT_STEP", "5")
    monkeypatch.setenv("DSFT_FAULT_RANK", "1")
    for step, rank in ((4, 1), (5, 0)):  # another step, another rank: nothing happens
        faults.kill_if("DSFT_FAULT_KILL_AT_STEP", step, rank)
        faults.hang_if("DSFT_FAULT_HANG_AT_STEP", step, rank)
    code = "from dsft import faults; faults.kill_if('DSFT_FAULT_KILL_AT_STEP', 5, 1)"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), timeout=120)
    assert proc.returncode == -9  # SIGKILL: no handler, no checkpoint, like a lost node


def test_delay_sleeps_the_given_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSFT_FAULT_SLOW_CHUNK", "0.2")
    t0 = time.monotonic()
    faults.delay("DSFT_FAULT_SLOW_CHUNK")
    assert time.monotonic() - t0 >= 0.2
    monkeypatch.setenv("DSFT_FAULT_SLOW_CHUNK", "")
    faults.delay("DSFT_FAULT_SLOW_CHUNK")  # unset or empty: no sleep, no error
