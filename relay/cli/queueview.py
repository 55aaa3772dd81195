"""``solo-relay queue list``: filters, JSON, every spool in one listing, the delivered
history; and the dispatch of the JSON views (``relay.cli.queuejson``).

Rule 1: the same rules as ``relay.cli.queue``: each spool database is read in one
short snapshot, never created; addresses are the deployment's keyed tokens
unless ``--show-addresses``; what the spool holds is escaped (``relay.cli.queuefmt``).
Rule 2: one listing for all the spools of ``spool.dir`` (each worker's too), in
the order mail was received, with the totals by state; a ``SPOOL`` column says
where each copy is when there is more than one.
Rule 3: the Message-ID is shown as ``relay.cli.queuefmt`` says (in clear, unless it
names an address of its own message).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from relay.cli import queuejson
from relay.cli.queuefmt import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    LISTED,
    RETRYABLE,
    safe,
    sender_text,
    shown_message_id,
    span,
    when,
)
from relay.custody import history
from relay.custody.admin import HistoryRow, Store, StoreError
from relay.custody.spool import CopyState
from relay.ops.logs import TOKEN_PREFIX, AddressTokens

_AGE = re.compile(r"(?i)(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}

_LIST_EXTRA = """\
Filters combine: --state (repeat it), --older-than/--newer-than an age (90s,
15m, 2h, 3d), --rcpt/--sender a token or an address. --delivered lists the
delivered history instead (copies that left the spool, kept for
spool.history_days; with --state failed, the failed ones). --json prints
one JSON object.
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
    """``queue list``'s filters and output flags (relay.cli.queue adds the parser)."""
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


def age(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d`` as seconds (argparse type)."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (90s, 15m, 2h, 3d)")
    return float(match[1]) * _UNITS[match[2].lower()]


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
    """The actions this module serves (the exit status), or None for relay.cli.queue's own.

    ``keyed`` gives the deployment's tokens even under ``--show-addresses`` (the filters).
    """
    action: str = args.queue_action
    if action == "list":
        assert tokens is not None
        real = keyed() if tokens.show else tokens
        return run_list(args, paths, tokens, real, now=now, out=out, err=err)
    if action == "show" and args.json:
        assert tokens is not None
        return queuejson.run_show_json(paths, args.queue_id, tokens, now=now, out=out, err=err)
    if action == "stats" and args.json:
        summary, unreadable = queuejson.stats_json(paths, now, err)
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
            store = Store.open(path)
        except StoreError as exc:
            print(f"solo-relay queue: cannot open {path}: {exc}", file=err)
            broken = True
            continue
        try:
            if args.delivered:
                kept = store.history()
                if kept is not None:
                    kept_history = True
                    rows += _history_rows(kept, name)
            else:
                rows += _spool_rows(store, name)
        except StoreError as exc:
            print(f"solo-relay queue: cannot use {path}: {exc}", file=err)
            broken = True
        finally:
            store.close()
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


def _spool_rows(store: Store, spool: str) -> list[Row]:
    found, headers = store.listing(LISTED)
    # The Message-ID is the same on every copy: one header section per message was read.
    ids = {message: history.message_id(bytes(section)) for message, section in headers.items()}
    return [
        Row(
            spool,
            r.message_id,
            r.copy_id,
            r.state,
            r.attempts,
            r.next_try,
            r.last_code,
            r.last_enhanced,
            r.last_text,
            r.received,
            r.sender,
            r.rcpt,
            ids.get(r.message_id, ""),
            auth_user=r.auth_user,
        )
        for r in found
    ]


def _history_rows(found: Sequence[HistoryRow], spool: str) -> list[Row]:
    return [
        Row(
            spool,
            r.message_id,
            r.copy_id,
            r.state,
            r.attempts,
            0.0,
            r.last_code,
            r.last_enhanced,
            r.last_text,
            r.received,
            r.sender,
            r.rcpt,
            r.header_id,
            finished=r.finished,
            auth_user=r.auth_user,
        )
        for r in found
    ]


def _filter(
    rows: list[Row], args: argparse.Namespace, keyed: AddressTokens, now: float
) -> list[Row]:
    states = set(args.state or ())
    if args.delivered and not states:  # the history holds failed copies too: --state failed
        states = {CopyState.DELIVERED.value}
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
        if sender is not None and sender_text(row.sender, keyed) != sender:
            continue
        kept.append(row)
    return kept


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
    header += ["FINISHED", "REPLY"] if delivered else ["NEXT TRY", "LAST REPLY"]
    header += ["AGE", "MESSAGE-ID", "FROM", "TO"]
    if several:
        header.insert(0, "SPOOL")
    table = [header]
    for r in rows:
        cells = [
            safe(r.message_id),
            str(r.copy_id),
            r.state,
            str(r.attempts),
            (when(r.finished) if delivered else _next_try(r, now)),
            f"{r.last_code} {r.last_enhanced}".strip() if r.last_code else "-",
            span(now - r.received),
            safe(ids[(r.spool, r.message_id)]) or "-",
            safe(sender_text(r.sender, tokens)),
            safe(tokens(r.rcpt)),
        ]
        table.append([safe(r.spool), *cells] if several else cells)
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
            "queue_id": safe(r.message_id),
            "copy": r.copy_id,
            "state": r.state,
            "attempts": r.attempts,
            "received": r.received,
            "received_iso": when(r.received),
            "age_seconds": round(max(now - r.received, 0.0), 3),
            "message_id": safe(ids[(r.spool, r.message_id)]),
            "sender": sender_text(r.sender, tokens),
            "rcpt": tokens(r.rcpt),
            "auth_user": tokens(r.auth_user) if r.auth_user else None,
            "last_code": r.last_code or None,
            "last_enhanced": r.last_enhanced or None,
            "last_reply": safe(tokens.redact(r.last_text)) if r.last_text else None,
        }
        if r.finished:
            item["finished"] = r.finished  # delivered (or failed) at
            item["finished_iso"] = when(r.finished)
        else:
            item["next_try"] = r.next_try if r.state in RETRYABLE else None
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


def _next_try(row: Row, now: float) -> str:
    if row.state not in RETRYABLE:
        return "-"
    return "now" if row.next_try <= now else f"in {span(row.next_try - now)}"


def _plural(count: int, one: str, many: str) -> str:
    return one if count == 1 else many
