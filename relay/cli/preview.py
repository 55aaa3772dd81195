"""``solo-relay preview``: show the copies the relay would make, changing nothing.

This is how a user audits a template before a campaign: for each copy, its
final header section and every change with its reason; for a refused
message, the reply and the reason. ``summary`` gives counts only (copies,
recipients refused at RCPT, header changes): no address, no header section,
fit for a campaign of thousands. ``out_dir`` also writes each copy as an
``.eml`` file. Reads one file (and writes those); the rest is pure.

Rule 1: a recipient the relay would refuse at RCPT (``553``) is refused alone,
as in an SMTP session; the others still get their copies.
Rule 2: the envelope taken from the headers (no ``--rcpt``, no ``--from``) is
read from the file with CRLF line endings even under ``raw``, so a defect that
``raw`` shows never hides the sender or the recipients.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.core.addresses import parse_recipient
from relay.core.errors import BadAddress, Rejected, Reply
from relay.core.headers import Field, parse_message
from relay.core.isolation import isolate
from relay.core.model import Copy, Envelope, IsolationOptions, Plan

_ANY_EOL = re.compile(rb"\r\n|\r|\n")
COPY_FILE = "copy-{:04d}.eml"  # numbered in envelope order; the name holds no address


@dataclass(frozen=True, slots=True)
class PreviewRequest:
    path: Path
    recipients: tuple[str, ...]
    sender: str | None
    smtputf8: bool | None  # None: on when the message or an address needs it
    raw: bool
    options: IsolationOptions
    summary: bool = False  # counts only
    out_dir: Path | None = None  # write each copy here as an .eml file
    local_domains: frozenset[str] = frozenset()  # smtp.local_domains, lower case


@dataclass(frozen=True, slots=True)
class Refusal:
    """A recipient refused at RCPT, as the relay would answer it."""

    address: str
    reply: Reply
    reason: str


def read_message(path: Path, *, raw: bool) -> bytes:
    """The file as an SMTP client would send it: line endings made CRLF unless ``raw``."""
    data = path.read_bytes()
    return data if raw else _ANY_EOL.sub(b"\r\n", data)


def run(request: PreviewRequest) -> tuple[int, str]:
    """Return the exit status and the text to print (status 1: the relay would refuse).

    Raises ``OSError`` when the file cannot be read or a copy cannot be written.
    """
    data = read_message(request.path, raw=request.raw)
    notes: list[str] = []
    recipients = request.recipients
    sender = request.sender
    if not recipients or sender is None:
        fields = _lenient_fields(_ANY_EOL.sub(b"\r\n", data))  # Rule 2
        if not recipients:
            recipients = _header_addresses(fields, ("to", "cc", "bcc"))
            notes.append("no --rcpt given: recipients taken from To, Cc and Bcc")
        if sender is None:
            found = _header_addresses(fields, ("from",))
            sender = found[0] if found else ""
            source = "taken from From" if found else "(no From address found)"
            notes.append(f"no --from given: MAIL FROM <{sender}> {source}")
    smtputf8 = request.smtputf8
    if smtputf8 is None:
        smtputf8 = not (
            data.isascii() and sender.isascii() and all(r.isascii() for r in recipients)
        )
    accepted, refused = _rcpt(recipients, smtputf8=smtputf8, local_domains=request.local_domains)
    try:
        if recipients and not accepted:
            first = refused[0]
            raise Rejected(first.reply, f"every recipient was refused at RCPT ({first.reason})")
        envelope = Envelope.parse(
            sender, accepted, smtputf8=smtputf8, local_domains=request.local_domains
        )
        plan = isolate(envelope, data, request.options)
    except Rejected as exc:
        if request.summary:
            notes = [f"summary of {request.path.name}: the relay would refuse it"]
            notes.extend(_refusal_counts(refused))
        lines = [*notes, f"rejected: {exc.reply}", f"reason: {exc.reason}"]
        return 1, "\n".join(lines) + "\n"
    written = _write(plan.copies, request.out_dir) if request.out_dir is not None else []
    if request.summary:
        text = summarize(plan, refused, request.path.name)
    else:
        notes.extend(f"refused at RCPT: <{r.address}>: {r.reply} ({r.reason})" for r in refused)
        text = render(plan, notes)
    if request.out_dir is not None:
        text += f"wrote {len(written)} .eml file(s) to {request.out_dir}\n"
    return 0, text


def render(plan: Plan, notes: Sequence[str] = ()) -> str:
    """Each copy's header section and changes, then a summary."""
    out = list(notes)
    total = len(plan.copies)
    for number, copy in enumerate(plan.copies, start=1):
        out.append(f"=== copy {number} of {total}: for <{copy.recipient.text}> ===")
        out.extend(
            f"  {change.kind.value:<13} {change.header:<16} {change.reason}"
            for change in copy.changes
        )
        out.append("  --- header section ---")
        text = copy.headers.decode("utf-8", "replace").removesuffix("\r\n\r\n")
        out.extend(f"  | {line}" for line in text.split("\r\n"))
        out.append(f"  (body: {len(copy.body)} bytes, unchanged, shared by every copy)")
    summary = f"{total} cop{'y' if total == 1 else 'ies'}"
    if plan.merged_duplicates:
        summary += f"; {plan.merged_duplicates} duplicate recipient(s) merged"
    out.append(summary)
    out.extend(f"warning: {w}" for w in plan.warnings)
    return "\n".join(out) + "\n"


def summarize(plan: Plan, refused: Sequence[Refusal] = (), name: str = "the message") -> str:
    """Counts only, naming no address: copies, refusals, header changes, warnings."""
    out = [f"summary of {name}: the relay would accept it"]
    out.append(f"  copies                 {len(plan.copies)}")
    out.append(f"  duplicates merged      {plan.merged_duplicates}")
    out.extend(_refusal_counts(refused))
    changes = collections.Counter(
        (change.kind.value, change.header) for copy in plan.copies for change in copy.changes
    )
    out.append("  header changes (over all copies):")
    out.extend(
        f"    {kind:<13} {header:<16} {count}" for (kind, header), count in sorted(changes.items())
    )
    out.append(f"  body-check warnings    {len(plan.warnings)}")
    return "\n".join(out) + "\n"


def _refusal_counts(refused: Sequence[Refusal]) -> list[str]:
    lines = [f"  refused at RCPT        {len(refused)}"]
    by_reply = collections.Counter(str(r.reply) for r in refused)
    lines.extend(f"    {count}  {reply}" for reply, count in sorted(by_reply.items()))
    return lines


def _rcpt(
    recipients: Sequence[str], *, smtputf8: bool, local_domains: frozenset[str]
) -> tuple[list[str], list[Refusal]]:
    """Rule 1: split the recipients into those RCPT would take and those it would refuse."""
    accepted: list[str] = []
    refused: list[Refusal] = []
    for text in recipients:
        try:
            parse_recipient(text, smtputf8=smtputf8, local_domains=local_domains)
        except BadAddress as exc:
            refused.append(Refusal(text, exc.reply, exc.reason))
        else:
            accepted.append(text)
    return accepted, refused


def _write(copies: Sequence[Copy], directory: Path) -> list[Path]:
    """Each copy's exact bytes (header section, then the shared body) as numbered files."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, copy in enumerate(copies, start=1):
        path = directory / COPY_FILE.format(number)
        path.write_bytes(copy.headers + bytes(copy.body))
        paths.append(path)
    return paths


def _lenient_fields(data: bytes) -> tuple[Field, ...]:
    try:
        return parse_message(data, smtputf8=True, max_header_octets=len(data) + 1).fields
    except Rejected:
        return ()  # the real run below reports the defect


def _header_addresses(fields: Sequence[Field], names: Sequence[str]) -> tuple[str, ...]:
    found: list[str] = []
    for f in fields:
        if f.name in names:
            found.extend(addr_spec for _, addr_spec in f.mailboxes(utf8=True, limit=None))
    return tuple(dict.fromkeys(found))
