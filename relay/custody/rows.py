"""Rows and body files, written on the writer thread inside its transaction, and quarantine."""

from __future__ import annotations

import logging
import sqlite3
import zlib

from relay.custody import history
from relay.custody.bodyfiles import BODY_FILE_OCTETS, FILE_NAME, BodyFiles
from relay.custody.errors import SpoolError, SpoolFull, full
from relay.custody.queries import count_live
from relay.custody.records import LIVE, LIVE_BYTES, LIVE_VALUES, NewMessage, copy_crc

log = logging.getLogger("relay.spool")


class Rows:
    """The row writes of the spool (Rule 3), inside the writer's transaction.

    ``added`` is the change in live copies by the transaction in progress (the
    writer resets it per transaction); ``quarantined`` counts the records (and
    databases) set aside since open.
    """

    def __init__(self, files: BodyFiles, *, history_days: float) -> None:
        self.files = files
        # ``spool.history_days``: final copies kept as rows of ``history`` (relay.custody.history).
        self.history_seconds = history_days * history.DAY
        self._pruned_at = 0.0
        self.added = 0
        self.quarantined = 0

    def insert(self, conn: sqlite3.Connection, message: NewMessage) -> None:
        body = message.body  # a large one goes to its file as it is: no copy in memory
        crc = zlib.crc32(body)
        in_file = len(body) >= BODY_FILE_OCTETS and FILE_NAME.fullmatch(message.id) is not None
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
                self.files.write(message.id, body)
            except OSError as exc:  # a full or failing disk: this message fails alone
                kind = SpoolFull if full(exc) else SpoolError
                raise kind(f"cannot write the body file: {exc.strerror}") from exc
        conn.executemany(
            "INSERT INTO copies (message, rcpt, headers, crc, state, attempts, next_try, last_code,"
            " last_enhanced, last_text, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    message.id,
                    c.rcpt,
                    c.headers,
                    copy_crc(c.rcpt, c.headers),
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
            self.drop_if_done(conn, message.id)

    def keep_history(self, conn: sqlite3.Connection, copy_ids: list[int], now: float) -> None:
        """Final copies into ``history`` (``spool.history_days``); old rows out, once a minute."""
        if not self.history_seconds:
            return
        history.keep(conn, copy_ids, now)
        if abs(now - self._pruned_at) >= history.PRUNE_SECONDS:
            history.prune(conn, now - self.history_seconds)
            self._pruned_at = now

    def drop_if_done(self, conn: sqlite3.Connection, message_id: str) -> None:
        """A message whose copies are all final leaves the spool (its story is in logs, metrics)."""
        live = conn.execute(
            "SELECT 1 FROM copies WHERE message = ? AND state IN (?, ?, ?) LIMIT 1",
            (message_id, *LIVE_VALUES),
        ).fetchone()
        if live is None:
            self.delete_message(conn, message_id)

    def delete_message(self, conn: sqlite3.Connection, message_id: str) -> None:
        conn.execute("DELETE FROM copies WHERE message = ?", (message_id,))
        for (in_file,) in conn.execute(
            "DELETE FROM messages WHERE id = ? RETURNING body_file", (message_id,)
        ).fetchall():
            if in_file == 1:
                self.files.forget(message_id)  # removed once this transaction commits

    def read_body(self, message_id: str, body: object, in_file: object) -> object:
        """The stored body: the column, or the file (None when it is missing)."""
        return self.files.read(message_id) if in_file == 1 else body

    def quarantine_message(
        self, conn: sqlite3.Connection, message_id: str, reason: str, now: float
    ) -> None:
        row = conn.execute(
            "SELECT body, body_file FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        data = None if row is None else self.read_body(message_id, row[0], row[1])
        conn.execute(
            "INSERT INTO quarantine (kind, ref, reason, at, data) VALUES ('message', ?, ?, ?, ?)",
            (message_id, reason, now, data),
        )
        self.added -= count_live(conn, message_id)
        self.delete_message(conn, message_id)
        self.quarantined += 1
        log.error(
            "spool record quarantined", extra={"fields": {"queue_id": message_id, "reason": reason}}
        )

    def quarantine_copy(
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
        self.added -= state[0] in LIVE_BYTES
        conn.execute("DELETE FROM copies WHERE id = ?", (copy_id,))
        self.drop_if_done(conn, message_id)  # else a message with no live copy stays forever
        self.quarantined += 1
        log.error(
            "spool record quarantined", extra={"fields": {"queue_id": message_id, "reason": reason}}
        )
