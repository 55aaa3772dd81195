"""Delivered history: a small table of copies that left the spool, kept for N days.

Rule 1: additive. With ``spool.history_days = 0`` (the default) nothing is
written and the spool behaves as before: a message leaves the spool once
every copy is final. With a retention, each copy that reaches ``delivered``
or ``failed`` leaves one row here in the same transaction that records it:
queue id, copy id, recipient, sender, AUTH user, the application's
Message-ID, times, attempts and the last reply. Never a header section or
a body.
Rule 2: rows older than the retention are removed by the writer at most once
a minute (``PRUNE_SECONDS``), so the table holds about N days of copies.
Rule 3: ``solo-relay queue list --delivered`` reads it; the relay never does.

Functions that take a connection run inside the spool writer's transaction
(``relay.custody.spool``) or a reader's snapshot (``relay.custody.admin``).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence

from relay.custody.schema import HISTORY_TABLE

DAY = 86_400.0
PRUNE_SECONDS = 60.0  # how often the writer removes rows past the retention
# The table itself is ``relay.custody.schema``'s (the one owner of the schema).
TABLE = HISTORY_TABLE
MAX_MESSAGE_ID = 998  # one header line's worth (RFC 5322 2.1.1)

# The Message-ID field, its folds included (RFC 5322 3.6.4), at the start of a line.
_MESSAGE_ID = re.compile(rb"(?im)^message-id[ \t]*:((?:[^\r\n]|\r\n[ \t])*)")


def message_id(headers: bytes) -> str:
    """The Message-ID of a header section as written (unfolded, trimmed), or ""."""
    match = _MESSAGE_ID.search(headers)
    if match is None:
        return ""
    value = match.group(1).replace(b"\r\n", b"").strip()
    return value.decode("utf-8", "replace")[:MAX_MESSAGE_ID]


def keep(conn: sqlite3.Connection, copy_ids: Sequence[int], now: float) -> None:
    """Write the history rows of copies just made final (before their message is dropped)."""
    if not copy_ids:
        return
    for start in range(0, len(copy_ids), 500):  # within SQLite's limit on parameters
        ids = list(copy_ids[start : start + 500])
        marks = ",".join("?" * len(ids))
        rows = conn.execute(
            "SELECT c.id, c.message, c.rcpt, m.sender, m.auth_user, c.headers, c.state,"
            " c.attempts, c.last_code, c.last_enhanced, c.last_text, m.received"
            " FROM copies c JOIN messages m ON m.id = c.message"
            f" WHERE c.id IN ({marks}) AND m.is_dsn = 0",
            ids,
        ).fetchall()
        conn.executemany(
            f"INSERT INTO {TABLE} (copy, message, rcpt, sender, auth_user, message_id, state,"
            " attempts, last_code, last_enhanced, last_text, received, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (*row[:5], message_id(bytes(row[5])), *row[6:], now)
                for row in rows
                if isinstance(row[5], bytes)
            ],
        )


def prune(conn: sqlite3.Connection, before: float) -> int:
    """Remove the rows written before ``before``; how many went."""
    return conn.execute(f"DELETE FROM {TABLE} WHERE at < ?", (before,)).rowcount


def present(conn: sqlite3.Connection) -> bool:
    """Whether this spool database has a history table (a relay with a retention made it)."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
    ).fetchone()
    return row is not None
