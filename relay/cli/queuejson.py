"""``solo-relay queue show ID --json`` and ``queue stats --json``: one JSON object each.

The same rules as the text views (``relay.cli.queue``, ``relay.cli.queuefmt``): one
short snapshot per spool, nothing created, addresses as tokens unless
``--show-addresses``, the Message-ID in clear unless it names an address of
its message. Times are Unix seconds, with an ISO 8601 twin. Never a body.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from relay.cli.queuefmt import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    RETRYABLE,
    file_size,
    redact_headers,
    safe,
    sender_text,
    shown_message_id,
    when,
)
from relay.custody import history
from relay.custody.admin import Store, StoreError
from relay.custody.spool import CopyState
from relay.ops.health import UPSTREAMS_FILE, read_upstreams
from relay.ops.logs import AddressTokens


def stats_json(paths: Sequence[Path], now: float, err: TextIO) -> tuple[dict[str, Any], bool]:
    """Counts by state per spool and summed; whether a spool could not be read."""
    spools = []
    total = dict.fromkeys((s.value for s in CopyState), 0)
    broken = False
    for path in paths:
        try:
            with Store.open(path) as store:
                stats = store.stats(with_history=True)
                bodies = store.bodies
        except StoreError as exc:
            print(f"solo-relay queue: cannot use {path}: {exc}", file=err)
            broken = True
            continue
        counts, oldest = stats.counts, stats.oldest
        for state, n in counts.items():
            total[state.value] += n
        spools.append(
            {
                "spool": str(path.parent),
                "copies": {state.value: n for state, n in counts.items()},
                "messages": stats.messages,
                "oldest_live_age_seconds": None if oldest is None else round(now - oldest, 3),
                "quarantined": stats.quarantined,
                "history": stats.history,
                "database_bytes": sum(file_size(Path(f"{path}{s}")) for s in ("", "-wal")),
                "body_files": len(list(bodies.iterdir())) if bodies.is_dir() else 0,
                # Each upstream's state as the relay last wrote it (None: one upstream alone).
                "upstreams": read_upstreams(path.parent / UPSTREAMS_FILE),
            }
        )
    return {"spools": spools, "total": {"copies": total}}, broken


def show_json(
    store: Store, path: Path, queue_id: str, tokens: AddressTokens, now: float
) -> dict[str, Any] | None:
    """One message as JSON (envelope, times, copies with their header sections), or None."""
    message, copies = store.message_rows(queue_id)
    if message is None:
        return None
    sender, auth_user, received, expires = (
        message.sender,
        message.auth_user,
        message.received,
        message.expires,
    )
    size = message.body_bytes
    if size == -1:
        size = file_size(store.bodies / queue_id)
    header_id = next(
        (history.message_id(bytes(c.headers)) for c in copies if isinstance(c.headers, bytes)), ""
    )
    addresses = [sender, *(c.rcpt for c in copies)]
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
        "smtputf8": bool(message.smtputf8),
        "dsn": bool(message.is_dsn),
        "copies": [
            {
                "copy": c.copy_id,
                "rcpt": tokens(c.rcpt),
                "state": c.state,
                "attempts": c.attempts,
                "next_try": c.next_try if c.state in RETRYABLE else None,
                "last_code": c.last_code or None,
                "last_enhanced": c.last_enhanced or None,
                "last_reply": safe(tokens.redact(c.last_text)) if c.last_text else None,
                "headers": safe(
                    redact_headers(bytes(c.headers).decode("utf-8", "replace"), addresses, tokens)
                )
                if isinstance(c.headers, bytes)
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
            with Store.open(path) as store:
                shown = show_json(store, path, queue_id, tokens, now)
        except StoreError as exc:
            print(f"solo-relay queue: cannot use {path}: {exc}", file=err)
            continue
        if shown is not None:
            out.write(json.dumps(shown, ensure_ascii=False) + "\n")
            return EXIT_OK
    print(f"solo-relay queue: no message {safe(queue_id)} in the spool", file=err)
    return EXIT_NOT_FOUND
