"""Rows and body files, written on the writer thread inside its transaction."""

from __future__ import annotations

import sqlite3
import zlib

from relay.custody import history
from relay.custody.bodyfiles import _FILE_NAME, BODY_FILE_OCTETS, _BodyFiles
from relay.custody.errors import SpoolError, SpoolFull, _full
from relay.custody.records import _LIVE_VALUES, LIVE, NewMessage, _copy_crc


class _Rows:
    """The row operations of ``Spool`` (Rule 3), run inside a writer transaction."""

    _files: _BodyFiles
    _history_seconds: float
    _pruned_at: float

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
