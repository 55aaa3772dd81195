"""Read queries on a spool connection: counts, the next due time, the space in use."""

from __future__ import annotations

import sqlite3

from relay.custody.records import LIVE, LIVE_VALUES, CopyState, numbers


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
    return counts, (float(row[0]) if row is not None and numbers(row[0]) else None)


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database in use (free pages, reused before it grows, excluded)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def count_live(conn: sqlite3.Connection, message_id: str | None = None) -> int:
    """Live copies in the spool, or of one message."""
    if message_id is None:
        row = conn.execute(
            "SELECT COUNT(*) FROM copies WHERE state IN (?, ?, ?)", LIVE_VALUES
        ).fetchone()
    else:
        row = conn.execute(
            "SELECT COUNT(*) FROM copies WHERE message = ? AND state IN (?, ?, ?)",
            (message_id, *LIVE_VALUES),
        ).fetchone()
    return int(row[0])


def quarantine_records(conn: sqlite3.Connection) -> int:
    """Records in the quarantine table."""
    (records,) = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()
    return int(records)


def next_due(conn: sqlite3.Connection) -> float | None:
    """The earliest ``next_try`` of a queued or deferred copy."""
    times = [
        row[0]
        for state in (CopyState.QUEUED, CopyState.DEFERRED)  # each an index lookup
        for row in conn.execute("SELECT MIN(next_try) FROM copies WHERE state = ?", (state.value,))
        if numbers(row[0])
    ]
    return float(min(times)) if times else None
