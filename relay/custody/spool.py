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
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import functools
import heapq
import logging
import os
import queue
import re
import secrets
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar
from urllib.parse import quote

from relay.core.addresses import Address
from relay.core.errors import RelayError, Reply
from relay.core.model import Outcome
from relay.custody import history
from relay.custody.reserve import Reserve

log = logging.getLogger("relay.spool")


def new_queue_id() -> str:
    """Sortable by time, unique enough per deployment, and naming nobody."""
    return f"{int(time.time()):x}{secrets.token_hex(5)}".upper()


T = TypeVar("T")
MAX_BATCH = 512  # writes per transaction; bounded so one commit never holds the lock for long
# ``live`` follows this process's own writes exactly; it is also recounted (a scan of the
# index) at most this often, for what other processes (`solo-relay queue`) changed.
LIVE_RECOUNT_SECONDS = 1.0
# Errors about one operation's own data, not the file or the disk: that operation fails alone.
_OWN_FAULT = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError)
# Room above ``spool.max_bytes`` kept for state changes and DSNs (at least this much):
# a state change rewrites its copy's row (a header section of up to 1 MiB), and a DSN
# quotes that header section once more.
HEADROOM_BYTES = 4 * 1024 * 1024
PAGE_SIZE = 16384  # SQLite's default is 4096
BODY_FILE_OCTETS = 64 * 1024  # bodies this large or larger live in files (Rule 3)
BODIES = "bodies"
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")  # a queue id safe as a file name
BUSY_TIMEOUT_MS = 10_000  # `solo-relay queue` commands share the file with a running relay
# Rule 7. SQLite's WAL never shrinks by itself (it is reused from the start after a
# checkpoint); past a checkpoint it is truncated to this. Its auto-checkpoint runs at
# 1,000 pages (16 MiB here), so a busy spool's WAL stays about that size.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024
MAINTAIN_IDLE_SECONDS = 2.0  # a writer idle this long checkpoints and vacuums
VACUUM_MIN_FREE_PAGES = 64  # fewer free pages than this (1 MiB) are not worth a vacuum
CONVERT_MAX_BYTES = 64 * 1024 * 1024  # live data a one-time VACUUM may rewrite (Rule 7)
VACUUM_MAX_PAGES = 4096  # pages given back per idle moment (64 MiB), so a write never waits long
# Rule 6: SQLite's primary result codes that say the file itself is damaged.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL,
    auth_user TEXT NOT NULL DEFAULT '',
    received REAL NOT NULL,
    expires REAL NOT NULL,
    body_crc INTEGER NOT NULL,
    is_dsn INTEGER NOT NULL DEFAULT 0,
    body_file INTEGER NOT NULL DEFAULT 0,  -- 1: the body is the file bodies/<id>
    -- Last: SQLite reads a row's columns in order, and a large body spills into
    -- overflow pages that every read of a later column would have to walk.
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS copies (
    id INTEGER PRIMARY KEY,
    message TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    headers BLOB NOT NULL,
    crc INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_code INTEGER NOT NULL DEFAULT 0,
    last_enhanced TEXT NOT NULL DEFAULT '',
    last_text TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS copies_due ON copies (state, next_try);
CREATE INDEX IF NOT EXISTS copies_message ON copies (message);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    data BLOB
);
"""


class CopyState(enum.Enum):
    QUEUED = "queued"
    DELIVERING = "delivering"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"


LIVE = (CopyState.QUEUED, CopyState.DELIVERING, CopyState.DEFERRED)
_LIVE_VALUES = tuple(s.value for s in LIVE)
_LIVE_BYTES = tuple(s.value.encode() for s in LIVE)
FINAL = (CopyState.DELIVERED, CopyState.FAILED)


class SpoolError(RelayError):
    """The spool could not take or change a record; the application gets ``451 4.3.0``."""

    reply = Reply(451, "4.3.0", "Temporary storage failure, try again later")


class SpoolFull(SpoolError):
    """The spool's file system (or ``spool.max_bytes``) is full: ``452 4.3.1`` (RFC 3463)."""

    reply = Reply(452, "4.3.1", "Insufficient system storage, try again later")


class _Damaged(Exception):
    """Rule 6: a positive verdict that the database is damaged (the reason is the message)."""


@dataclass(frozen=True, slots=True)
class NewCopy:
    rcpt: str
    headers: bytes
    state: CopyState = CopyState.QUEUED
    next_try: float = 0.0
    attempts: int = 0
    last_code: int = 0
    last_enhanced: str = ""
    last_text: str = ""


@dataclass(frozen=True, slots=True)
class NewMessage:
    id: str
    sender: str  # "" for <>
    smtputf8: bool
    received: float
    expires: float
    body: bytes | memoryview
    copies: tuple[NewCopy, ...]
    auth_user: str = ""
    is_dsn: bool = False


@dataclass(frozen=True, slots=True)
class Job:
    """A copy claimed for delivery (now ``delivering``)."""

    copy_id: int
    message_id: str
    rcpt: str
    headers: bytes
    attempts: int
    sender: str
    smtputf8: bool
    auth_user: str
    received: float
    expires: float
    is_dsn: bool
    address: Address | None = None  # ``rcpt`` as already validated, when handed over


@dataclass(slots=True)
class _DeliveredBatch:
    """Copies delivered, waiting to be recorded in one operation (``record_delivered``)."""

    items: list[tuple[int, float, int, Outcome]] = field(default_factory=list)
    task: asyncio.Future[set[int]] | None = None


class _Item(NamedTuple):
    """One operation for the writer thread, and the caller's future."""

    operation: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    outcome: bool  # may use the reserve (``_submit``)


@dataclass(frozen=True, slots=True)
class CopyRow:
    """One copy as ``solo-relay queue`` shows it."""

    copy_id: int
    message_id: str
    rcpt: str
    state: CopyState
    attempts: int
    next_try: float
    last_code: int
    last_enhanced: str
    last_text: str
    received: float
    sender: str


class _BodyFiles:
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


class Spool:
    """The spool database. ``open`` it, then ``await`` its methods from the event loop."""

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
        # ``spool.history_days``: final copies kept as rows of ``history`` (relay.custody.history).
        self._history_seconds = history_days * history.DAY
        self._pruned_at = 0.0
        self.path = directory / "spool.db"
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._files = _BodyFiles(directory / BODIES, fsync=fsync)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock: IO[bytes] | None = None
        self.quarantined = 0  # records moved aside since open
        self.live = 0  # copies queued, delivering or deferred (see LIVE_RECOUNT_SECONDS)
        self._counted_at = 0.0
        self._added = 0  # change in live copies by the transaction in progress
        self._delivered: _DeliveredBatch | None = None  # record_delivered's open batch
        self._delivered_lock = threading.Lock()  # shared with the writer thread
        self.commits = 0  # transactions committed (each one fsync): group commit at work
        self.maintained = 0  # idle checkpoints and vacuums done (Rule 7)

    def __repr__(self) -> str:
        return f"<Spool {self.path} live={self.live} commits={self.commits}>"

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
            raise _environment_error(exc) from exc
        self._lock = _take_lock(self.directory / "spool.lock")
        try:
            conn = self._open_checked()
        except BaseException:
            self._lock_release()
            raise
        self.reserve.ensure()
        self._thread = threading.Thread(target=self._run, args=(conn,), name="spool", daemon=True)
        self._thread.start()

    def _open_checked(self) -> sqlite3.Connection:
        """The verdict (read-only), then the read-write connection, recovered."""
        try:
            self._inspect()
        except _Damaged as damage:
            self._set_aside(str(damage))
        counted = self.quarantined
        conn = self._connect()
        try:
            self._recover(conn)
        except Exception as exc:
            conn.close()  # rolls back what the scan had set aside: the whole file goes
            if not _damage(exc):
                raise _environment_error(exc) from exc
            self.quarantined = counted
            self._set_aside(f"{type(exc).__name__}: {exc}")
            conn = self._connect()
            try:
                self._recover(conn)
            except Exception as again:
                conn.close()
                raise _environment_error(again) from again
        return conn

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._lock_release()

    def _lock_release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _inspect(self) -> None:
        """Rule 6: raise ``_Damaged`` on a positive verdict, ``SpoolError`` on trouble.

        Read-only: nothing is written to the database or its WAL, so a damaged spool
        is set aside exactly as it was found.
        """
        bodies = _entries(self._files.directory)
        wal = Path(str(self.path) + "-wal")
        size = self.path.stat().st_size if self.path.exists() else 0
        if size == 0:
            if bodies or (wal.exists() and wal.stat().st_size > 0):
                state = "missing" if not self.path.exists() else "empty"
                raise _Damaged(f"spool.db {state} beside {bodies} body files or a WAL")
            return  # a new spool
        try:
            conn = sqlite3.connect(
                f"file:{quote(str(self.path.resolve()))}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise _environment_error(exc) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # integrity_check, not quick_check: it also compares each index with its
            # table, and claims read the indexes (a damaged index passed quick_check and
            # then failed every claim with SQLITE_CORRUPT). 100,000 copies: 0.3 s, not 0.2.
            row = conn.execute("PRAGMA integrity_check(1)").fetchone()
            if row is None or row[0] != "ok":
                raise _Damaged(f"integrity_check: {row[0] if row else None}")
        except _Damaged:
            raise
        except Exception as exc:
            if _damage(exc):
                raise _Damaged(f"{type(exc).__name__}: {exc}") from exc
            raise _environment_error(exc) from exc
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = self._open_db()
        except sqlite3.Error as exc:
            raise _environment_error(exc) from exc
        return conn

    def _set_aside(self, reason: str) -> None:
        """Rule 5: a damaged database is moved aside whole, with its body files."""
        aside = _unused(self.directory / "quarantine" / f"spool-{int(time.time())}.db")
        try:
            aside.parent.mkdir(exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                source = Path(str(self.path) + suffix)
                if source.exists():
                    source.rename(Path(str(aside) + suffix))
            if self._files.directory.is_dir():  # its large bodies go with it, for recovery
                self._files.directory.rename(Path(str(aside) + "." + BODIES))
        except OSError as exc:
            raise _environment_error(exc) from exc
        log.error(
            "spool database damaged, quarantined: solo-relay queue recover brings back"
            " what is readable",
            extra={"fields": {"error": reason, "moved_to": str(aside)}},
        )
        self.quarantined += 1

    def _open_db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._configure(conn)
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # A new database only (a page size is fixed once the file has content): a 1 MB
        # body spans 64 overflow pages instead of 256, which roughly halves the CPU
        # of writing and freeing it (``tests/benchmarks/bench_spool.py``).
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # a new database only (Rule 7)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        conn.execute(f"PRAGMA synchronous = {'FULL' if self._fsync else 'OFF'}")
        conn.executescript(SCHEMA)
        if self._history_seconds:
            conn.executescript(history.SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        if "body_file" not in columns:  # a spool made before bodies could be files
            conn.execute("ALTER TABLE messages ADD COLUMN body_file INTEGER NOT NULL DEFAULT 0")
        if self._max_bytes:
            # ``max_bytes`` bounds new mail (``store`` checks it); SQLite's own limit sits
            # above it, so that claims, outcomes and DSNs can still be written when new mail
            # no longer fits: otherwise a full spool could never be drained.
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            hard = self._max_bytes + max(self._max_bytes // 10, HEADROOM_BYTES)
            conn.execute(f"PRAGMA max_page_count = {max(hard // page, 1)}")

    def _recover(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE copies SET state = ?, updated = ? WHERE state = ?",
            (CopyState.QUEUED.value, now, CopyState.DELIVERING.value),
        )
        # One row at a time (a backlog can be larger than memory); act once the scan is done.
        bad_messages = []
        in_files = set()
        # Texts read later by every claim (sender, auth_user) are checked here as bytes: one
        # that is not UTF-8 would fail each claim that meets it, and stall all delivery.
        for message_id, body, crc, received, expires, in_file, *texts in conn.execute(
            "SELECT id, body, body_crc, received, expires, body_file,"
            " CAST(sender AS BLOB), CAST(auth_user AS BLOB) FROM messages"
        ):
            if in_file == 1:
                in_files.add(message_id)
            stored = self._read_body(message_id, body, in_file)
            if not _utf8(*texts):
                bad_messages.append((message_id, "message text damaged"))
            elif stored is None and in_file == 1:
                bad_messages.append((message_id, "body file missing"))
            elif _body_crc(stored) != crc:
                bad_messages.append((message_id, "body checksum mismatch"))
            elif not _numbers(received, expires):
                bad_messages.append((message_id, "times damaged"))
        for message_id, reason in bad_messages:
            self._quarantine_message(conn, message_id, reason, now)
        # rcpt and state are read as bytes: a corrupt byte is a mismatch, not a decode error.
        states = {s.value.encode() for s in CopyState}
        bad_copies = []
        for (
            copy_id,
            message_id,
            rcpt,
            headers,
            crc,
            state,
            attempts,
            next_try,
            *texts,
        ) in conn.execute(
            "SELECT id, message, CAST(rcpt AS BLOB), headers, crc, CAST(state AS BLOB),"
            " attempts, next_try, CAST(last_enhanced AS BLOB), CAST(last_text AS BLOB)"
            " FROM copies"
        ):
            if _copy_crc(rcpt, headers) != crc:
                bad_copies.append((copy_id, message_id, "copy checksum mismatch"))
            elif state not in states:
                bad_copies.append((copy_id, message_id, "copy state unknown"))
            elif not isinstance(attempts, int) or not _numbers(next_try) or not _utf8(*texts):
                bad_copies.append((copy_id, message_id, "copy record damaged"))
        for copy_id, message_id, reason in bad_copies:
            self._quarantine_copy(conn, copy_id, message_id, reason, now)
        conn.execute("DELETE FROM copies WHERE message NOT IN (SELECT id FROM messages)")
        conn.execute("COMMIT")
        self._files.committed()
        self._files.sweep(in_files - {message_id for message_id, _ in bad_messages})
        self.live = _count_live(conn)

    def _quarantine_message(
        self, conn: sqlite3.Connection, message_id: str, reason: str, now: float
    ) -> None:
        row = conn.execute(
            "SELECT body, body_file FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        data = None if row is None else self._read_body(message_id, row[0], row[1])
        conn.execute(
            "INSERT INTO quarantine (kind, ref, reason, at, data) VALUES ('message', ?, ?, ?, ?)",
            (message_id, reason, now, data),
        )
        self._added -= _count_live(conn, message_id)
        self._delete_message(conn, message_id)
        self.quarantined += 1
        log.error(
            "spool record quarantined", extra={"fields": {"queue_id": message_id, "reason": reason}}
        )

    def _quarantine_copy(
        self, conn: sqlite3.Connection, copy_id: int, message_id: str, reason: str, now: float
    ) -> None:
        # The state as bytes: a damaged row's may not even be UTF-8.
        state = conn.execute(
            "SELECT CAST(state AS BLOB) FROM copies WHERE id = ?", (copy_id,)
        ).fetchone()
        if state is None:
            return  # already gone with its message
        conn.execute(
            "INSERT INTO quarantine (kind, ref, reason, at, data)"
            " SELECT 'copy', ?, ?, ?, headers FROM copies WHERE id = ?",
            (f"{message_id}/{copy_id}", reason, now, copy_id),
        )
        self._added -= state[0] in _LIVE_BYTES
        conn.execute("DELETE FROM copies WHERE id = ?", (copy_id,))
        self._drop_if_done(conn, message_id)  # else a message with no live copy stays forever
        self.quarantined += 1
        log.error(
            "spool record quarantined", extra={"fields": {"queue_id": message_id, "reason": reason}}
        )

    # -- rows and body files (writer thread) -------------------------------------------

    def _insert(self, conn: sqlite3.Connection, message: NewMessage) -> None:
        body = message.body  # a large one goes to its file as it is: no copy in memory
        crc = zlib.crc32(body)
        in_file = len(body) >= BODY_FILE_OCTETS and _FILE_NAME.fullmatch(message.id) is not None
        conn.execute(
            "INSERT INTO messages (id, sender, smtputf8, auth_user, received, expires, body,"
            " body_crc, is_dsn, body_file) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message.id,
                message.sender,
                int(message.smtputf8),
                message.auth_user,
                message.received,
                message.expires,
                b"" if in_file else bytes(body),
                crc,
                int(message.is_dsn),
                int(in_file),
            ),
        )  # first: a duplicate id fails here, before any file is made
        if in_file:
            try:
                self._files.write(message.id, body)
            except OSError as exc:  # a full or failing disk: this message fails alone
                kind = SpoolFull if _full(exc) else SpoolError
                raise kind(f"cannot write the body file: {exc.strerror}") from exc
        conn.executemany(
            "INSERT INTO copies (message, rcpt, headers, crc, state, attempts, next_try, last_code,"
            " last_enhanced, last_text, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    message.id,
                    c.rcpt,
                    c.headers,
                    _copy_crc(c.rcpt, c.headers),
                    c.state.value,
                    c.attempts,
                    c.next_try,
                    c.last_code,
                    c.last_enhanced,
                    c.last_text,
                    message.received,
                )
                for c in message.copies
            ],
        )
        if not any(c.state in LIVE for c in message.copies):
            self._drop_if_done(conn, message.id)

    def _keep_history(self, conn: sqlite3.Connection, copy_ids: list[int], now: float) -> None:
        """Final copies into ``history`` (``spool.history_days``); old rows out, once a minute."""
        if not self._history_seconds:
            return
        history.keep(conn, copy_ids, now)
        if abs(now - self._pruned_at) >= history.PRUNE_SECONDS:
            history.prune(conn, now - self._history_seconds)
            self._pruned_at = now

    def _drop_if_done(self, conn: sqlite3.Connection, message_id: str) -> None:
        """A message whose copies are all final leaves the spool (its story is in logs, metrics)."""
        live = conn.execute(
            "SELECT 1 FROM copies WHERE message = ? AND state IN (?, ?, ?) LIMIT 1",
            (message_id, *_LIVE_VALUES),
        ).fetchone()
        if live is None:
            self._delete_message(conn, message_id)

    def _delete_message(self, conn: sqlite3.Connection, message_id: str) -> None:
        conn.execute("DELETE FROM copies WHERE message = ?", (message_id,))
        for (in_file,) in conn.execute(
            "DELETE FROM messages WHERE id = ? RETURNING body_file", (message_id,)
        ).fetchall():
            if in_file == 1:
                self._files.forget(message_id)  # removed once this transaction commits

    def _read_body(self, message_id: str, body: object, in_file: object) -> object:
        """The stored body: the column, or the file (None when it is missing)."""
        return self._files.read(message_id) if in_file == 1 else body

    # -- the writer thread ---------------------------------------------------------

    def _run(self, conn: sqlite3.Connection) -> None:
        stopping = False
        dirty = False  # written since the last maintenance (Rule 7)
        while not stopping:
            try:
                item = self._queue.get(timeout=MAINTAIN_IDLE_SECONDS if dirty else None)
            except queue.Empty:
                self._maintain(conn)
                dirty = False
                continue
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            try:
                self._commit(conn, batch)
            except Exception as exc:  # the thread must live: every later caller waits on it
                log.exception("spool writer error")
                failure = SpoolError(f"spool writer error: {exc}")
                _answer([(item.future, None, failure) for item in batch])
            dirty = True
        conn.close()

    def _maintain(self, conn: sqlite3.Connection) -> None:
        """Rule 7, on an idle writer: free pages back to the file system, the WAL cut to 0.

        Failures (a full disk, a ``solo-relay queue`` reader holding the WAL) are left
        for the next idle moment: nothing here is needed for custody.
        """
        try:
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            mode = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            # A spool made before Rule 7 (auto_vacuum off): one VACUUM, when it is mostly
            # free pages and small, turns incremental vacuum on from then on.
            used = (pages - free) * PAGE_SIZE
            if (
                not mode
                and free >= VACUUM_MIN_FREE_PAGES
                and free * 2 >= pages
                and (used <= CONVERT_MAX_BYTES)
            ):
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("VACUUM")
                free, mode = 0, 2
            if free >= VACUUM_MIN_FREE_PAGES and mode:
                # Python's sqlite3 steps a statement that returns no row once, and each
                # step of incremental_vacuum frees one page: one statement a page, all in
                # one transaction (one fsync).
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for _ in range(min(free, VACUUM_MAX_PAGES)):
                        conn.execute("PRAGMA incremental_vacuum")
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            self.reserve.ensure()  # made again once the disk has room (relay.custody.reserve)
            self.maintained += 1
        except sqlite3.Error as exc:
            log.info("spool maintenance postponed", extra={"fields": {"error": str(exc)}})

    def _commit(self, conn: sqlite3.Connection, batch: Sequence[_Item]) -> None:
        results: list[_Answer] = []
        self._added = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            for operation, future, _ in batch:
                # A caller cancelled before its turn (a dropped session, a drain) is gone:
                # its write is skipped. (Read from this thread, the flag can only be late:
                # a caller cancelled from now on finds its write done, unanswered.)
                if future.cancelled():
                    continue
                conn.execute("SAVEPOINT op")
                files = self._files.mark()
                try:
                    result = operation(conn)
                except _OWN_FAULT as exc:  # this operation's data (a duplicate id): it alone
                    conn.execute("ROLLBACK TO op")
                    self._files.rollback_to(files)
                    own = SpoolError(str(exc))
                    own.__cause__ = exc
                    results.append((future, None, own))
                except sqlite3.DatabaseError:
                    raise  # the disk or the file: the whole transaction is suspect
                except Exception as exc:  # a bad operation fails alone
                    conn.execute("ROLLBACK TO op")
                    self._files.rollback_to(files)
                    results.append((future, None, exc))
                else:
                    results.append((future, result, None))
                conn.execute("RELEASE op")
            self._files.before_commit()
            conn.execute("COMMIT")
            self._files.committed()
        except (sqlite3.DatabaseError, OSError) as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._files.rolled_back()
            failure = SpoolFull(str(exc)) if _full(exc) else SpoolError(str(exc))
            if isinstance(failure, SpoolFull) and self._into_reserve(conn, batch, failure):
                return
            log.error("spool write failed", extra={"fields": {"error": str(exc)}})
            results = [(item.future, None, failure) for item in batch]
        else:
            self.commits += 1
            now = time.monotonic()
            if now - self._counted_at < LIVE_RECOUNT_SECONDS:
                self.live += self._added
            else:
                with contextlib.suppress(sqlite3.Error):  # committed: a count never undoes that
                    self.live = _count_live(conn)
                    self._counted_at = now
        _answer(results)

    def _into_reserve(
        self, conn: sqlite3.Connection, batch: Sequence[_Item], full: SpoolFull
    ) -> bool:
        """Rule 1 of relay.custody.reserve: a group that failed for want of space and holds outcomes
        gives up the reserve, and the outcomes go again, alone, into the room it gave
        back; new mail in the group fails as it would have. False: no reserve to give."""
        outcomes = [item for item in batch if item.outcome]
        if not outcomes or not self.reserve.release():
            return False
        _answer([(item.future, None, full) for item in batch if not item.outcome])
        self._commit(conn, outcomes)
        return True

    async def _submit(
        self, operation: Callable[[sqlite3.Connection], T], *, outcome: bool = False
    ) -> T:
        """Queue ``operation`` for the writer; ``outcome``: it ends (or hands back) a copy's
        custody after the upstream's reply, and may use the reserve (relay.custody.reserve)."""
        if self._thread is None:
            raise SpoolError("spool is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Item(operation, future, outcome))
        return await future

    # -- operations ----------------------------------------------------------------

    async def store(self, message: NewMessage) -> list[int]:
        """Write a message and its copies; returns their ids once they are durable (Rule 1).

        Raises ``SpoolError`` when the write fails or the spool is over ``max_bytes``.
        """

        def write(conn: sqlite3.Connection) -> list[int]:
            if self._max_bytes and (
                _used_bytes(conn) + self._files.bytes + _size(message) > self._max_bytes
            ):
                raise SpoolError("database or disk is full (spool.max_bytes)")
            self._insert(conn, message)
            self._added += sum(c.state in LIVE for c in message.copies)
            rows = conn.execute(
                "SELECT id FROM copies WHERE message = ? ORDER BY id", (message.id,)
            ).fetchall()
            return [int(row[0]) for row in rows]

        return await self._submit(write)

    async def discard(self, message_id: str) -> None:
        """Remove a message that was never acknowledged (direct mode: nothing delivered)."""

        def write(conn: sqlite3.Connection) -> None:
            self._added -= _count_live(conn, message_id)
            self._delete_message(conn, message_id)

        await self._submit(write, outcome=True)

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
                key=lambda row: (_sort_time(row[12]), row[0]),
            )
            jobs = []
            for row in rows:
                copy_id, message_id, rcpt, headers, crc = row[:5]
                if _copy_crc(rcpt, headers) != crc:
                    self._quarantine_copy(conn, copy_id, message_id, "copy checksum mismatch", now)
                    continue
                if not isinstance(row[5], int) or not _numbers(row[9], row[10]):
                    self._quarantine_copy(conn, copy_id, message_id, "copy record damaged", now)
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

        return await self._submit(claim)

    async def body(self, message_id: str) -> bytes | None:
        """The message body, or None if it is gone or corrupt (then quarantined)."""

        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT body, body_crc, body_file FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                return None
            body = self._read_body(message_id, row[0], row[2])
            if not isinstance(body, bytes) or _body_crc(body) != row[1]:
                missing = body is None and row[2] == 1
                reason = "body file missing" if missing else "body checksum mismatch"
                self._quarantine_message(conn, message_id, reason, time.time())
                return None
            return body

        return await self._submit(read)

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
            self._added += (state in LIVE) - (row[2] in _LIVE_BYTES)
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
                self._insert(conn, also_store)  # the DSN commits with the failure, or neither
                self._added += len(also_store.copies)
            if state in FINAL:
                self._keep_history(conn, [copy_id], now)
            self._drop_if_done(conn, row[0])
            return True

        return await self._submit(write, outcome=True)

    async def record_delivered(
        self, copy_id: int, *, now: float, attempts: int, outcome: Outcome
    ) -> bool:
        """``record(copy_id, DELIVERED, ...)``, batched with other copies delivered meanwhile.

        The workers finish hundreds of copies a second: every copy that reports while
        a batch waits for the writer joins it, and the batch is one operation (a
        few statements for all its copies) instead of one each.
        """
        with self._delivered_lock:
            batch = self._delivered
            # A batch whose write already ended (it failed before closing itself: a lock
            # held too long, the disk full for another write of its group) takes no more.
            if batch is None or (batch.task is not None and batch.task.done()):
                batch = self._delivered = _DeliveredBatch()
            batch.items.append((copy_id, now, attempts, outcome))
        if batch.task is None:  # the first in this batch (all callers are on one loop)
            batch.task = asyncio.ensure_future(
                self._submit(functools.partial(self._write_delivered, batch), outcome=True)
            )
        found = await asyncio.shield(batch.task)
        return copy_id in found

    def _write_delivered(self, batch: _DeliveredBatch, conn: sqlite3.Connection) -> set[int]:
        with self._delivered_lock:  # closed: later copies start the next batch
            if self._delivered is batch:
                self._delivered = None
            items = list(batch.items)
        found: dict[int, tuple[str, bytes]] = {}
        for start in range(0, len(items), 500):  # within SQLite's limit on parameters
            ids = [item[0] for item in items[start : start + 500]]
            marks = ",".join("?" * len(ids))
            for copy_id, message_id, state in conn.execute(
                f"SELECT id, message, CAST(state AS BLOB) FROM copies WHERE id IN ({marks})",
                ids,
            ):
                found[copy_id] = (message_id, state)
        conn.executemany(
            "UPDATE copies SET state = ?, next_try = 0, attempts = ?, last_code = ?,"
            " last_enhanced = ?, last_text = ?, updated = ? WHERE id = ?",
            [
                (
                    CopyState.DELIVERED.value,
                    attempts,
                    outcome.code,
                    outcome.enhanced,
                    outcome.text[:500],
                    now,
                    copy_id,
                )
                for copy_id, now, attempts, outcome in items
                if copy_id in found
            ],
        )
        self._added -= sum(state in _LIVE_BYTES for _, state in found.values())
        if found:
            self._keep_history(conn, sorted(found), max(item[1] for item in items))
        for message_id in {message_id for message_id, _ in found.values()}:
            self._drop_if_done(conn, message_id)
        return set(found)

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

        await self._submit(write, outcome=True)

    async def stats(self) -> tuple[dict[CopyState, int], float | None]:
        """Copies by state, and the ``received`` time of the oldest live copy's message."""
        return await self._submit(read_stats)

    async def quarantine_present(self) -> int:
        """Records in the quarantine table plus databases set aside in ``quarantine/`` now."""

        def read(conn: sqlite3.Connection) -> int:
            (records,) = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()
            return int(records)

        aside = self.directory / "quarantine"
        databases = sum(1 for _ in aside.glob("spool-*.db")) if aside.is_dir() else 0
        return await self._submit(read) + databases

    async def next_due(self) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            times = [
                row[0]
                for state in (CopyState.QUEUED, CopyState.DEFERRED)  # each an index lookup
                for row in conn.execute(
                    "SELECT MIN(next_try) FROM copies WHERE state = ?", (state.value,)
                )
                if _numbers(row[0])
            ]
            return float(min(times)) if times else None

        return await self._submit(read)


def read_stats(conn: sqlite3.Connection) -> tuple[dict[CopyState, int], float | None]:
    counts = dict.fromkeys(CopyState, 0)
    known = {s.value: s for s in CopyState}
    for state, count in conn.execute("SELECT state, COUNT(*) FROM copies GROUP BY state"):
        if state in known:  # a corrupt state is quarantined at the next open, never a crash
            counts[known[state]] = count
    row = conn.execute(
        "SELECT MIN(m.received) FROM messages m JOIN copies c ON c.message = m.id"
        " WHERE c.state IN (?, ?, ?)",
        tuple(s.value for s in LIVE),
    ).fetchone()
    return counts, (float(row[0]) if row is not None and _numbers(row[0]) else None)


def _damage(exc: BaseException) -> bool:
    """Rule 6: whether an error reading the spool is a verdict that the file is damaged."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:  # the module's own: text that a column's type cannot hold
            return "could not decode" in str(exc).lower()
        return code & 0xFF in _DAMAGE_CODES
    # A value no healthy spool holds: text that is not UTF-8, a number out of range.
    return isinstance(exc, ValueError | TypeError | OverflowError)


def _full(exc: BaseException) -> bool:
    """A full file system or quota (or SQLite's own limit, ``spool.max_bytes``)."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_FULL
    )


def _environment_error(exc: BaseException) -> SpoolError:
    """Rule 6: trouble that is not damage, as the one line an operator needs."""
    if isinstance(exc, SpoolError):
        return exc
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if _full(exc):
        return SpoolFull(f"cannot open the spool: {text} (free space, then start again)")
    return SpoolError(f"cannot open the spool: {text}")


def _utf8(*values: object) -> bool:
    """Every value is stored text that decodes (a column read ``CAST(... AS BLOB)``)."""
    try:
        for value in values:
            if isinstance(value, bytes):
                value.decode("utf-8")
            elif value is not None:
                return False
    except UnicodeDecodeError:
        return False
    return True


def _entries(directory: Path) -> int:
    """How many entries ``directory`` holds (0 when it does not exist)."""
    try:
        with os.scandir(directory) as entries:
            return sum(1 for _ in entries)
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sort_time(value: object) -> float:
    """A stored time for ordering; a damaged one (quarantined by the caller) sorts first."""
    return float(value) if _numbers(value) else float("-inf")  # type: ignore[arg-type]


def _numbers(*values: object) -> bool:
    """Every value is a real number (a damaged row can hold text where a time should be)."""
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _take_lock(path: Path, *, write_pid: bool = True) -> IO[bytes]:
    """An exclusive lock on the spool directory for this process's life: one relay per spool.

    The lock file holds the holder's process id, so a second relay can name it.
    """
    try:
        handle = open(path, "a+b")  # noqa: SIM115 - held open until close()
    except OSError as exc:
        raise _environment_error(exc) from exc
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
        _take_lock(directory / "spool.lock", write_pid=False).close()


def _copy_crc(rcpt: object, headers: object) -> int | None:
    """The copy's checksum; None (never equal to a stored one) when a column has the wrong type.

    ``rcpt`` is the address, or its stored UTF-8 bytes (the recovery scan reads them raw).
    """
    if isinstance(rcpt, str):
        rcpt = rcpt.encode("utf-8")
    if not isinstance(rcpt, bytes) or not isinstance(headers, bytes):
        return None
    return zlib.crc32(headers, zlib.crc32(rcpt))


def _body_crc(body: object) -> int | None:
    return zlib.crc32(body) if isinstance(body, bytes) else None


_Answer = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _answer(results: Sequence[_Answer]) -> None:
    """Answer a transaction's callers from the writer thread: one wake-up per loop, not each."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
    for answer in results:
        by_loop.setdefault(answer[0].get_loop(), []).append(answer)
    for loop, answers in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is listening
            loop.call_soon_threadsafe(_resolve, answers)


def _resolve(answers: Sequence[_Answer]) -> None:
    """On the callers' loop: answer each, unless it was cancelled meanwhile."""
    for future, result, error in answers:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _unused(path: Path) -> Path:
    """``path``, or ``path`` with a counter when a quarantined file already has that name."""
    candidate, n = path, 0
    while any(Path(str(candidate) + s).exists() for s in ("", "-wal", "-shm")):
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _size(message: NewMessage) -> int:
    return len(message.body) + sum(len(c.headers) + len(c.rcpt) for c in message.copies)


def _used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database in use (free pages, reused before it grows, excluded)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def _count_live(conn: sqlite3.Connection, message_id: str | None = None) -> int:
    """Live copies in the spool, or of one message."""
    if message_id is None:
        row = conn.execute(
            "SELECT COUNT(*) FROM copies WHERE state IN (?, ?, ?)", _LIVE_VALUES
        ).fetchone()
    else:
        row = conn.execute(
            "SELECT COUNT(*) FROM copies WHERE message = ? AND state IN (?, ?, ?)",
            (message_id, *_LIVE_VALUES),
        ).fetchone()
    return int(row[0])


def jobs_for(
    message: NewMessage, copy_ids: Sequence[int], addresses: Sequence[Address]
) -> list[Job]:
    """``message``'s copies, stored under ``copy_ids``, as jobs for the workers.

    For copies stored ``delivering`` and handed to the workers in memory: the same
    jobs a claim would have read back, without reading them back; ``addresses`` are
    the recipients as intake validated them, in the same order.
    """
    return [
        Job(
            copy_id,
            message.id,
            copy.rcpt,
            copy.headers,
            copy.attempts,
            message.sender,
            message.smtputf8,
            message.auth_user,
            message.received,
            message.expires,
            message.is_dsn,
            address,
        )
        for copy_id, copy, address in zip(copy_ids, message.copies, addresses, strict=True)
    ]


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
                spool._insert(conn, message)
                added += 1
            spool._files.before_commit()
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            spool._files.rolled_back()
            raise
        spool._files.committed()
    finally:
        conn.close()
    return added
