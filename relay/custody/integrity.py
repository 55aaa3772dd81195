"""Opening a spool: the damage verdict (Rule 6), recovery (Rule 5) and quarantine."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from relay.custody import schema
from relay.custody.bodyfiles import BODIES, entries
from relay.custody.errors import Damaged, damage, environment_error
from relay.custody.queries import count_live
from relay.custody.records import CopyState, body_crc, copy_crc, numbers, utf8
from relay.custody.rows import Rows

log = logging.getLogger("relay.spool")


class Integrity:
    """``Spool.open``'s checks: the read-only verdict, then the writer's connection recovered.

    ``open_checked`` returns that connection and its live copies; records it sets
    aside go through ``rows`` (and count in ``rows.quarantined``).
    """

    def __init__(self, directory: Path, rows: Rows, *, fsync: bool, max_bytes: int) -> None:
        self.directory = directory
        self.path = directory / "spool.db"
        self._rows = rows
        self._files = rows.files
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._live = 0

    def open_checked(self) -> tuple[sqlite3.Connection, int]:
        """The verdict (read-only), then the read-write connection, recovered; its live copies."""
        try:
            self._inspect()
        except Damaged as verdict:
            self._set_aside(str(verdict))
        counted = self._rows.quarantined
        conn = self._connect()
        try:
            self._recover(conn)
        except Exception as exc:
            conn.close()  # rolls back what the scan had set aside: the whole file goes
            if not damage(exc):
                raise environment_error(exc) from exc
            self._rows.quarantined = counted
            self._set_aside(f"{type(exc).__name__}: {exc}")
            conn = self._connect()
            try:
                self._recover(conn)
            except Exception as again:
                conn.close()
                raise environment_error(again) from again
        return conn, self._live

    def _inspect(self) -> None:
        """Rule 6: raise ``Damaged`` on a positive verdict, ``SpoolError`` on trouble.

        Read-only: nothing is written to the database or its WAL, so a damaged spool
        is set aside exactly as it was found.
        """
        bodies = entries(self._files.directory)
        wal = Path(str(self.path) + "-wal")
        size = self.path.stat().st_size if self.path.exists() else 0
        if size == 0:
            if bodies or (wal.exists() and wal.stat().st_size > 0):
                state = "missing" if not self.path.exists() else "empty"
                raise Damaged(f"spool.db {state} beside {bodies} body files or a WAL")
            return  # a new spool
        try:
            conn = sqlite3.connect(
                f"file:{quote(str(self.path.resolve()))}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise environment_error(exc) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {schema.BUSY_TIMEOUT_MS}")
            # integrity_check, not quick_check: it also compares each index with its
            # table, and claims read the indexes (a damaged index passed quick_check and
            # then failed every claim with SQLITE_CORRUPT). 100,000 copies: 0.3 s, not 0.2.
            row = conn.execute("PRAGMA integrity_check(1)").fetchone()
            if row is None or row[0] != "ok":
                raise Damaged(f"integrity_check: {row[0] if row else None}")
        except Damaged:
            raise
        except Exception as exc:
            if damage(exc):
                raise Damaged(f"{type(exc).__name__}: {exc}") from exc
            raise environment_error(exc) from exc
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = self._open_db()
        except sqlite3.Error as exc:
            raise environment_error(exc) from exc
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
            raise environment_error(exc) from exc
        log.error(
            "spool database damaged, quarantined: solo-relay queue recover brings back"
            " what is readable",
            extra={"fields": {"error": reason, "moved_to": str(aside)}},
        )
        self._rows.quarantined += 1

    def _open_db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            schema.configure(
                conn,
                fsync=self._fsync,
                history_seconds=self._rows.history_seconds,
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
            stored = self._rows.read_body(message_id, body, in_file)
            if not utf8(*texts):
                bad_messages.append((message_id, "message text damaged"))
            elif stored is None and in_file == 1:
                bad_messages.append((message_id, "body file missing"))
            elif body_crc(stored) != crc:
                bad_messages.append((message_id, "body checksum mismatch"))
            elif not numbers(received, expires):
                bad_messages.append((message_id, "times damaged"))
        for message_id, reason in bad_messages:
            self._rows.quarantine_message(conn, message_id, reason, now)
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
            if copy_crc(rcpt, headers) != crc:
                bad_copies.append((copy_id, message_id, "copy checksum mismatch"))
            elif state not in states:
                bad_copies.append((copy_id, message_id, "copy state unknown"))
            elif not isinstance(attempts, int) or not numbers(next_try) or not utf8(*texts):
                bad_copies.append((copy_id, message_id, "copy record damaged"))
        for copy_id, message_id, reason in bad_copies:
            self._rows.quarantine_copy(conn, copy_id, message_id, reason, now)
        conn.execute("DELETE FROM copies WHERE message NOT IN (SELECT id FROM messages)")
        conn.execute("COMMIT")
        self._files.committed()
        self._files.sweep(in_files - {message_id for message_id, _ in bad_messages})
        self._live = count_live(conn)


def _unused(path: Path) -> Path:
    """``path``, or ``path`` with a counter when a quarantined file already has that name."""
    candidate, n = path, 0
    while any(Path(str(candidate) + s).exists() for s in ("", "-wal", "-shm")):
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
