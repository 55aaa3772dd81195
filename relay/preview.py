"""``solo-relay preview``: show the copies the relay would make, changing nothing.

This is how a user audits a template before a campaign: for each copy, its
final header section and every change with its reason; for a refused
message, the reply and the reason. Reads one file; the rest is pure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.errors import Rejected
from relay.headers import Field, parse_message
from relay.isolation import isolate
from relay.model import Envelope, IsolationOptions, Plan

_ANY_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class PreviewRequest:
    path: Path
    recipients: tuple[str, ...]
    sender: str | None
    smtputf8: bool | None  # None: on when the message or an address needs it
    raw: bool
    options: IsolationOptions


def read_message(path: Path, *, raw: bool) -> bytes:
    """The file as an SMTP client would send it: line endings made CRLF unless ``raw``."""
    data = path.read_bytes()
    return data if raw else _ANY_EOL.sub(b"\r\n", data)


def run(request: PreviewRequest) -> tuple[int, str]:
    """Return the exit status and the text to print (status 1: the relay would refuse)."""
    data = read_message(request.path, raw=request.raw)
    notes: list[str] = []
    recipients = request.recipients
    sender = request.sender
    if not recipients or sender is None:
        fields = _lenient_fields(data)
        if not recipients:
            recipients = _header_addresses(fields, ("to", "cc", "bcc"))
            notes.append("no --rcpt given: recipients taken from To, Cc and Bcc")
        if sender is None:
            found = _header_addresses(fields, ("from",))
            sender = found[0] if found else ""
            notes.append(f"no --from given: MAIL FROM <{sender}> taken from From")
    smtputf8 = request.smtputf8
    if smtputf8 is None:
        smtputf8 = not (
            data.isascii() and sender.isascii() and all(r.isascii() for r in recipients)
        )
    try:
        envelope = Envelope.parse(sender, recipients, smtputf8=smtputf8)
        plan = isolate(envelope, data, request.options)
    except Rejected as exc:
        lines = [*notes, f"rejected: {exc.reply}", f"reason: {exc.reason}"]
        return 1, "\n".join(lines) + "\n"
    return 0, render(plan, notes)


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


def _lenient_fields(data: bytes) -> tuple[Field, ...]:
    try:
        return parse_message(data, smtputf8=True, max_header_octets=len(data) + 1).fields
    except Rejected:
        return ()  # the real run below reports the defect


def _header_addresses(fields: Sequence[Field], names: Sequence[str]) -> tuple[str, ...]:
    found: list[str] = []
    for f in fields:
        if f.name in names:
            found.extend(addr_spec for _, addr_spec in f.mailboxes())
    return tuple(dict.fromkeys(found))
