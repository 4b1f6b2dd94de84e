"""Test hooks: failures injected through environment variables, read in one place.

DSFT_FAULT_NAN_STEPS=3,4     rank 0's loss is NaN at these optimizer steps
DSFT_FAULT_KILL_AT_STEP=5    rank 0 SIGKILLs itself after step 5 (and its checkpoint)
DSFT_FAULT_KILL_IN_SAVE=6    rank 0 SIGKILLs itself in the middle of saving step 6
They exist so the tests can prove recovery on the real code path; unset, they do nothing.
"""

from __future__ import annotations

import os
import signal


def steps(name: str) -> set[int]:
    """The steps listed in environment variable ``name`` (empty when unset)."""
    return {int(x) for x in os.environ.get(name, "").split(",") if x.strip()}


def kill_if(name: str, step: int, is_main: bool) -> None:
    """SIGKILL this process when ``step`` is listed in ``name`` and this is rank 0."""
    if is_main and step in steps(name):
        os.kill(os.getpid(), signal.SIGKILL)
