"""Owner-file locks (dsft/locks.py): one creator wins, the owner is recorded as host:pid, a
lock whose process is gone from this host is taken over, a live or foreign one is not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from dsft import locks


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_one_creator_wins_and_is_named(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    assert locks.create(lock)
    assert not locks.create(lock)  # O_EXCL: the second creator loses
    assert locks.owner(lock) == f"{socket.gethostname()}:{os.getpid()}"
    assert not locks.is_stale(lock)  # this process is alive
    assert not locks.take(lock)  # held, not taken over
    assert locks.owner(tmp_path / "missing.lock") == "?"


def test_a_dead_owner_on_this_host_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text(f"{socket.gethostname()}:{_dead_pid()}")
    assert locks.is_stale(lock)
    assert locks.take(lock)
    assert locks.owner(lock) == f"{socket.gethostname()}:{os.getpid()}"


def test_another_hosts_lock_and_a_gone_folder_are_not_taken(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text(f"not-{socket.gethostname()}:{_dead_pid()}")
    assert not locks.is_stale(lock)  # cannot be judged from here
    assert not locks.take(lock)
    assert not locks.take(tmp_path / "gone" / "x.lock")  # the work it guarded is done
