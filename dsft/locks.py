"""Owner files: locks between processes and nodes made with ``O_CREAT | O_EXCL``.

A lock file holds its owner as ``host:pid``. Ranks on nodes that share a file system
coordinate through such files with no collective, so a long tokenisation (dsft.data.build)
or download (dsft.hub) cannot hit a NCCL/gloo timeout. A lock whose process is gone from
this host is stale; one held on another host cannot be judged from here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def create(lock: Path) -> bool:
    """Create ``lock`` owned by this process; False if it already exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()}:{os.getpid()}")
    return True


def take(lock: Path) -> bool:
    """Create ``lock`` if nobody holds it; a stale lock is taken over. False if it is held
    (or its directory is gone)."""
    for _ in range(2):
        try:
            if create(lock):
                return True
        except FileNotFoundError:  # the directory is gone (e.g. the work it guarded is done)
            return False
        if not is_stale(lock):
            return False
        lock.unlink(missing_ok=True)
    return False


def is_stale(lock: Path) -> bool:
    """The owner of ``lock`` was a process on this host that no longer exists."""
    try:
        host, pid = lock.read_text().split(":")
    except (OSError, ValueError):
        return False  # gone, or being written right now
    if host != socket.gethostname():
        return False  # cannot tell; the other node's process finishes or leaves an error
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def owner(lock: Path) -> str:
    """``host:pid`` of the lock's owner ("?" if unreadable), for waiting messages."""
    try:
        return lock.read_text() or "?"
    except OSError:
        return "?"
