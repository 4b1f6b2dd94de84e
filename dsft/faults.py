"""Test hooks: failures injected through environment variables, read in one place.

DSFT_FAULT_NAN_STEPS=3,4     rank 0's loss is NaN at these optimizer steps
DSFT_FAULT_KILL_AT_STEP=5    rank 0 SIGKILLs itself after step 5 (and its checkpoint)
DSFT_FAULT_KILL_IN_SAVE=6    rank 0 SIGKILLs itself in the middle of saving step 6
DSFT_FAULT_HANG_AT_STEP=3    rank 0 stops responding after step 3 (sleeps for ever)
DSFT_FAULT_RANK=1            the kill and hang hooks hit this rank instead of rank 0
DSFT_FAULT_SLOW_CHUNK=0.1    every tokenised data chunk takes this many seconds longer
They exist so the tests can prove recovery on the real code path; unset, they do nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def steps(name: str) -> set[int]:
    """The steps listed in environment variable ``name`` (empty when unset)."""
    return {int(x) for x in os.environ.get(name, "").split(",") if x.strip()}


def _hit(name: str, step: int, rank: int) -> bool:
    return step in steps(name) and rank == int(os.environ.get("DSFT_FAULT_RANK", "0"))


def kill_if(name: str, step: int, rank: int) -> None:
    """SIGKILL this process when ``step`` is listed in ``name`` and this is the fault rank."""
    if _hit(name, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def hang_if(name: str, step: int, rank: int) -> None:
    """Stop responding (alive, never reaching the next collective), like a stuck GPU."""
    if _hit(name, step, rank):
        print(f"fault: rank {rank} hangs after step {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def delay(name: str) -> None:
    """Sleep the seconds given in ``name`` (e.g. to make two builders overlap)."""
    seconds = float(os.environ.get(name, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)
