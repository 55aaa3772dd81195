"""The outbox upstream: each copy stored as one ``.eml`` file, atomically.

Rule 1: a file holds exactly the copy's bytes, its header section then the
shared body, with nothing added or changed.
Rule 2: a file name never holds an address: a UTC timestamp, a per-process
sequence number and random hex (``20250101T120000Z-000001-3f2a9c0e1b7d4a65.eml``).
Rule 3: a reader never sees a partial file. The bytes go to a hidden temporary
file in the same directory, are fsynced, renamed into place, and the directory
is fsynced so the rename itself survives a crash (Postfix's ``mail_stream.c``
does the same for its queue files).

``OutboxUpstream`` runs the blocking writes in a thread and turns an
``OSError`` into a transient outcome. Nothing here speaks SMTP (no
aiosmtplib): ``relay.upstream.smtp`` opens this for ``outbox:DIR`` URLs.
``CheckStep`` lives here, under the SMTP side, so the two modules import in
one direction only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from relay.core.model import Copy, Credentials, Outcome, Stage, Status

SUFFIX = ".eml"
TEMP_PREFIX = ".tmp-"  # hidden, and without the .eml suffix: readers skip it
_SEQUENCE = itertools.count(1)


def file_name() -> str:
    """A fresh name: sorts by time, unique within and across processes, names nobody."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{next(_SEQUENCE):06d}-{secrets.token_hex(8)}{SUFFIX}"


def write_copy(directory: Path, copy: Copy) -> Path:
    """Store ``copy`` as a new file in ``directory`` (created if missing); return its path.

    Raises ``OSError``; on any failure no temporary file is left behind.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(copy.headers)
            handle.write(copy.body)  # the shared memoryview, written without a copy
            handle.flush()
            os.fsync(handle.fileno())
        final = directory / file_name()
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_directory(directory)
    return final


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: fsync the directory itself)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe(directory: Path) -> str:
    """Check that ``directory`` can take files (create, write, fsync, remove one).

    Returns a one-line description with the free space; raises ``OSError``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        os.write(fd, b"probe\r\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(temp)
    free = shutil.disk_usage(directory).free
    return f"{directory} is writable ({free // (1 << 20)} MiB free)"


@dataclass(frozen=True, slots=True)
class CheckStep:
    """One line of ``solo-relay check --upstream``: connect, tls, ehlo, auth (or outbox)."""

    name: str
    ok: bool
    detail: str  # one line, never a password

    def __str__(self) -> str:
        return f"{'ok' if self.ok else 'FAILED'} {self.name}: {self.detail}"


class OutboxUpstream:
    """The ``Upstream`` for ``outbox:DIR``: a copy is delivered once its file is on disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written = 0

    def __repr__(self) -> str:
        return f"<OutboxUpstream {self.directory} written={self.written}>"

    async def send(
        self, mail_from: str, copy: Copy, *, smtputf8: bool, credentials: Credentials | None = None
    ) -> Outcome:
        """Write ``copy``; the envelope, SMTPUTF8 and credentials do not apply to a file."""
        try:
            path = await asyncio.to_thread(write_copy, self.directory, copy)
        except OSError as exc:
            text = f"cannot write to the outbox: {exc.strerror or exc}"
            return Outcome(Status.TRANSIENT, Stage.WRITE, 0, "", text)
        self.written += 1
        return Outcome(Status.DELIVERED, Stage.WRITE, 250, "2.0.0", f"written as {path.name}")

    async def check(self) -> list[CheckStep]:
        try:
            return [CheckStep("outbox", True, await asyncio.to_thread(probe, self.directory))]
        except OSError as exc:
            return [CheckStep("outbox", False, f"{self.directory}: {exc.strerror or exc}")]

    async def aclose(self) -> None:
        return None
