"""``solo-relay queue list`` (filters, JSON, every spool in one listing, the delivered
history), ``queue show --json``, ``queue stats --json``, and ``solo-relay token``.

Rule 1: the same rules as ``relay.queuectl``: each spool database is read in one
short snapshot, never created; addresses are the deployment's keyed tokens
unless ``--show-addresses``; what the spool holds is escaped before it is printed.
Rule 2: one listing for all the spools of ``spool.dir`` (each worker's too), in
the order mail was received, with the totals by state; a ``SPOOL`` column says
where each copy is when there is more than one.
Rule 3: the Message-ID is shown as the application wrote it (an operator
searches the application's logs by it), except that one naming an address of
its own message (``<bob@example.com>``) is shown as a token like the address.
Rule 4: ``--rcpt`` and ``--sender`` take a token (as the logs show it) or an
address, which is turned into its token with the deployment's key: the filter
never needs the address in clear.

The JSON is one object (``{"copies": [...], "total": {...}}``) with the same
fields as the table, times as Unix seconds and ISO 8601.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from relay import history
from relay.config import Config
from relay.errors import ConfigError
from relay.logs import KEY_FILE, TOKEN_PREFIX, AddressTokens, configured_key, load_key
from relay.spool import BODIES, BUSY_TIMEOUT_MS, LIVE, CopyState, read_stats

LISTED = (*LIVE, CopyState.FAILED)  # as relay.queuectl lists them: live copies, and failed ones
RETRYABLE = (CopyState.QUEUED, CopyState.DEFERRED)
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_AGE = re.compile(r"(?i)(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_CONFIG = 2

_LIST_EXTRA = """\
Filters combine: --state (repeat it), --older-than/--newer-than an age (90s,
15m, 2h, 3d), --rcpt/--sender a token or an address. --delivered lists the
delivered history instead (copies that left the spool, kept for
spool.history_days). --json prints one JSON object.
"""


@dataclass(frozen=True, slots=True)
class Row:
    """One copy of the listing, from a spool or from its history."""

    spool: str
    message_id: str  # the queue id
    copy_id: int
    state: str
    attempts: int
    next_try: float
    last_code: int
    last_enhanced: str
    last_text: str
    received: float
    sender: str
    rcpt: str
    header_id: str  # the application's Message-ID ("" if none)
    finished: float = 0.0  # when it was delivered (history only)
    auth_user: str = ""


def add_list_options(parser: argparse.ArgumentParser) -> None:
    """``queue list``'s filters and output flags (relay.queuectl adds the parser)."""
    parser.description = (parser.description or "") + "\n" + _LIST_EXTRA
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in CopyState],
        help="only copies in this state (repeat for several)",
    )
    parser.add_argument("--older-than", metavar="AGE", type=age, help="received before AGE ago")
    parser.add_argument("--newer-than", metavar="AGE", type=age, help="received within AGE")
    parser.add_argument("--rcpt", metavar="TOKEN", help="recipient: a log token or an address")
    parser.add_argument("--sender", metavar="TOKEN", help="sender: a log token or an address")
    parser.add_argument(
        "--delivered",
        action="store_true",
        help="the delivered history (spool.history_days) instead of the spool",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json`` for ``queue show`` and ``queue stats``."""
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_token_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``solo-relay token ADDRESS...``."""
    p = commands.add_parser(
        "token",
        help="print the log token of an address",
        description="Print the token the logs and `queue list` show for each ADDRESS (or AUTH"
        " user name), under the deployment's key (log.hash_key_file, log.hash_key, or the"
        " one kept in spool.dir), so a customer's mail can be found in the logs without"
        " the logs holding the address. Exit status 1: no key yet (serve makes one at"
        " its first start); 2: bad configuration.",
    )
    p.add_argument("addresses", nargs="+", metavar="ADDRESS", help="an address or a user name")
    p.add_argument("--config", metavar="PATH", help="TOML file (default: $RELAY_CONFIG)")


def age(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d`` as seconds (argparse type)."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (90s, 15m, 2h, 3d)")
    return float(match[1]) * _UNITS[match[2].lower()]


# -- solo-relay token ---------------------------------------------------------------


def run_token(config: Config, addresses: Sequence[str], out: TextIO, err: TextIO) -> int:
    """Print ``ADDRESS TOKEN`` per address; never creates the key."""
    spool_dir = Path(config.spool.dir)
    try:
        if configured_key(config.log) is None and not (spool_dir / KEY_FILE).is_file():
            print(
                f"solo-relay token: no token key yet: serve makes {spool_dir / KEY_FILE} at its"
                " first start (or set log.hash_key_file)",
                file=err,
            )
            return EXIT_NOT_FOUND
        tokens = AddressTokens(load_key(config.log, spool_dir))
    except ConfigError as exc:
        print(f"solo-relay: configuration error: {exc}", file=err)
        return EXIT_CONFIG
    for address in addresses:
        out.write(
            f"{tokens(address)}\n" if len(addresses) == 1 else f"{address} {tokens(address)}\n"
        )
    return EXIT_OK


# -- queue list ---------------------------------------------------------------------


def wanted_token(text: str | None, keyed: AddressTokens) -> str | None:
    """A ``--rcpt``/``--sender`` value as a token (Rule 4)."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith(TOKEN_PREFIX) and "@" not in text:
        return text.lower()
    return keyed(text)


def run(
    args: argparse.Namespace,
    paths: Sequence[Path],
    tokens: AddressTokens | None,
    *,
    keyed: Callable[[], AddressTokens],
    now: float,
    out: TextIO,
    err: TextIO,
) -> int | None:
    """The actions this module serves (the exit status), or None for relay.queuectl's own.

    ``keyed`` gives the deployment's tokens even under ``--show-addresses`` (the filters).
    """
    action: str = args.queue_action
    if action == "list":
        assert tokens is not None
        real = keyed() if tokens.show else tokens
        return run_list(args, paths, tokens, real, now=now, out=out, err=err)
    if action == "show" and args.json:
        assert tokens is not None
        return run_show_json(paths, args.queue_id, tokens, now=now, out=out, err=err)
    if action == "stats" and args.json:
        summary, unreadable = stats_json(paths, now, err)
        out.write(json.dumps(summary) + "\n")
        return EXIT_NOT_FOUND if unreadable else EXIT_OK
    return None


def run_list(
    args: argparse.Namespace,
    paths: Sequence[Path],
    tokens: AddressTokens,
    keyed: AddressTokens,
    *,
    now: float,
    out: TextIO,
    err: TextIO,
) -> int:
    """``queue list`` over every spool in ``paths``: one table or one JSON object."""
    rows: list[Row] = []
    broken = False
    kept_history = False
    base = paths[0].parent if paths else Path()
    for path in paths:
        name = "." if path.parent == base else str(path.parent.relative_to(base))
        try:
            conn = _connect(path)
        except sqlite3.Error as exc:
            print(f"solo-relay queue: cannot open {path}: {exc}", file=err)
            broken = True
            continue
        try:
            conn.execute("BEGIN")
            if args.delivered:
                if history.present(conn):
                    kept_history = True
                    rows += _history_rows(conn, name)
            else:
                rows += _spool_rows(conn, name)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            print(f"solo-relay queue: cannot use {path}: {exc}", file=err)
            broken = True
        finally:
            conn.close()
    rows = _filter(rows, args, keyed, now)
    rows.sort(key=lambda r: (r.received, r.message_id, r.copy_id))
    several = len(paths) > 1
    if args.json:
        out.write(json.dumps(_json(rows, tokens, now, len(paths)), ensure_ascii=False) + "\n")
    elif args.delivered and not kept_history and not rows:
        out.write("no delivered history: spool.history_days is 0 (set it to keep one)\n")
    else:
        out.write(_table(rows, tokens, now, several=several, delivered=args.delivered))
    return EXIT_NOT_FOUND if broken else EXIT_OK


def _connect(path: Path) -> sqlite3.Connection:
    """The existing database, never created (``mode=rw``: a WAL reader needs its -shm)."""
    if not path.is_file():
        raise sqlite3.OperationalError(f"no spool database at {path}")
    conn = sqlite3.connect(
        path.resolve().as_uri() + "?mode=rw",
        uri=True,
        isolation_level=None,
        timeout=BUSY_TIMEOUT_MS / 1000,
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _spool_rows(conn: sqlite3.Connection, spool: str) -> list[Row]:
    states = tuple(s.value for s in LISTED)
    found = conn.execute(
        "SELECT c.id, c.message, c.rcpt, c.state, c.attempts, c.next_try, c.last_code,"
        " c.last_enhanced, c.last_text, m.received, m.sender, m.auth_user"
        " FROM copies c JOIN messages m ON m.id = c.message"
        " WHERE c.state IN (?, ?, ?, ?) ORDER BY m.received, c.message, c.id",
        states,
    ).fetchall()
    # The Message-ID is the same on every copy: read one header section per message.
    ids = {
        message: history.message_id(bytes(headers))
        for message, headers in conn.execute(
            "SELECT message, headers FROM copies WHERE id IN"
            " (SELECT MIN(id) FROM copies GROUP BY message)"
        )
        if isinstance(headers, bytes)
    }
    return [
        Row(
            spool,
            r[1],
            r[0],
            r[3],
            r[4],
            r[5],
            r[6],
            r[7],
            r[8],
            r[9],
            r[10],
            r[2],
            ids.get(r[1], ""),
            auth_user=r[11],
        )
        for r in found
    ]


def _history_rows(conn: sqlite3.Connection, spool: str) -> list[Row]:
    found = conn.execute(
        "SELECT copy, message, rcpt, state, attempts, last_code, last_enhanced, last_text,"
        f" received, sender, message_id, at, auth_user FROM {history.TABLE}"
        " WHERE state = ?",
        (CopyState.DELIVERED.value,),
    ).fetchall()
    return [
        Row(
            spool,
            r[1],
            r[0],
            r[3],
            r[4],
            0.0,
            r[5],
            r[6],
            r[7],
            r[8],
            r[9],
            r[2],
            r[10],
            finished=r[11],
            auth_user=r[12],
        )
        for r in found
    ]


def _filter(
    rows: list[Row], args: argparse.Namespace, keyed: AddressTokens, now: float
) -> list[Row]:
    states = set(args.state or ())
    rcpt = wanted_token(args.rcpt, keyed)
    sender = wanted_token(args.sender, keyed)
    kept = []
    for row in rows:
        if states and row.state not in states:
            continue
        if args.older_than is not None and now - row.received < args.older_than:
            continue
        if args.newer_than is not None and now - row.received > args.newer_than:
            continue
        if rcpt is not None and keyed(row.rcpt) != rcpt:
            continue
        if sender is not None and _sender(row.sender, keyed) != sender:
            continue
        kept.append(row)
    return kept


def shown_message_id(header_id: str, addresses: Sequence[str], tokens: AddressTokens) -> str:
    """Rule 3: the Message-ID in clear, unless it names an address of its own message."""
    lowered = header_id.lower()
    if any(a and a.lower() in lowered for a in addresses):
        return tokens.redact(header_id)
    return header_id


def _message_ids(rows: Sequence[Row], tokens: AddressTokens) -> dict[tuple[str, str], str]:
    addresses: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        addresses.setdefault((row.spool, row.message_id), {row.sender}).add(row.rcpt)
    return {
        (row.spool, row.message_id): shown_message_id(
            row.header_id, sorted(addresses[(row.spool, row.message_id)]), tokens
        )
        for row in rows
    }


def _table(
    rows: Sequence[Row], tokens: AddressTokens, now: float, *, several: bool, delivered: bool
) -> str:
    if not rows:
        return "no delivered copies in the history\n" if delivered else "no copies in the spool\n"
    ids = _message_ids(rows, tokens)
    header = ["QUEUE ID", "COPY", "STATE", "TRIES"]
    header += ["DELIVERED", "REPLY"] if delivered else ["NEXT TRY", "LAST REPLY"]
    header += ["AGE", "MESSAGE-ID", "FROM", "TO"]
    if several:
        header.insert(0, "SPOOL")
    table = [header]
    for r in rows:
        cells = [
            _safe(r.message_id),
            str(r.copy_id),
            r.state,
            str(r.attempts),
            (_when(r.finished) if delivered else _next_try(r, now)),
            f"{r.last_code} {r.last_enhanced}".strip() if r.last_code else "-",
            _span(now - r.received),
            _safe(ids[(r.spool, r.message_id)]) or "-",
            _safe(_sender(r.sender, tokens)),
            _safe(tokens(r.rcpt)),
        ]
        table.append([_safe(r.spool), *cells] if several else cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    text = "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        + "\n"
        for row in table
    )
    return text + _totals_line(rows)


def _totals(rows: Sequence[Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    return counts


def _totals_line(rows: Sequence[Row]) -> str:
    counts = _totals(rows)
    spools = len({r.spool for r in rows})
    messages = len({(r.spool, r.message_id) for r in rows})
    states = ", ".join(f"{state} {n}" for state, n in sorted(counts.items()))
    where = f" in {spools} spools" if spools > 1 else ""
    return (
        f"total: {len(rows)} {_plural(len(rows), 'copy', 'copies')} of {messages} "
        f"{_plural(messages, 'message', 'messages')}{where} ({states})\n"
    )


def _json(rows: Sequence[Row], tokens: AddressTokens, now: float, spools: int) -> dict[str, Any]:
    ids = _message_ids(rows, tokens)
    copies = []
    for r in rows:
        item: dict[str, Any] = {
            "spool": r.spool,
            "queue_id": _safe(r.message_id),
            "copy": r.copy_id,
            "state": r.state,
            "attempts": r.attempts,
            "received": r.received,
            "received_iso": _when(r.received),
            "age_seconds": round(max(now - r.received, 0.0), 3),
            "message_id": _safe(ids[(r.spool, r.message_id)]),
            "sender": _sender(r.sender, tokens),
            "rcpt": tokens(r.rcpt),
            "auth_user": tokens(r.auth_user) if r.auth_user else None,
            "last_code": r.last_code or None,
            "last_enhanced": r.last_enhanced or None,
            "last_reply": _safe(tokens.redact(r.last_text)) if r.last_text else None,
        }
        if r.finished:
            item["delivered"] = r.finished
            item["delivered_iso"] = _when(r.finished)
        else:
            item["next_try"] = r.next_try if r.state in {s.value for s in RETRYABLE} else None
        copies.append(item)
    return {
        "copies": copies,
        "total": {
            "copies": len(rows),
            "messages": len({(r.spool, r.message_id) for r in rows}),
            "spools": spools,
            "by_state": _totals(rows),
        },
    }


# -- queue stats --json, queue show --json --------------------------------------------------


def stats_json(paths: Sequence[Path], now: float, err: TextIO) -> tuple[dict[str, Any], bool]:
    """Counts by state per spool and summed; whether a spool could not be read."""
    spools = []
    total = dict.fromkeys((s.value for s in CopyState), 0)
    broken = False
    for path in paths:
        try:
            conn = _connect(path)
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
                "database_bytes": sum(_size(Path(f"{path}{s}")) for s in ("", "-wal")),
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
        size = _size(path.parent / BODIES / queue_id)
    header_id = next(
        (history.message_id(bytes(c[8])) for c in copies if isinstance(c[8], bytes)), ""
    )
    addresses = [sender, *(c[1] for c in copies)]
    return {
        "queue_id": _safe(queue_id),
        "spool": str(path.parent),
        "sender": _sender(sender, tokens),
        "auth_user": tokens(auth_user) if auth_user else None,
        "message_id": _safe(shown_message_id(header_id, addresses, tokens)),
        "received": received,
        "received_iso": _when(received),
        "expires": expires,
        "expires_iso": _when(expires),
        "body_bytes": size,
        "smtputf8": bool(smtputf8),
        "dsn": bool(is_dsn),
        "copies": [
            {
                "copy": c[0],
                "rcpt": tokens(c[1]),
                "state": c[2],
                "attempts": c[3],
                "next_try": c[4] if c[2] in {s.value for s in RETRYABLE} else None,
                "last_code": c[5] or None,
                "last_enhanced": c[6] or None,
                "last_reply": _safe(tokens.redact(c[7])) if c[7] else None,
                "headers": _safe(tokens.redact(bytes(c[8]).decode("utf-8", "replace")))
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
            conn = _connect(path)
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
    print(f"solo-relay queue: no message {_safe(queue_id)} in the spool", file=err)
    return EXIT_NOT_FOUND


def show_message_id_line(
    headers: Sequence[bytes], addresses: Sequence[str], tokens: AddressTokens
) -> str:
    """The ``message-id`` line of ``queue show`` (Rule 3)."""
    header_id = next((history.message_id(h) for h in headers if h), "")
    return f"message-id {_safe(shown_message_id(header_id, addresses, tokens)) or '-'}"


# -- formatting ---------------------------------------------------------------------


def _safe(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def _sender(sender: str, tokens: Callable[[str], str]) -> str:
    return "<>" if not sender else tokens(sender)


def _next_try(row: Row, now: float) -> str:
    if row.state not in {s.value for s in RETRYABLE}:
        return "-"
    return "now" if row.next_try <= now else f"in {_span(row.next_try - now)}"


def _span(seconds: float) -> str:
    total = max(int(seconds), 0)
    if total < 60:
        return f"{total}s"
    minutes = total // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"


def _when(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _plural(count: int, one: str, many: str) -> str:
    return one if count == 1 else many
