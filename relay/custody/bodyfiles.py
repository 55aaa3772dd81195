"""Rule 3 of ``relay.custody.spool``: large bodies as files beside the database."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

BODY_FILE_OCTETS = 64 * 1024  # bodies this large or larger live in files (Rule 3)
BODIES = "bodies"
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")  # a queue id safe as a file name


class BodyFiles:
    """Large bodies as files in ``bodies/`` (Rule 3), in step with the writer's transactions.

    Used only on the writer thread (and by ``open`` before it starts). Files written
    in a transaction are removed if it rolls back; files of dropped messages are
    removed once it commits. A crash between the two leaves a file no row names,
    which the next ``open`` removes.
    """

    def __init__(self, directory: Path, *, fsync: bool) -> None:
        self.directory = directory
        self._fsync = fsync
        self._written: list[Path] = []  # in the transaction in progress
        self._doomed: list[Path] = []  # to remove once it commits
        self.bytes = 0  # of the files named by committed rows (``spool.max_bytes``)

    def path(self, message_id: str) -> Path:
        return self.directory / message_id

    def write(self, message_id: str, body: bytes | memoryview) -> None:
        if not self.directory.is_dir():
            self._make_directory()
        path = self.path(message_id)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._written.append(path)  # from here on, a rollback removes it
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(descriptor, view) :]
            if self._fsync:
                os.fsync(descriptor)
        finally:
            os.close(descriptor)
        self.bytes += len(body)

    def read(self, message_id: str) -> bytes | None:
        try:
            return self.path(message_id).read_bytes()
        except OSError:
            return None

    def forget(self, message_id: str) -> None:
        self._doomed.append(self.path(message_id))

    def mark(self) -> tuple[int, int]:
        return len(self._written), len(self._doomed)

    def rollback_to(self, mark: tuple[int, int]) -> None:
        """An operation rolled back: its new files go, and the files it dropped stay."""
        for path in self._written[mark[0] :]:
            self._remove(path)
        del self._written[mark[0] :]
        del self._doomed[mark[1] :]

    def before_commit(self) -> None:
        if self._written and self._fsync:  # the new names are durable before the rows
            _fsync_directory(self.directory)

    def _make_directory(self) -> None:
        """``bodies/`` itself, its own name durable in the spool directory before any file."""
        self.directory.mkdir(exist_ok=True)
        if self._fsync:
            _fsync_directory(self.directory.parent)

    def committed(self) -> None:
        for path in self._doomed:
            self._remove(path)
        self._written.clear()
        self._doomed.clear()

    def rolled_back(self) -> None:
        self.rollback_to((0, 0))

    def sweep(self, known: set[str]) -> None:
        """At open: remove files no row names (a crash mid-transaction); count the rest."""
        self.bytes = 0
        if not self.directory.is_dir():
            return
        for entry in os.scandir(self.directory):
            if entry.name in known:
                self.bytes += entry.stat().st_size
            else:
                self._remove(Path(entry.path))

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            self.bytes = max(0, self.bytes - size)


def entries(directory: Path) -> int:
    """How many entries ``directory`` holds (0 when it does not exist)."""
    try:
        with os.scandir(directory) as found:
            return sum(1 for _ in found)
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
