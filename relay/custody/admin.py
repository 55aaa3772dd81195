"""The operator's store: a spool database opened by ``solo-relay queue`` beside the relay.

Rule 1: the database is opened as it is, never created (``mode=rw``: a WAL reader
needs its ``-shm``), and waits for the relay's writer up to the spool's busy
timeout.
Rule 2: each method is one short transaction: reads share the WAL with the
relay's writer (one consistent snapshot); writes take the lock with ``BEGIN
IMMEDIATE`` and hold it only for their few statements.
Rule 3: SQLite's errors leave here as ``StoreError`` (its text kept), so the
commands above catch one custody error and never import ``sqlite3``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from relay.custody import history, recovery, schema, spool
from relay.custody.bodyfiles import BODIES
from relay.custody.errors import SpoolError
from relay.custody.queries import read_stats
from relay.custody.records import CopyRow, CopyState, NewMessage


class StoreError(SpoolError):
    """The spool database could not be opened or read or changed (SQLite's text)."""


class UnknownMessage(Exception):
    """No message with that queue id in the spool."""


class StoredMessage(NamedTuple):
    """A message's envelope and times as ``queue show --json`` prints them."""

    sender: str
    smtputf8: int
    auth_user: str
    received: float
    expires: float
    body_bytes: int  # -1: the body is a file (its size is the file's)
    is_dsn: int


class StoredCopy(NamedTuple):
    """One copy of a message, with its header section (``queue show --json``)."""

    copy_id: int
    rcpt: str
    state: str
    attempts: int
    next_try: float
    last_code: int
    last_enhanced: str
    last_text: str
    headers: bytes


class ListedCopy(NamedTuple):
    """One live copy as ``queue list`` reads it."""

    copy_id: int
    message_id: str
    rcpt: str
    state: str
    attempts: int
    next_try: float
    last_code: int
    last_enhanced: str
    last_text: str
    received: float
    sender: str
    auth_user: str


class HistoryRow(NamedTuple):
    """One copy of the delivered history (``queue list --delivered``)."""

    copy_id: int
    message_id: str
    rcpt: str
    state: str
    attempts: int
    last_code: int
    last_enhanced: str
    last_text: str
    received: float
    sender: str
    header_id: str  # the application's Message-ID
    finished: float
    auth_user: str


@dataclass(frozen=True, slots=True)
class StoreStats:
    """``solo-relay queue stats``: one spool's counts, in one snapshot."""

    counts: dict[CopyState, int]
    oldest: float | None  # ``received`` of the oldest message with a live copy
    messages: int
    quarantined: int
    history: int  # rows of the delivered history (0 without one, or when not asked)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(str(exc)) from exc


class Store:
    """One spool database for ``solo-relay queue``; ``Store.open`` it, ``close`` it."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    @classmethod
    def open(cls, path: Path, *, durable: bool = False) -> Store:
        """The existing spool database at ``path`` (Rule 1); ``durable``: a retry or delete
        is durable when the command says so (``synchronous = FULL``)."""
        if not path.is_file():
            raise StoreError(f"no spool database at {path}")
        with _errors():
            conn = sqlite3.connect(
                path.resolve().as_uri() + "?mode=rw",
                uri=True,
                isolation_level=None,
                timeout=schema.BUSY_TIMEOUT_MS / 1000,
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {schema.BUSY_TIMEOUT_MS}")
                if durable:
                    conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error:
                conn.close()
                raise
        return cls(path, conn)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def bodies(self) -> Path:
        """The directory of this spool's body files (``relay.custody.bodyfiles``)."""
        return self.path.parent / BODIES

    @contextlib.contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One short transaction: a consistent snapshot to read, or the write lock to change."""
        conn = self._conn
        with _errors():
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- reads -----------------------------------------------------------------------

    def copies(self, states: Sequence[CopyState]) -> list[CopyRow]:
        """The copies in ``states``, in the order mail was received."""
        with self._transaction() as conn:
            return _copies(conn, states=states)

    def message(
        self, message_id: str
    ) -> tuple[tuple[Any, ...], list[CopyRow], dict[int, bytes]] | None:
        """``queue show``: the message row (sender, smtputf8, auth_user, received, expires,
        body size (-1: a body file), is_dsn), its copies and their header sections."""
        with self._transaction() as conn:
            message = conn.execute(
                "SELECT sender, smtputf8, auth_user, received, expires,"
                " CASE body_file WHEN 1 THEN -1 ELSE length(body) END, is_dsn"
                " FROM messages WHERE id = ?",
                (message_id,),
            ).fetchone()
            if message is None:
                return None
            copies = _copies(conn, message_id)
            headers = dict(
                conn.execute("SELECT id, headers FROM copies WHERE message = ?", (message_id,))
            )
        return tuple(message), copies, headers

    def message_rows(self, queue_id: str) -> tuple[StoredMessage | None, list[StoredCopy]]:
        """``queue show --json``: the message (None when there is none), and its copies by id."""
        with _errors():
            conn = self._conn
            conn.execute("BEGIN")
            try:
                message = conn.execute(
                    "SELECT sender, smtputf8, auth_user, received, expires,"
                    " CASE body_file WHEN 1 THEN -1 ELSE length(body) END, is_dsn"
                    " FROM messages WHERE id = ?",
                    (queue_id,),
                ).fetchone()
                copies = conn.execute(
                    "SELECT id, rcpt, state, attempts, next_try, last_code, last_enhanced,"
                    " last_text, headers FROM copies WHERE message = ? ORDER BY id",
                    (queue_id,),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        return (
            None if message is None else StoredMessage(*message),
            [StoredCopy(*c) for c in copies],
        )

    def stats(self, *, with_history: bool = False) -> StoreStats:
        """Copies by state, messages, the oldest live one, quarantined records; and with
        ``with_history`` the rows of the delivered history."""
        with self._transaction() as conn:
            counts, oldest = read_stats(conn)
            (messages,) = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
            (quarantined,) = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()
            kept = (
                conn.execute(f"SELECT COUNT(*) FROM {history.TABLE}").fetchone()[0]
                if with_history and history.present(conn)
                else 0
            )
        return StoreStats(counts, oldest, messages, quarantined, kept)

    def listing(self, states: Sequence[CopyState]) -> tuple[list[ListedCopy], dict[str, bytes]]:
        """``queue list``: the copies in ``states``, and one header section per message
        (the Message-ID is the same on every copy)."""
        values = tuple(s.value for s in states)
        with self._transaction() as conn:
            found = conn.execute(
                "SELECT c.id, c.message, c.rcpt, c.state, c.attempts, c.next_try, c.last_code,"
                " c.last_enhanced, c.last_text, m.received, m.sender, m.auth_user"
                " FROM copies c JOIN messages m ON m.id = c.message"
                f" WHERE c.state IN ({', '.join('?' * len(values))})"
                " ORDER BY m.received, c.message, c.id",
                values,
            ).fetchall()
            headers = {
                message: headers
                for message, headers in conn.execute(
                    "SELECT message, headers FROM copies WHERE id IN"
                    " (SELECT MIN(id) FROM copies GROUP BY message)"
                )
                if isinstance(headers, bytes)
            }
        return [ListedCopy(*r) for r in found], headers

    def history(self) -> list[HistoryRow] | None:
        """``queue list --delivered``: the rows of the delivered history; None when this
        spool keeps none."""
        with self._transaction() as conn:
            if not history.present(conn):
                return None
            found = conn.execute(
                "SELECT copy, message, rcpt, state, attempts, last_code, last_enhanced,"
                " last_text, received, sender, message_id, at, auth_user"
                f" FROM {history.TABLE}"
            ).fetchall()
        return [HistoryRow(*r) for r in found]

    # -- writes ----------------------------------------------------------------------

    def retry(self, message_id: str | None, now: float, states: Sequence[CopyState]) -> int:
        """Make the copies in ``states`` of one message (None: of every one) due now;
        how many. ``UnknownMessage`` when there is no such message."""
        values = tuple(s.value for s in states)
        with self._transaction(write=True) as conn:
            if message_id is None:
                cursor = conn.execute(
                    "UPDATE copies SET next_try = MIN(next_try, ?) WHERE state IN (?, ?)",
                    (now, *values),
                )
            else:
                _require(conn, message_id)
                cursor = conn.execute(
                    "UPDATE copies SET next_try = MIN(next_try, ?)"
                    " WHERE message = ? AND state IN (?, ?)",
                    (now, message_id, *values),
                )
            return int(cursor.rowcount)

    def delete(self, message_id: str) -> tuple[int, int]:
        """Remove a message and its copies: how many copies, and how many of them were being
        delivered. ``UnknownMessage`` when there is no such message."""
        with self._transaction(write=True) as conn:
            _require(conn, message_id)
            (in_flight,) = conn.execute(
                "SELECT COUNT(*) FROM copies WHERE message = ? AND state = ?",
                (message_id, CopyState.DELIVERING.value),
            ).fetchone()
            count = conn.execute("DELETE FROM copies WHERE message = ?", (message_id,)).rowcount
            [(in_file,)] = conn.execute(
                "DELETE FROM messages WHERE id = ? RETURNING body_file", (message_id,)
            ).fetchall()
        if in_file == 1:  # after the commit, as the relay does (a file no row names is harmless)
            (self.bodies / message_id).unlink(missing_ok=True)
        return int(count), int(in_flight)


def salvage(source: Path) -> recovery.Salvage:
    """``relay.custody.recovery.salvage``; ``StoreError`` (or ``OSError``) when ``source``
    cannot be read at all."""
    with _errors():
        return recovery.salvage(source)


def add_recovered(directory: Path, messages: Sequence[NewMessage], *, fsync: bool = True) -> int:
    """``relay.custody.spool.add_recovered``; ``StoreError`` for SQLite's errors."""
    with _errors():
        return spool.add_recovered(directory, messages, fsync=fsync)


def _copies(
    conn: sqlite3.Connection,
    message_id: str | None = None,
    *,
    states: Sequence[CopyState] = (),
) -> list[CopyRow]:
    values = tuple(s.value for s in states)
    where = (
        "c.message = ?"
        if message_id is not None
        else f"c.state IN ({', '.join('?' * len(values))})"
    )
    params = (message_id,) if message_id is not None else values
    rows = conn.execute(
        "SELECT c.id, c.message, c.rcpt, c.state, c.attempts, c.next_try, c.last_code,"
        " c.last_enhanced, c.last_text, m.received, m.sender"
        " FROM copies c JOIN messages m ON m.id = c.message"
        f" WHERE {where} ORDER BY m.received, c.message, c.id",
        params,
    ).fetchall()
    return [
        CopyRow(r[0], r[1], r[2], CopyState(r[3]), r[4], r[5], r[6], r[7], r[8], r[9], r[10])
        for r in rows
    ]


def _require(conn: sqlite3.Connection, message_id: str) -> None:
    if conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone() is None:
        raise UnknownMessage(message_id)
