"""Opening a spool: the damage verdict (Rule 6), recovery (Rule 5) and quarantine."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from relay.custody import schema
from relay.custody.bodyfiles import BODIES, _entries
from relay.custody.errors import _damage, _Damaged, _environment_error
from relay.custody.queries import _count_live
from relay.custody.records import _LIVE_BYTES, CopyState, _body_crc, _copy_crc, _numbers, _utf8
from relay.custody.rows import _Rows

log = logging.getLogger("relay.spool")


class _Integrity(_Rows):
    """``Spool.open``'s checks, on the read-only verdict and then the writer's connection."""

    directory: Path
    path: Path
    quarantined: int
    live: int
    _added: int
    _fsync: bool
    _max_bytes: int

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
            conn.execute(f"PRAGMA busy_timeout = {schema.BUSY_TIMEOUT_MS}")
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
            schema.configure(
                conn,
                fsync=self._fsync,
                history_seconds=self._history_seconds,
                max_bytes=self._max_bytes,
            )
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

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


def _unused(path: Path) -> Path:
    """``path``, or ``path`` with a counter when a quarantined file already has that name."""
    candidate, n = path, 0
    while any(Path(str(candidate) + s).exists() for s in ("", "-wal", "-shm")):
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
