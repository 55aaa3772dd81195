"""``solo-relay queue show ID --json`` and ``queue stats --json``: one JSON object each.

The same rules as the text views (``relay.cli.queue``, ``relay.cli.queuefmt``): one
short snapshot per spool, nothing created, addresses as tokens unless
``--show-addresses``, the Message-ID in clear unless it names an address of
its message. Times are Unix seconds, with an ISO 8601 twin. Never a body.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from relay.cli.queuefmt import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    RETRYABLE,
    connect,
    file_size,
    redact_headers,
    safe,
    sender_text,
    shown_message_id,
    when,
)
from relay.custody import history
from relay.custody.spool import BODIES, CopyState, read_stats
from relay.ops.logs import AddressTokens


def stats_json(paths: Sequence[Path], now: float, err: TextIO) -> tuple[dict[str, Any], bool]:
    """Counts by state per spool and summed; whether a spool could not be read."""
    spools = []
    total = dict.fromkeys((s.value for s in CopyState), 0)
    broken = False
    for path in paths:
        try:
            conn = connect(path)
            try:
                conn.execute("BEGIN")
                counts, oldest = read_stats(conn)
                (messages,) = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
                (quarantined,) = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()
                kept = (
                    conn.execute(f"SELECT COUNT(*) FROM {history.TABLE}").fetchone()[0]
                    if history.present(conn)
                    else 0
                )
                conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            print(f"solo-relay queue: cannot use {path}: {exc}", file=err)
            broken = True
            continue
        for state, n in counts.items():
            total[state.value] += n
        bodies = path.parent / BODIES
        spools.append(
            {
                "spool": str(path.parent),
                "copies": {state.value: n for state, n in counts.items()},
                "messages": messages,
                "oldest_live_age_seconds": None if oldest is None else round(now - oldest, 3),
                "quarantined": quarantined,
                "history": kept,
                "database_bytes": sum(file_size(Path(f"{path}{s}")) for s in ("", "-wal")),
                "body_files": len(list(bodies.iterdir())) if bodies.is_dir() else 0,
            }
        )
    return {"spools": spools, "total": {"copies": total}}, broken


def show_json(
    conn: sqlite3.Connection, path: Path, queue_id: str, tokens: AddressTokens, now: float
) -> dict[str, Any] | None:
    """One message as JSON (envelope, times, copies with their header sections), or None."""
    conn.execute("BEGIN")
    try:
        message = conn.execute(
            "SELECT sender, smtputf8, auth_user, received, expires,"
            " CASE body_file WHEN 1 THEN -1 ELSE length(body) END, is_dsn"
            " FROM messages WHERE id = ?",
            (queue_id,),
        ).fetchone()
        copies = conn.execute(
            "SELECT id, rcpt, state, attempts, next_try, last_code, last_enhanced, last_text,"
            " headers FROM copies WHERE message = ? ORDER BY id",
            (queue_id,),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    if message is None:
        return None
    sender, smtputf8, auth_user, received, expires, size, is_dsn = message
    if size == -1:
        size = file_size(path.parent / BODIES / queue_id)
    header_id = next(
        (history.message_id(bytes(c[8])) for c in copies if isinstance(c[8], bytes)), ""
    )
    addresses = [sender, *(c[1] for c in copies)]
    return {
        "queue_id": safe(queue_id),
        "spool": str(path.parent),
        "sender": sender_text(sender, tokens),
        "auth_user": tokens(auth_user) if auth_user else None,
        "message_id": safe(shown_message_id(header_id, addresses, tokens)),
        "received": received,
        "received_iso": when(received),
        "expires": expires,
        "expires_iso": when(expires),
        "body_bytes": size,
        "smtputf8": bool(smtputf8),
        "dsn": bool(is_dsn),
        "copies": [
            {
                "copy": c[0],
                "rcpt": tokens(c[1]),
                "state": c[2],
                "attempts": c[3],
                "next_try": c[4] if c[2] in RETRYABLE else None,
                "last_code": c[5] or None,
                "last_enhanced": c[6] or None,
                "last_reply": safe(tokens.redact(c[7])) if c[7] else None,
                "headers": safe(
                    redact_headers(bytes(c[8]).decode("utf-8", "replace"), addresses, tokens)
                )
                if isinstance(c[8], bytes)
                else "",
            }
            for c in copies
        ],
    }


def run_show_json(
    paths: Sequence[Path],
    queue_id: str,
    tokens: AddressTokens,
    *,
    now: float,
    out: TextIO,
    err: TextIO,
) -> int:
    """``queue show ID --json``: the first spool that holds the message."""
    for path in paths:
        try:
            conn = connect(path)
            try:
                shown = show_json(conn, path, queue_id, tokens, now)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            print(f"solo-relay queue: cannot use {path}: {exc}", file=err)
            continue
        if shown is not None:
            out.write(json.dumps(shown, ensure_ascii=False) + "\n")
            return EXIT_OK
    print(f"solo-relay queue: no message {safe(queue_id)} in the spool", file=err)
    return EXIT_NOT_FOUND
