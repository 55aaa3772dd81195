"""The spool's reserve: room kept on the disk for the records that end a copy's custody.

Rule 1: a copy the upstream has answered must be written down (delivered, deferred,
failed) or it will be sent again after a restart. When the disk is full, that write
must still land: the spool keeps ``spool.reserve_bytes`` of real, allocated space in
one file (``reserve``) and gives it up the first time an outcome's write fails for
want of space. New mail never uses it: ``store`` is not an outcome, and MAIL is
refused ``452 4.3.1`` long before (``spool.min_free_bytes``).
Rule 2: the reserve is allocated (``posix_fallocate``), never sparse, so the space
is really held; it is made again once the disk has room for it and headroom beside.
Rule 3: every step is best effort and never raises: without a reserve the spool
works as before (an outcome that cannot be written keeps its copy ``delivering``).

The precedent: Microsoft Exchange's ESE keeps reserve log files (``res1.log``,
``res2.log``) so that a database on a full disk can still write what it owes and
shut down cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("relay.spool")

RESERVE_FILE = "reserve"
# Room the disk must have beside the reserve before it is made again: a reserve that
# would fill the disk itself is no help.
RESTORE_HEADROOM = 4 * 1024 * 1024


class Reserve:
    """``size`` bytes held in ``directory/reserve`` (0: no reserve)."""

    def __init__(self, directory: Path, size: int) -> None:
        self.path = directory / RESERVE_FILE
        self.size = max(size, 0)
        self.released = 0  # times given up since the start

    @property
    def held(self) -> bool:
        try:
            return self.size > 0 and self.path.stat().st_size >= self.size
        except OSError:
            return False

    def ensure(self) -> bool:
        """Make the reserve when it is missing and the disk has room (Rule 2)."""
        if self.size == 0 or self.held:
            return self.size > 0
        try:
            if shutil.disk_usage(self.path.parent).free < self.size + RESTORE_HEADROOM:
                return False
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(descriptor, 0, self.size)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.path.unlink()
            log.debug("spool reserve not made", extra={"fields": {"error": str(exc)}})
            return False
        log.debug("spool reserve held", extra={"fields": {"bytes": self.size}})
        return True

    def release(self) -> bool:
        """Give the space back to the disk; whether there was any to give."""
        if not self.held:
            return False
        try:
            self.path.unlink()
        except OSError:
            return False
        self.released += 1
        log.warning(
            "spool reserve released: the disk is full and outcomes must be written",
            extra={"fields": {"bytes": self.size}},
        )
        return True
