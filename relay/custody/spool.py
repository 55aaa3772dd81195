"""Durable custody: one SQLite database in WAL mode, written before the ``250``.

Rule 1: nothing is acknowledged before it is on disk: ``store`` returns only
after a commit with ``synchronous=FULL`` (the WAL is fsynced; SQLite syncs
the directory when it creates the files).
Rule 2: group commit: every write waiting when the writer thread comes free
goes into one transaction and costs one fsync, so durability does not cap
throughput (Postfix pays one fsync per queue file instead).
Rule 3: a message's body is stored once; each copy stores its own header
section and its state. A body of ``BODY_FILE_OCTETS`` or more is a file of
its own (``bodies/ID`` beside the database), written and fsynced (and its
directory) before the transaction that names it commits, and removed after
the one that drops it: SQLite would write it twice (log, then checkpoint)
and read it back to free it, about six times the CPU.
Rule 4: a state change is durable before it is acted on: a copy is marked
``delivering`` before it is sent and ``delivered`` after the upstream's
``250``; a crash between those two can resend that one copy (at least once),
nothing else.
Rule 5: at open, copies left ``delivering`` go back to ``queued``; a record
whose checksum fails, and a database that cannot be read at all, are moved
to quarantine and counted, never raised to the caller.
Rule 6: only a positive verdict of damage sets a database aside: SQLite's
``SQLITE_CORRUPT`` or ``SQLITE_NOTADB``, ``PRAGMA integrity_check`` failing, a
record that cannot be decoded, or a database missing or empty beside body
files. A full disk (``SQLITE_FULL``, ``ENOSPC``, ``EDQUOT``), an I/O error,
a lock or a permission is the environment's trouble: ``open`` raises
``SpoolError`` and changes nothing. The verdict is reached on a read-only
connection, so a damaged spool is set aside byte for byte.
Rule 7: the files stay bounded: the WAL is cut back to ``JOURNAL_SIZE_LIMIT``
after each checkpoint, and when the writer has been idle for
``MAINTAIN_IDLE_SECONDS`` it checkpoints (truncating the WAL) and gives free
pages back to the file system (``auto_vacuum = INCREMENTAL``; a spool made
before that is converted by one ``VACUUM`` once it is small and mostly free).

All SQLite work happens on one thread; coroutines wait on futures.

The modules beside this one hold the parts (``schema``, ``records``, ``errors``,
``bodyfiles``, ``rows``, ``integrity``, ``writer``, ``delivered``, ``queries``,
``lock``); ``Spool`` is their facade.
"""

from __future__ import annotations

import contextlib
import heapq
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from relay.core.model import Outcome
from relay.custody.bodyfiles import BODIES, BODY_FILE_OCTETS, BodyFiles
from relay.custody.delivered import DeliveredBatches
from relay.custody.errors import SpoolError, SpoolFull, environment_error
from relay.custody.integrity import Integrity
from relay.custody.lock import check_unlocked, take_lock
from relay.custody.queries import count_live, next_due, quarantine_records, read_stats, used_bytes
from relay.custody.records import (
    FINAL,
    LIVE,
    LIVE_BYTES,
    CopyRow,
    CopyState,
    Job,
    NewCopy,
    NewMessage,
    body_crc,
    copy_crc,
    jobs_for,
    message_size,
    new_queue_id,
    numbers,
    sort_time,
)
from relay.custody.reserve import Reserve
from relay.custody.rows import Rows
from relay.custody.schema import BUSY_TIMEOUT_MS, PAGE_SIZE, SCHEMA
from relay.custody.writer import MAINTAIN_IDLE_SECONDS, Writer

# Names importable from here as before the spool was split into modules.
__all__ = [
    "BODIES",
    "BODY_FILE_OCTETS",
    "BUSY_TIMEOUT_MS",
    "FINAL",
    "LIVE",
    "MAINTAIN_IDLE_SECONDS",
    "PAGE_SIZE",
    "SCHEMA",
    "CopyRow",
    "CopyState",
    "Job",
    "NewCopy",
    "NewMessage",
    "Spool",
    "SpoolError",
    "SpoolFull",
    "add_recovered",
    "check_unlocked",
    "jobs_for",
    "new_queue_id",
    "read_stats",
]


class Spool:
    """The spool database. ``open`` it, then ``await`` its methods from the event loop.

    Made of parts, each holding its own state: ``Rows`` (the row writes and body
    files), ``Writer`` (the thread and group commit), ``Integrity`` (the checks
    at open) and ``DeliveredBatches`` (``record_delivered``). This class holds
    the operations, each one closure the writer runs in its transaction.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        max_bytes: int = 0,
        history_days: float = 0.0,
        reserve_bytes: int = 0,
    ) -> None:
        self.directory = directory
        # ``spool.reserve_bytes``: room for outcomes when the disk is full (relay.custody.reserve).
        self.reserve = Reserve(directory, reserve_bytes)
        self.path = directory / "spool.db"
        self._max_bytes = max_bytes
        self._rows = Rows(BodyFiles(directory / BODIES, fsync=fsync), history_days=history_days)
        self._writer = Writer(self._rows, self.reserve)
        self._integrity = Integrity(directory, self._rows, fsync=fsync, max_bytes=max_bytes)
        self._delivered = DeliveredBatches(self._writer, self._rows)
        self._lock: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Spool {self.path} live={self.live} commits={self.commits}>"

    @property
    def live(self) -> int:
        """Copies queued, delivering or deferred (see ``writer.LIVE_RECOUNT_SECONDS``)."""
        return self._writer.live

    @property
    def commits(self) -> int:
        """Transactions committed (each one fsync): group commit at work."""
        return self._writer.commits

    @property
    def maintained(self) -> int:
        """Idle checkpoints and vacuums done (Rule 7)."""
        return self._writer.maintained

    @property
    def quarantined(self) -> int:
        """Records (and databases) moved aside since open."""
        return self._rows.quarantined

    # -- lifecycle -----------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the database, recover, and start the writer thread.

        Raises ``SpoolError`` when another relay holds this spool, or the file is
        busy, full or cannot be opened or written: never quarantine a spool that is
        merely in use or on a full disk (Rule 6). A damaged one is set aside whole.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise environment_error(exc) from exc
        self._lock = take_lock(self.directory / "spool.lock")
        try:
            conn, live = self._integrity.open_checked()
        except BaseException:
            self._lock_release()
            raise
        self.reserve.ensure()
        self._writer.start(conn, live)

    def close(self) -> None:
        self._writer.stop()
        self._lock_release()

    def _lock_release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    # -- operations ----------------------------------------------------------------

    async def store(self, message: NewMessage) -> list[int]:
        """Write a message and its copies; returns their ids once they are durable (Rule 1).

        Raises ``SpoolError`` when the write fails or the spool is over ``max_bytes``.
        """

        def write(conn: sqlite3.Connection) -> list[int]:
            if self._max_bytes and (
                used_bytes(conn) + self._rows.files.bytes + message_size(message) > self._max_bytes
            ):
                raise SpoolError("database or disk is full (spool.max_bytes)")
            self._rows.insert(conn, message)
            self._rows.added += sum(c.state in LIVE for c in message.copies)
            rows = conn.execute(
                "SELECT id FROM copies WHERE message = ? ORDER BY id", (message.id,)
            ).fetchall()
            return [int(row[0]) for row in rows]

        return await self._writer.submit(write)

    async def discard(self, message_id: str) -> None:
        """Remove a message that was never acknowledged (direct mode: nothing delivered)."""

        def write(conn: sqlite3.Connection) -> None:
            self._rows.added -= count_live(conn, message_id)
            self._rows.delete_message(conn, message_id)

        await self._writer.submit(write, outcome=True)

    async def claim_due(self, now: float, limit: int) -> list[Job]:
        """Up to ``limit`` copies due by ``now``, marked ``delivering`` durably."""

        def claim(conn: sqlite3.Connection) -> list[Job]:
            # One query per state, each in the order of the (state, next_try) index: with
            # "state IN (...)" SQLite sorted every due copy to return the first few,
            # which made each claim cost in proportion to the backlog.
            rows = heapq.nsmallest(
                limit,
                (
                    row
                    for state in (CopyState.QUEUED, CopyState.DEFERRED)
                    for row in conn.execute(
                        "SELECT c.id, c.message, c.rcpt, c.headers, c.crc, c.attempts, m.sender,"
                        " m.smtputf8, m.auth_user, m.received, m.expires, m.is_dsn, c.next_try"
                        " FROM copies c JOIN messages m ON m.id = c.message"
                        " WHERE c.state = ? AND c.next_try <= ?"
                        " ORDER BY c.next_try, c.id LIMIT ?",
                        (state.value, now, limit),
                    ).fetchall()
                ),
                key=lambda row: (sort_time(row[12]), row[0]),
            )
            jobs = []
            for row in rows:
                copy_id, message_id, rcpt, headers, crc = row[:5]
                if copy_crc(rcpt, headers) != crc:
                    self._rows.quarantine_copy(
                        conn, copy_id, message_id, "copy checksum mismatch", now
                    )
                    continue
                if not isinstance(row[5], int) or not numbers(row[9], row[10]):
                    self._rows.quarantine_copy(
                        conn, copy_id, message_id, "copy record damaged", now
                    )
                    continue
                jobs.append(
                    Job(
                        copy_id,
                        message_id,
                        rcpt,
                        headers,
                        row[5],
                        row[6],
                        bool(row[7]),
                        row[8],
                        row[9],
                        row[10],
                        bool(row[11]),
                    )
                )
            conn.executemany(
                "UPDATE copies SET state = ?, updated = ? WHERE id = ?",
                [(CopyState.DELIVERING.value, now, job.copy_id) for job in jobs],
            )
            return jobs

        return await self._writer.submit(claim)

    async def body(self, message_id: str) -> bytes | None:
        """The message body, or None if it is gone or corrupt (then quarantined)."""

        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT body, body_crc, body_file FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                return None
            body = self._rows.read_body(message_id, row[0], row[2])
            if not isinstance(body, bytes) or body_crc(body) != row[1]:
                missing = body is None and row[2] == 1
                reason = "body file missing" if missing else "body checksum mismatch"
                self._rows.quarantine_message(conn, message_id, reason, time.time())
                return None
            return body

        return await self._writer.submit(read)

    async def record(
        self,
        copy_id: int,
        state: CopyState,
        *,
        now: float,
        next_try: float = 0.0,
        attempts: int | None = None,
        outcome: Outcome | None = None,
        also_store: NewMessage | None = None,
    ) -> bool:
        """Move a copy to ``state`` durably; ``also_store`` (a DSN) commits with it.

        False when the copy is gone (deleted or quarantined meanwhile): nothing was written,
        not even ``also_store``.
        """

        def write(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT message, attempts, CAST(state AS BLOB) FROM copies WHERE id = ?",
                (copy_id,),
            ).fetchone()
            if row is None:
                return False  # deleted meanwhile (`solo-relay queue delete`, quarantine)
            self._rows.added += (state in LIVE) - (row[2] in LIVE_BYTES)
            conn.execute(
                "UPDATE copies SET state = ?, next_try = ?, attempts = ?, last_code = ?,"
                " last_enhanced = ?, last_text = ?, updated = ? WHERE id = ?",
                (
                    state.value,
                    next_try,
                    row[1] if attempts is None else attempts,
                    outcome.code if outcome else 0,
                    outcome.enhanced if outcome else "",
                    outcome.text[:500] if outcome else "",
                    now,
                    copy_id,
                ),
            )
            if also_store is not None:
                self._rows.insert(conn, also_store)  # the DSN commits with the failure, or neither
                self._rows.added += len(also_store.copies)
            if state in FINAL:
                self._rows.keep_history(conn, [copy_id], now)
            self._rows.drop_if_done(conn, row[0])
            return True

        return await self._writer.submit(write, outcome=True)

    async def record_delivered(
        self, copy_id: int, *, now: float, attempts: int, outcome: Outcome
    ) -> bool:
        """``record(copy_id, DELIVERED, ...)``, batched with the other copies delivered
        meanwhile into one operation (``relay.custody.delivered``)."""
        return await self._delivered.record(copy_id, now=now, attempts=attempts, outcome=outcome)

    async def release(
        self, copy_ids: Sequence[int], now: float, *, next_try: float | None = None
    ) -> None:
        """Put claimed copies back to ``queued`` (a drain that ran out of time); with
        ``next_try``, not due before it (an outcome that could not be recorded)."""

        def write(conn: sqlite3.Connection) -> None:
            if next_try is not None:
                conn.executemany(
                    "UPDATE copies SET state = ?, updated = ?, next_try = MAX(next_try, ?)"
                    " WHERE id = ? AND state = ?",
                    [
                        (CopyState.QUEUED.value, now, next_try, i, CopyState.DELIVERING.value)
                        for i in copy_ids
                    ],
                )
                return
            conn.executemany(
                "UPDATE copies SET state = ?, updated = ? WHERE id = ? AND state = ?",
                [(CopyState.QUEUED.value, now, i, CopyState.DELIVERING.value) for i in copy_ids],
            )

        await self._writer.submit(write, outcome=True)

    async def stats(self) -> tuple[dict[CopyState, int], float | None]:
        """Copies by state, and the ``received`` time of the oldest live copy's message."""
        return await self._writer.submit(read_stats)

    async def quarantine_present(self) -> int:
        """Records in the quarantine table plus databases set aside in ``quarantine/`` now."""
        aside = self.directory / "quarantine"
        databases = sum(1 for _ in aside.glob("spool-*.db")) if aside.is_dir() else 0
        return await self._writer.submit(quarantine_records) + databases

    async def next_due(self) -> float | None:
        return await self._writer.submit(next_due)


def add_recovered(directory: Path, messages: Sequence[NewMessage], *, fsync: bool = True) -> int:
    """Insert recovered messages into the existing spool in ``directory``; how many were added.

    For ``solo-relay queue recover``: one short write transaction beside a running relay
    (as the other ``queue`` commands), body files written and fsynced before it commits.
    A message whose id the spool already holds is left alone. Raises ``sqlite3.Error``
    and ``SpoolError``; on failure nothing is added.
    """
    spool = Spool(directory, fsync=fsync)
    path = spool.path
    if not path.is_file():
        raise SpoolError(f"no spool database at {path} (start the relay once to make one)")
    conn = sqlite3.connect(
        path.resolve().as_uri() + "?mode=rw",
        uri=True,
        isolation_level=None,
        timeout=BUSY_TIMEOUT_MS / 1000,
    )
    added = 0
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'OFF'}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for message in messages:
                if conn.execute("SELECT 1 FROM messages WHERE id = ?", (message.id,)).fetchone():
                    continue
                spool._rows.insert(conn, message)
                added += 1
            spool._rows.files.before_commit()
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            spool._rows.files.rolled_back()
            raise
        spool._rows.files.committed()
    finally:
        conn.close()
    return added
