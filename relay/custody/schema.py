"""The one owner of the spool's schema: every table (the history's too), the PRAGMA
configuration and the migrations. The statements that read and write the rows
are custody's alone (``rows``, ``writer``, ``integrity``, ``queries``, ``admin``).
"""

from __future__ import annotations

import sqlite3

# Room above ``spool.max_bytes`` kept for state changes and DSNs (at least this much):
# a state change rewrites its copy's row (a header section of up to 1 MiB), and a DSN
# quotes that header section once more.
HEADROOM_BYTES = 4 * 1024 * 1024
PAGE_SIZE = 16384  # SQLite's default is 4096
BUSY_TIMEOUT_MS = 10_000  # `solo-relay queue` commands share the file with a running relay
# Rule 7. SQLite's WAL never shrinks by itself (it is reused from the start after a
# checkpoint); past a checkpoint it is truncated to this. Its auto-checkpoint runs at
# 1,000 pages (16 MiB here), so a busy spool's WAL stays about that size.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024
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
# Created only with spool.history_days above 0 (Rule 1 of relay.custody.history).
HISTORY_TABLE = "history"  # copies that left the spool (relay.custody.history)
HISTORY_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} (
    copy INTEGER NOT NULL,
    message TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    sender TEXT NOT NULL,
    auth_user TEXT NOT NULL,
    message_id TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_code INTEGER NOT NULL,
    last_enhanced TEXT NOT NULL,
    last_text TEXT NOT NULL,
    received REAL NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS {HISTORY_TABLE}_at ON {HISTORY_TABLE} (at);
"""


def configure(
    conn: sqlite3.Connection, *, fsync: bool, history_seconds: float, max_bytes: int
) -> None:
    """Set a connection up for the relay: PRAGMAs, tables, and the migrations a spool
    made by an older relay needs."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # A new database only (a page size is fixed once the file has content): a 1 MB
    # body spans 64 overflow pages instead of 256, which roughly halves the CPU
    # of writing and freeing it (``tests/benchmarks/bench_spool.py``).
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # a new database only (Rule 7)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'OFF'}")
    conn.executescript(SCHEMA)
    if history_seconds:
        conn.executescript(HISTORY_SCHEMA)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    if "body_file" not in columns:  # a spool made before bodies could be files
        conn.execute("ALTER TABLE messages ADD COLUMN body_file INTEGER NOT NULL DEFAULT 0")
    if max_bytes:
        # ``max_bytes`` bounds new mail (``store`` checks it); SQLite's own limit sits
        # above it, so that claims, outcomes and DSNs can still be written when new mail
        # no longer fits: otherwise a full spool could never be drained.
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        hard = max_bytes + max(max_bytes // 10, HEADROOM_BYTES)
        conn.execute(f"PRAGMA max_page_count = {max(hard // page, 1)}")
