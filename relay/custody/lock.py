"""One relay per spool: an exclusive ``flock`` on ``spool.lock`` for the process's life."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from relay.custody.errors import SpoolError, environment_error


def take_lock(path: Path, *, write_pid: bool = True) -> IO[bytes]:
    """An exclusive lock on the spool directory for this process's life: one relay per spool.

    The lock file holds the holder's process id, so a second relay can name it.
    """
    try:
        handle = open(path, "a+b")  # noqa: SIM115 - held open until close()
    except OSError as exc:
        raise environment_error(exc) from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read(32).decode("ascii", "replace").strip()
        handle.close()
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise SpoolError(f"{path.parent} is in use by another relay ({who} holds {path})") from exc
    if not write_pid:
        return handle
    with contextlib.suppress(OSError):  # the name is a courtesy: a full disk still locks
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
    return handle


def check_unlocked(directory: Path) -> None:
    """Raise ``SpoolError`` (naming the holder) when a relay holds the spool in ``directory``.

    For a supervisor before it starts workers on spools another relay may hold: each
    worker would be refused and started again without end. A spool not made yet is free.
    """
    if (directory / "spool.lock").exists():
        take_lock(directory / "spool.lock", write_pid=False).close()
