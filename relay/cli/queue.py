"""``solo-relay queue``: inspect and act on the spool of a running or stopped relay.

Rule 1: the command opens ``spool.dir/spool.db`` through ``relay.custody.admin``,
read-write but never creating it (a missing database is an error, not an empty spool).
Each command is one short transaction: reads share the WAL with the relay's
writer; writes take the lock with ``BEGIN IMMEDIATE``, waiting up to the
spool's busy timeout, and hold it only for their few statements.
Rule 2: a running relay needs no signal: its workers poll the database at
least every second, so a copy made due is claimed within a second, and a
copy deleted while in flight is simply gone when the worker records its
outcome (``Spool.record`` returns when the row no longer exists).
Rule 3: addresses are printed as the deployment's keyed tokens (the ones in
the logs) unless ``--show-addresses``; header text and reply text are
redacted the same way. A message's body is never printed.
Rule 4: whatever the spool holds is printed with control and bidirectional
formatting characters escaped, so a header cannot drive the terminal.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from relay.cli import queuefmt, queueview
from relay.config import Config, load
from relay.core.errors import ConfigError
from relay.custody import admin
from relay.custody.admin import Store, StoreError, UnknownMessage
from relay.custody.spool import CopyRow, CopyState, SpoolError
from relay.ops.health import STATUS_STALE, UPSTREAMS_FILE, read_upstreams
from relay.ops.logs import AddressTokens, load_key
from relay.ops.workers import spool_dirs

EXIT_OK = 0
EXIT_NOT_FOUND = 1  # an unknown queue id, or no spool database / an unreadable one
EXIT_CONFIG = 2  # bad configuration (argparse also exits 2 for a usage error)

DB_NAME = "spool.db"
RECOVERED_LEDGER = "recovered.txt"  # checksums of quarantined files recovered into the spool
RETRYABLE = (CopyState.QUEUED, CopyState.DEFERRED)  # delivering: already claimed; final: done

_QUEUE_HELP = """\
Inspect and act on the spool of a running or stopped relay (the database
spool.db in spool.dir). A running relay picks up changes within a second.
Addresses are shown as the keyed tokens the logs use, unless
--show-addresses. Exit status 0: done; 1: unknown queue id, or no spool
database; 2: bad configuration or usage.
"""
_LIST_HELP = """\
One line per copy still in the spool (queued, delivering, deferred, and failed
copies of messages that still have live ones): queue id, copy id, state,
attempts, next try, last reply code, age, the application's Message-ID, sender
and recipient; every worker's spool in one listing (a SPOOL column), then the
totals by state.
"""
_SHOW_HELP = """\
Print one message: its envelope, body size, times, and for each copy its
state, last reply and header section. Never the body. Addresses in the
header text are replaced by tokens unless --show-addresses.
"""
_RETRY_HELP = """\
Make the queued and deferred copies of one message (or of every message,
with --all) due now; a running relay sends them within a second. Copies being
delivered and final copies are left alone. Prints how many copies.
"""
_DELETE_HELP = """\
Remove one message and all its copies from the spool; prints how many
copies. A copy the relay is sending at that moment may still arrive; its
outcome is then not recorded. No delivery status notification is sent.
"""
_RECOVER_HELP = """\
Bring the readable records of a quarantined spool database (PATH, one of
spool.dir/quarantine/spool-*.db, with its .bodies directory beside it) back
into the live spool: every live copy whose checksums hold is queued again,
due now. PATH is read from a copy and never changed. A copy that was being
delivered when the spool was damaged may be sent twice. Messages the spool
already holds are left alone. A file is recovered once: its checksum goes into
spool.dir/recovered.txt, and recovering the same file again is refused (its
copies may have been delivered since; delete its line to force it). Works
beside a running relay. Prints what was recovered and what was not; exit
status 0 when PATH could be read, 1 when not (or when it was recovered already).
"""
_STATS_HELP = """\
Copies by state (all five), messages, the age of the oldest message with a
live copy, records set aside in quarantine, and the database's size.
"""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``queue`` and its actions to the ``solo-relay`` subcommands."""
    config_help = "TOML file (default: $RELAY_CONFIG)"
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given after the action it sets args.config; else the queue-level one stands.
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    show = argparse.ArgumentParser(add_help=False)
    show.add_argument(
        "--show-addresses",
        action="store_true",
        help="print addresses in clear instead of their tokens",
    )
    queue = commands.add_parser(
        "queue", help="inspect and act on the spool", description=_QUEUE_HELP
    )
    queue.add_argument("--config", metavar="PATH", help=config_help)
    actions = queue.add_subparsers(dest="queue_action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "list",
        parents=[common, show],
        help="one line per copy",
        description=_LIST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    queueview.add_list_options(p)  # filters, --json, --delivered (relay.cli.queueview)
    p = actions.add_parser(
        "show",
        parents=[common, show],
        help="one message's envelope and headers",
        description=_SHOW_HELP,
    )
    p.add_argument("queue_id", metavar="ID", help="the queue id")
    queueview.add_json_option(p)
    p = actions.add_parser(
        "retry", parents=[common], help="make copies due now", description=_RETRY_HELP
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("queue_id", metavar="ID", nargs="?", help="the queue id")
    which.add_argument("--all", dest="every", action="store_true", help="every message")
    p = actions.add_parser(
        "delete", parents=[common], help="remove a message", description=_DELETE_HELP
    )
    p.add_argument("queue_id", metavar="ID", help="the queue id")
    p = actions.add_parser(
        "stats", parents=[common], help="counts by state", description=_STATS_HELP
    )
    queueview.add_json_option(p)
    p = actions.add_parser(
        "recover",
        parents=[common],
        help="bring back what a quarantined spool holds",
        description=_RECOVER_HELP,
    )
    p.add_argument("path", type=Path, metavar="PATH", help="a quarantined spool-*.db")


def run(
    args: argparse.Namespace,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Carry out ``solo-relay queue ACTION`` as parsed by ``add_parser``; the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        config = load(path=args.config)
    except ConfigError as exc:
        print(f"solo-relay: configuration error: {exc}", file=err)
        return EXIT_CONFIG
    directory = Path(config.spool.dir)
    if args.queue_action == "recover":
        return _recover(args.path, directory, out, err, config.spool.fsync)
    # One spool per worker (relay.ops.workers): spool.dir itself, then spool.dir/worker-K.
    paths = [d / DB_NAME for d in spool_dirs(config) if (d / DB_NAME).is_file()]
    if not paths:
        print(
            f"solo-relay queue: no spool database at {directory / DB_NAME}"
            f" (spool.dir = {config.spool.dir!r})",
            file=err,
        )
        return EXIT_NOT_FOUND
    action: str = args.queue_action
    tokens = None
    if action in ("list", "show"):
        try:
            tokens = _tokens(config, directory, show=args.show_addresses)
        except ConfigError as exc:
            print(f"solo-relay: configuration error: {exc}", file=err)
            return EXIT_CONFIG
    # list (every spool in one listing), show --json, stats --json: relay.cli.queueview.
    handled = queueview.run(
        args,
        paths,
        tokens,
        keyed=lambda: _tokens(config, directory, show=False),
        now=clock(),
        out=out,
        err=err,
    )
    if handled is not None:
        return handled
    found, broken = _each_spool(paths, args, tokens, clock(), out=out, err=err)
    if broken:
        return EXIT_NOT_FOUND
    if not found:
        print(f"solo-relay queue: no message {queuefmt.safe(args.queue_id)} in the spool", file=err)
        return EXIT_NOT_FOUND
    return EXIT_OK


def _each_spool(
    paths: Sequence[Path],
    args: argparse.Namespace,
    tokens: AddressTokens | None,
    now: float,
    *,
    out: TextIO,
    err: TextIO,
) -> tuple[bool, bool]:
    """The action on each spool in turn: whether the message (or a spool) was found, and
    whether a spool could not be read (the others are still shown)."""
    action: str = args.queue_action
    found = False
    broken = False  # a spool that could not be read: the others are still shown
    for path in paths:
        try:
            store = Store.open(path, durable=True)
        except StoreError as exc:
            print(f"solo-relay queue: cannot open {path}: {exc}", file=err)
            broken = True
            continue
        try:
            text = _act(store, path, args, tokens, now)
            every = action in ("stats", "list") or (action == "retry" and args.every)
            out.write(f"spool {path.parent}:\n{text}" if every and len(paths) > 1 else text)
            found = True
        except UnknownMessage:
            continue  # a queue id lives in one spool: look in the next
        except StoreError as exc:
            print(f"solo-relay queue: cannot use {path}: {exc}", file=err)
            broken = True
            continue
        finally:
            store.close()
        if action in ("show", "delete") or (action == "retry" and not args.every):
            break  # done: that message was found
    return found, broken


def _recover(source: Path, directory: Path, out: TextIO, err: TextIO, fsync: bool) -> int:
    """``solo-relay queue recover PATH``: salvage ``PATH`` into the spool in ``directory``.

    Once per file: a second run would queue again copies delivered since the first.
    """
    ledger = directory / RECOVERED_LEDGER
    try:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        done = ledger.read_text().splitlines() if ledger.exists() else []
    except OSError as exc:
        print(f"solo-relay queue: cannot read {source}: {exc.strerror}", file=err)
        return EXIT_NOT_FOUND
    earlier = next((line for line in done if line.split(" ", 1)[0] == digest), None)
    if earlier is not None:
        print(
            f"solo-relay queue: {source} was recovered into this spool already"
            f" ({earlier.split(' ', 2)[1]}); its copies may have been delivered since,"
            f" so nothing was done (remove its line from {ledger} to recover it again)",
            file=err,
        )
        return EXIT_NOT_FOUND
    try:
        found = admin.salvage(source)
    except (OSError, StoreError) as exc:
        print(
            f"solo-relay queue: cannot read {source}: {exc} (try: sqlite3 {source} .recover)",
            file=err,
        )
        return EXIT_NOT_FOUND
    try:
        added = admin.add_recovered(directory, found.messages, fsync=fsync)
    except (OSError, SpoolError) as exc:
        print(f"solo-relay queue: cannot write to {directory / DB_NAME}: {exc}", file=err)
        return EXIT_NOT_FOUND
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with ledger.open("a", encoding="utf-8") as handle:
        handle.write(f"{digest} {stamp} {source}\n")
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())
    out.write(
        f"recovered {added} messages ({found.copies} live copies read) from {source}\n"
        f"already in the spool: {len(found.messages) - added} messages\n"
        f"damaged records left behind: {found.damaged}\n"
        f"finished copies not brought back: {found.finished}\n"
    )
    return EXIT_OK


def _act(
    store: Store,
    path: Path,
    args: argparse.Namespace,
    tokens: AddressTokens | None,
    now: float,
) -> str:
    """One spool's part of ``solo-relay queue ACTION`` (``UnknownMessage``: not in this one)."""
    action: str = args.queue_action
    if action == "stats":
        return _stats(store, path, now)
    if action == "retry":
        return _retry(store, None if args.every else args.queue_id, now)
    if action == "delete":
        return _delete(store, args.queue_id)
    assert tokens is not None
    if action == "list":
        return _list(store, tokens, now)
    return _show(store, args.queue_id, tokens, now)


def _tokens(config: Config, directory: Path, *, show: bool) -> AddressTokens:
    if show:
        return AddressTokens(b"\0" * 16, show=True)  # the key is never used when showing
    return AddressTokens(load_key(config.log, directory))


# -- the actions ---------------------------------------------------------------------


def _list(store: Store, tokens: AddressTokens, now: float) -> str:
    copies = store.copies(queuefmt.LISTED)
    if not copies:
        return "no copies in the spool\n"
    header = ("QUEUE ID", "COPY", "STATE", "TRIES", "NEXT TRY", "LAST REPLY", "AGE", "FROM", "TO")
    rows = [header]
    rows.extend(
        (
            queuefmt.safe(c.message_id),
            str(c.copy_id),
            c.state.value,
            str(c.attempts),
            _next_try(c, now),
            f"{c.last_code} {c.last_enhanced}".strip() if c.last_code else "-",
            queuefmt.span(now - c.received),
            queuefmt.safe(queuefmt.sender_text(c.sender, tokens)),
            queuefmt.safe(tokens(c.rcpt)),
        )
        for c in copies
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        + "\n"
        for row in rows
    )


def _show(store: Store, message_id: str, tokens: AddressTokens, now: float) -> str:
    shown = store.message(message_id)
    if shown is None:
        raise UnknownMessage(message_id)
    message, copies, headers = shown
    sender, smtputf8, auth_user, received, expires, size, is_dsn = message
    if size == -1:  # a large body is a file of its own (relay.spool, Rule 3)
        size = queuefmt.file_size(store.bodies / message_id)
    addresses = [sender, *(c.rcpt for c in copies)]
    lines = [
        f"queue id   {queuefmt.safe(message_id)}",
        queuefmt.message_id_line([bytes(h) for h in headers.values()], addresses, tokens),
        f"sender     {queuefmt.safe(queuefmt.sender_text(sender, tokens))}",
        f"received   {queuefmt.when(received)} ({queuefmt.span(now - received)} ago)",
        f"expires    {queuefmt.when(expires)} ({_relative(expires, now)})",
        f"size       body {size} bytes",
        f"smtputf8   {'yes' if smtputf8 else 'no'}",
        f"auth user  {queuefmt.safe(tokens.redact(auth_user)) if auth_user else '-'}",
        f"dsn        {'yes (a delivery status notification)' if is_dsn else 'no'}",
        f"copies     {len(copies)}",
    ]
    for c in copies:
        raw = bytes(headers.get(c.copy_id, b""))
        reply = f"{c.last_code} {c.last_enhanced} {c.last_text}".strip() if c.last_code else ""
        if not reply and c.last_text:
            reply = c.last_text
        lines += [
            "",
            f"--- copy {c.copy_id}: {queuefmt.safe(tokens(c.rcpt))}",
            f"state      {c.state.value}, attempts {c.attempts}, next try {_next_try(c, now)}",
            f"last reply {queuefmt.safe(tokens.redact(reply)) if reply else '-'}",
            f"headers    {len(raw)} bytes",
            "",
        ]
        text = queuefmt.redact_headers(raw.decode("utf-8", "replace"), addresses, tokens)
        lines.extend(queuefmt.safe(line) for line in text.rstrip("\r\n").split("\r\n"))
    return "\n".join(lines) + "\n"


def _retry(store: Store, message_id: str | None, now: float) -> str:
    count = store.retry(message_id, now, RETRYABLE)
    scope = "" if message_id is None else f" of {queuefmt.safe(message_id)}"
    return f"{_copies_word(count)}{scope} due now\n"


def _delete(store: Store, message_id: str) -> str:
    count, in_flight = store.delete(message_id)
    text = f"deleted {queuefmt.safe(message_id)}: {_copies_word(count)}\n"
    if in_flight:
        text += f"  {_copies_word(in_flight)} being delivered at that moment may still arrive\n"
    return text


def _stats(store: Store, path: Path, now: float) -> str:
    stats = store.stats()
    counts, oldest, messages, quarantined = (
        stats.counts,
        stats.oldest,
        stats.messages,
        stats.quarantined,
    )
    sizes = {suffix: queuefmt.file_size(Path(f"{path}{suffix}")) for suffix in ("", "-wal")}
    bodies = store.bodies
    files = [entry.stat().st_size for entry in os.scandir(bodies)] if bodies.is_dir() else []
    lines = [f"{state.value:<12} {counts[state]}" for state in CopyState]
    lines.append(f"{'messages':<12} {messages}")
    age = (
        "-"
        if oldest is None
        else f"{queuefmt.span(now - oldest)} (received {queuefmt.when(oldest)})"
    )
    lines.append(f"{'oldest live':<12} {age}")
    lines.append(f"{'quarantined':<12} {quarantined}")
    lines.append(
        f"{'database':<12} {_bytes(sum(sizes.values()))}"
        f" ({path.name} {_bytes(sizes[''])}, WAL {_bytes(sizes['-wal'])})"
    )
    lines.append(f"{'body files':<12} {len(files)}, {_bytes(sum(files))}")
    status = read_upstreams(path.parent / UPSTREAMS_FILE)
    if status is not None:
        lines += _upstream_lines(status)
    return "\n".join(lines) + "\n"


def _upstream_lines(status: dict[str, object]) -> list[str]:
    """Each upstream's state as the relay last wrote it (several upstreams or shared limits)."""
    age = status.get("age")
    seen = f"{queuefmt.span(age)} ago" if isinstance(age, int | float) else "at an unknown time"
    stale = not isinstance(age, int | float) or age > STATUS_STALE
    lines = [
        f"{'upstreams':<12} as relay {status.get('pid')} saw them {seen}"
        + (" (stale: is the relay running?)" if stale else "")
        + f"; limits {status.get('store')}"
    ]
    entries = status.get("upstreams")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        quota = entry.get("quota")
        left = f", quota left {entry.get('quota_left')} of {quota}" if quota else ""
        lines.append(
            f"  {queuefmt.safe(str(entry.get('name'))):<10} {entry.get('role')!s:<9}"
            f" {entry.get('state')!s:<6} sent {entry.get('sent')},"
            f" failed over {entry.get('failovers')}{left}"
        )
    return lines


# -- formatting ----------------------------------------------------------------------


def _next_try(copy: CopyRow, now: float) -> str:
    if copy.state not in RETRYABLE:
        return "-"
    return "now" if copy.next_try <= now else f"in {queuefmt.span(copy.next_try - now)}"


def _relative(moment: float, now: float) -> str:
    return (
        f"{queuefmt.span(now - moment)} ago"
        if moment <= now
        else f"in {queuefmt.span(moment - now)}"
    )


def _bytes(size: int) -> str:
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def _copies_word(count: int) -> str:
    return f"{count} {'copy' if count == 1 else 'copies'}"
