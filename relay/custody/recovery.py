"""Salvage: the readable records of a quarantined spool database, as messages to spool again.

Rule 1: the quarantined files are never written: they are copied aside (database
and WAL) and the copy is read, so the evidence stays as the relay found it.
Rule 2: only records whose checksums hold come back: a message's body must
match its ``body_crc`` (a body file from ``NAME.db.bodies/``, or the column),
and a copy's recipient and header section their ``crc``. A damaged record is
counted and left, never guessed at.
Rule 3: only live copies come back (``queued``, ``delivering``, ``deferred``),
all as ``queued`` and due now; a ``delivering`` one may then be sent a second
time, the at-least-once window a crash already allows (SPEC 5). Delivered and
failed copies are history.
Rule 4: a table scan that meets a damaged page falls back to reading rows one
rowid at a time, so the rows on healthy pages after the damage still come back.
This is SQLite's ``.recover`` in miniature, for this schema only.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from relay.custody.bodyfiles import BODIES
from relay.custody.records import LIVE, CopyState, NewCopy, NewMessage

# Rowids probed past the last one seen when the table's own maximum cannot be read.
PROBE_SLACK = 10_000
_LIVE_STATES = frozenset(s.value.encode() for s in LIVE)
_MESSAGE_COLUMNS = "id, sender, smtputf8, auth_user, received, expires, body_crc, is_dsn, body"
_COPY_COLUMNS = "message, rcpt, headers, crc, state, attempts"


@dataclass(frozen=True, slots=True)
class Salvage:
    """What a quarantined database held that can be spooled again, and what it could not."""

    messages: tuple[NewMessage, ...]
    damaged: int  # records (message or copy) that could not be read or failed a checksum
    finished: int  # copies already delivered or failed: not brought back

    @property
    def copies(self) -> int:
        return sum(len(m.copies) for m in self.messages)


def salvage(source: Path, *, now: float | None = None) -> Salvage:
    """Read ``source`` (a quarantined ``spool-*.db``) into messages; raises ``sqlite3.Error``
    or ``OSError`` when it cannot be opened at all."""
    now = time.time() if now is None else now
    with tempfile.TemporaryDirectory(prefix="solo-relay-recover-") as scratch:
        copy = Path(scratch) / "spool.db"
        shutil.copyfile(source, copy)  # Rule 1: SQLite may write even to read (the WAL)
        wal = Path(str(source) + "-wal")
        if wal.is_file():
            shutil.copyfile(wal, Path(str(copy) + "-wal"))
        conn = sqlite3.connect(copy, isolation_level=None)
        conn.text_factory = bytes  # Rule 2: a damaged text is a checksum miss, not a crash
        try:
            # Without its schema (page 1) nothing here can be read: raise, for the caller
            # to say so (SQLite's own ``.recover`` may still find rows).
            conn.execute("SELECT name FROM sqlite_master").fetchall()
            return _read(conn, Path(str(source) + "." + BODIES), now)
        finally:
            conn.close()


def _read(conn: sqlite3.Connection, bodies: Path, now: float) -> Salvage:
    damaged = finished = 0
    messages: dict[str, tuple[tuple[object, ...], bytes]] = {}
    for row in _rows(conn, "messages", _MESSAGE_COLUMNS + ", body_file"):
        checked = _message(row, bodies)
        if checked is None:
            damaged += 1
        else:
            messages[checked[0]] = (row, checked[1])
    copies: dict[str, list[NewCopy]] = {}
    for message, rcpt, headers, crc, state, attempts in _rows(conn, "copies", _COPY_COLUMNS):
        name = _text(message)
        if (
            name not in messages
            or not isinstance(rcpt, bytes)
            or not isinstance(headers, bytes)
            or zlib.crc32(headers, zlib.crc32(rcpt)) != crc
            or _text(rcpt) is None
            or not isinstance(attempts, int)
        ):
            damaged += 1
            continue
        if state not in _LIVE_STATES:
            finished += 1
            continue
        copies.setdefault(name, []).append(
            NewCopy(rcpt.decode(), headers, CopyState.QUEUED, next_try=now, attempts=attempts)
        )
    found = []
    for name, (row, body) in messages.items():
        if name not in copies:
            continue
        _, sender, smtputf8, auth_user, received, expires, _, is_dsn = row[:8]
        found.append(
            NewMessage(
                id=name,
                sender=_text(sender) or "",
                smtputf8=bool(smtputf8),
                received=float(received),  # type: ignore[arg-type]
                expires=float(expires),  # type: ignore[arg-type]
                body=body,
                copies=tuple(copies[name]),
                auth_user=_text(auth_user) or "",
                is_dsn=bool(is_dsn),
            )
        )
    return Salvage(tuple(found), damaged, finished)


def _message(row: tuple[object, ...], bodies: Path) -> tuple[str, bytes] | None:
    """A message row's id and body when its checksum holds, else None."""
    name, sender, _, auth_user, received, expires, crc, _, body, in_file = row
    text = _text(name)
    if text is None or _text(sender) is None or _text(auth_user) is None:
        return None
    if not all(isinstance(v, int | float) for v in (received, expires)):
        return None
    if in_file == 1:
        try:
            body = (bodies / text).read_bytes()
        except (OSError, ValueError):
            return None
    if not isinstance(body, bytes) or zlib.crc32(body) != crc:
        return None
    return text, body


def _text(value: object) -> str | None:
    """Stored UTF-8 text (read as bytes), or None when it is not that."""
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _rows(conn: sqlite3.Connection, table: str, columns: str) -> Iterator[tuple[object, ...]]:
    """Every readable row of ``table`` (Rule 4), each once."""
    seen: set[int] = set()
    try:
        for rowid, *rest in conn.execute(f"SELECT rowid, {columns} FROM {table}"):
            seen.add(rowid)
            yield tuple(rest)
        return
    except sqlite3.DatabaseError:
        pass  # a damaged page: go on a rowid at a time
    try:
        top = conn.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()[0]
    except sqlite3.DatabaseError:
        top = None
    last = max([*seen, top if isinstance(top, int) else 0, 0]) + PROBE_SLACK
    for rowid in range(1, last + 1):
        if rowid in seen:
            continue
        try:
            row = conn.execute(
                f"SELECT {columns} FROM {table} WHERE rowid = ?",
                (rowid,),
            ).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None:
            yield tuple(row)
