"""Pure construction of delivery status notifications (SPEC 5; RFC 3464, RFC 6522).

A DSN reports one failed copy to the envelope sender of the original message:
a ``multipart/report; report-type=delivery-status`` with a human explanation
(``text/plain``), the machine-readable report (``message/delivery-status``) and
the failed copy's header section (``text/rfc822-headers``). This module only
builds the bytes; it does not decide whether to send one, does not send it, and
reads no clock: every date comes in as an argument.

Rule 1: a DSN names one recipient, the failed copy's. Its header part is that
copy's final header section (which the leak guard already checked), and any
other address in the upstream's diagnostic is replaced before it is shown.
Rule 2: nothing from a peer can make a header: CR, LF, NUL and other controls in
the diagnostic become spaces, it is cut to ``DIAGNOSTIC_MAX`` characters, and
non-ASCII becomes ``?`` (RFC 3464 fields are ASCII).
Rule 3: the bytes are exact: CRLF line endings only, no line over 998 octets
(RFC 5322 2.1.1), and a MIME boundary that occurs nowhere in the content.
Rule 4: never a DSN to the null sender ``<>`` (RFC 5321 4.5.5), nor to a
``MAILER-DAEMON`` (see ``dsn_recipient_ok``).
Rule 5: the ``From:`` is an address a provider can accept (``dsn_from_address``):
the one configured, else ``MAILER-DAEMON@`` the relay's host name when that is
a public domain name, else ``MAILER-DAEMON@`` the original sender's domain.

The result is 7-bit unless an input is not ASCII: a non-ASCII recipient is
written as the RFC 6533 ``utf-8`` address type (in its 7-bit xtext form) in the
report, but the human part and the header part then carry UTF-8 (8bit), and a
non-ASCII sender makes the ``To:`` field UTF-8 (RFC 6532): such a DSN needs an
upstream that offers 8BITMIME and SMTPUTF8.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

__all__ = [
    "DIAGNOSTIC_MAX",
    "Failure",
    "build_dsn",
    "dsn_from_address",
    "dsn_recipient_ok",
    "is_public_domain",
]

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets. A longer diagnostic
# (a multi-line reply joined into one) is cut, which also keeps the folded
# Diagnostic-Code field far below 998 octets whatever its words are.
DIAGNOSTIC_MAX = 512
# RFC 5321 4.5.3.1.3: a path is at most 256 octets, angle brackets included.
# Checked so that no address (even xtext-encoded, at most 3.5 times longer) can
# push a line past 998 octets.
ADDRESS_MAX = 254
HOST_MAX = 255  # RFC 1035 2.3.4; also the cap on a message id, far from the line limit
LINE_MAX = 998  # RFC 5322 2.1.1
FOLD_WIDTH = 78  # RFC 5322 2.1.1: SHOULD

_STATUS = re.compile(r"[45]\.\d{1,3}\.\d{1,3}")  # RFC 3463; "failed" is never 2.x.x
_SMTP_REPLY = re.compile(r"[2-5]\d\d(?:[ -]|$)")  # RFC 5321 4.2
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
# Anything shaped like local@domain; the recipient itself is let through.
_ADDRESS_LIKE = re.compile(r"""[^\s<>()\[\]{}",;:@]+@[^\s<>()\[\]{}",;:@]+""")
_HOST = re.compile(r"[A-Za-z0-9._:\[\]-]+")  # a host name or an IP address literal
_MESSAGE_ID = re.compile(r"[!-;=?-~]+")  # printable ASCII except "<" and ">"
_BOUNDARY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_REDACTED = "[address removed]"
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # RFC 1123 2.1
# Names no provider will take as a sender's domain: special-use and reserved names
# (RFC 6761 6.2-6.4, RFC 2606 2, RFC 6762 3 ".local", RFC 7686 ".onion", RFC 9476
# ".alt", RFC 8375 "home.arpa", ICANN's 2024 ".internal"), and names commonly used
# inside private networks that the root zone will not delegate.
_PRIVATE_SUFFIXES = frozenset(
    {
        "localhost",
        "invalid",
        "test",
        "example",
        "local",
        "onion",
        "alt",
        "internal",
        "arpa",
        "localdomain",
        "lan",
        "home",
        "corp",
        "intranet",
        "private",
    }
)
MAILER_DAEMON = "MAILER-DAEMON"


@dataclass(frozen=True, slots=True)
class Failure:
    """One copy that will not be delivered, as the DSN reports it."""

    queue_id: str  # the relay's id of the original message
    sender: str  # original envelope sender (MAIL FROM), never "" (no DSN to <>)
    recipient: str  # the one failed recipient, the envelope address as accepted
    status: str  # RFC 3463 enhanced code: "5.1.1", or "4.4.7" on expiry
    diagnostic: str  # the upstream's reply ("550 5.1.1 user unknown"), or ""
    remote_mta: str  # the upstream's host name, or "" (outbox, or no connection)
    arrival_date: datetime  # when the relay accepted the original
    last_attempt: datetime
    expired: bool  # the lifetime ended (True), or the upstream refused for good
    original_headers: bytes  # the failed copy's final header section


def dsn_recipient_ok(sender: str) -> bool:
    """Whether a DSN may go to envelope sender ``sender``.

    False for the null sender (``""`` or ``"<>"``: RFC 5321 4.5.5, a bounce is
    never bounced) and for a ``MAILER-DAEMON`` local part in any case: such a
    sender is another system's bounce generator, and answering it risks a loop
    between two mail systems (RFC 3834 2 lets responders skip such senders).
    """
    address = sender.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if not address:
        return False
    local = address.rpartition("@")[0] if "@" in address else address
    return local.strip('"').lower() != "mailer-daemon"


def is_public_domain(name: str) -> bool:
    """Whether ``name`` is a DNS domain a provider could accept in a sender address.

    At least two labels of letters, digits and inner hyphens (RFC 1123 2.1), at
    most 253 octets, a top-level label that is not all digits (so no IP address),
    and no special-use or private top-level name (``_PRIVATE_SUFFIXES``): a
    Kubernetes pod name (one label) or ``solo-relay.localhost`` is not one.
    """
    name = name.rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.fullmatch(x) for x in labels):
        return False
    top = labels[-1].lower()
    return not top.isdigit() and top not in _PRIVATE_SUFFIXES


def dsn_from_address(configured: str, hostname: str, sender: str) -> str:
    """The ``From:`` address of a DSN to ``sender`` (Rule 5).

    ``configured`` (``delivery.dsn_from``) when set; else ``MAILER-DAEMON@hostname``
    when ``hostname`` (``smtp.hostname``) is a public domain name; else
    ``MAILER-DAEMON@`` the domain of ``sender``, the original envelope sender: a
    domain the application already sends from through this provider. When even
    that is not a domain (an address literal), ``MAILER-DAEMON@hostname``.
    """
    if configured:
        return configured
    if is_public_domain(hostname):
        return f"{MAILER_DAEMON}@{hostname}"
    domain = sender.strip().strip("<>").rpartition("@")[2]
    if domain and _HOST.fullmatch(domain) and not domain.startswith("["):
        return f"{MAILER_DAEMON}@{domain}"
    return f"{MAILER_DAEMON}@{hostname}"


def build_dsn(
    failure: Failure,
    *,
    reporting_mta: str,
    now: datetime,
    message_id: str,
    from_address: str = "",
) -> bytes:
    """The DSN for ``failure`` as message bytes, ready for the spool.

    ``reporting_mta`` is this relay's host name, ``from_address`` the DSN's
    ``From:`` (default ``MAILER-DAEMON@reporting_mta``; see ``dsn_from_address``),
    ``now`` is the DSN's ``Date:``, and ``message_id`` its ``Message-ID``
    without angle brackets. Dates must be timezone-aware.

    Raises ``ValueError`` when an argument could not be written safely (a naive
    date, an address with control characters or over 254 octets, a bad or
    over-long host name or message id) or when ``dsn_recipient_ok(failure.sender)`` is false:
    those are the caller's mistakes, never a peer's. A ``status`` that is not a
    4.x.x or 5.x.x code is replaced by ``4.4.7`` on expiry and ``5.0.0`` else.
    """
    author = from_address or f"{MAILER_DAEMON}@{reporting_mta}"
    _check_arguments(
        failure, reporting_mta=reporting_mta, now=now, message_id=message_id, author=author
    )

    status = failure.status
    if _STATUS.fullmatch(status) is None:
        status = "4.4.7" if failure.expired else "5.0.0"
    diagnostic = _clean_diagnostic(failure.diagnostic, failure.recipient)

    parts = (
        _human_part(failure, status, diagnostic, reporting_mta),
        _report_part(failure, status, diagnostic, reporting_mta),
        _headers_part(failure.original_headers),
    )
    boundary = _boundary(failure.queue_id, parts)
    eight_bit = not all(part.isascii() for part in parts)
    head = [
        f"From: Mail Delivery System <{author}>",
        f"To: <{failure.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{message_id}>",
        "MIME-Version: 1.0",
        "Auto-Submitted: auto-replied",  # RFC 3834 5: answers the original message
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
    ]
    if eight_bit:
        head.append("Content-Transfer-Encoding: 8bit")  # RFC 2045 6.4: as the parts
    out = [_lines(head), b"\r\n"]
    delimiter = b"--" + boundary.encode("ascii")
    for part in parts:
        out += [delimiter, b"\r\n", part, b"\r\n"]
    out += [delimiter, b"--\r\n"]
    return b"".join(out)


def _check_arguments(
    failure: Failure, *, reporting_mta: str, now: datetime, message_id: str, author: str
) -> None:
    """The ``ValueError`` cases of ``build_dsn``: the caller's mistakes, never a peer's."""
    if not dsn_recipient_ok(failure.sender):
        raise ValueError("no DSN to the null sender or a MAILER-DAEMON")
    _check_address("sender", failure.sender)
    _check_address("recipient", failure.recipient)
    if not reporting_mta:
        raise ValueError("reporting_mta is empty")
    for name, value in (("reporting_mta", reporting_mta), ("remote_mta", failure.remote_mta)):
        if value and (_HOST.fullmatch(value) is None or len(value) > HOST_MAX):
            raise ValueError(f"{name} is not a host name")
    if _MESSAGE_ID.fullmatch(message_id) is None or len(message_id) > HOST_MAX:
        raise ValueError("message_id is not a bare id-left@id-right")
    _check_address("from_address", author)
    for name, when in (
        ("now", now),
        ("arrival_date", failure.arrival_date),
        ("last_attempt", failure.last_attempt),
    ):
        if when.utcoffset() is None:
            raise ValueError(f"{name} has no time zone")


def _check_address(name: str, address: str) -> None:
    """Refuse an envelope address that could break a line or a header."""
    if not address or _CONTROLS.search(address) or "<" in address or ">" in address:
        raise ValueError(f"{name} is empty or has control characters or angle brackets")
    if len(address.encode("utf-8")) > ADDRESS_MAX:
        raise ValueError(f"{name} is longer than {ADDRESS_MAX} octets")


def _clean_diagnostic(text: str, recipient: str) -> str:
    """The upstream's reply as one safe ASCII line naming no address but ``recipient``."""
    text = _CONTROLS.sub(" ", text)  # CR, LF, NUL: a peer never makes a header
    text = "".join(c if c.isascii() else "?" for c in text)
    text = " ".join(text.split())
    if len(text) > DIAGNOSTIC_MAX:
        text = text[: DIAGNOSTIC_MAX - 3].rstrip() + "..."
    # The recipient as given, and as it reads after non-ASCII became "?".
    wanted = {recipient.lower(), "".join(c if c.isascii() else "?" for c in recipient).lower()}

    def redact(match: re.Match[str]) -> str:
        found = match[0]
        return found if found.rstrip(".").lower() in wanted else _REDACTED

    return _ADDRESS_LIKE.sub(redact, text)


def _human_part(failure: Failure, status: str, diagnostic: str, reporting_mta: str) -> bytes:
    """Part 1: the explanation for a person, naming only the failed recipient."""
    if failure.expired:
        why = (
            "Your message could not be delivered to the recipient below before its "
            "lifetime in the queue ended. Delivery was retried until "
            f"{format_datetime(failure.last_attempt)}; the relay has now given up."
        )
    else:
        why = (
            "Your message could not be delivered to the recipient below. The receiving "
            "server refused it permanently, so it will not be retried."
        )
    reason = diagnostic or f"status {status}"
    if not diagnostic and failure.expired:
        reason += " (delivery time expired)"
    if failure.remote_mta:
        reason += f" (reported by {failure.remote_mta})"
    text = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        *textwrap.wrap(why, 72),
        "",
        f"    <{failure.recipient}>:",
        *textwrap.wrap(
            reason, 72, initial_indent="    ", subsequent_indent="    ", break_long_words=False
        ),
        "",
        "The machine-readable report and the message's header section are attached.",
    ]
    body = _lines(text)
    charset = "us-ascii" if body.isascii() else "utf-8"
    head = [f"Content-Type: text/plain; charset={charset}", "Content-Description: Notification"]
    if not body.isascii():
        head.append("Content-Transfer-Encoding: 8bit")
    return _lines(head) + b"\r\n" + body


def _report_part(failure: Failure, status: str, diagnostic: str, reporting_mta: str) -> bytes:
    """Part 2: the RFC 3464 per-message and per-recipient fields, all ASCII."""
    queue_id = _CONTROLS.sub("", failure.queue_id)
    queue_id = "".join(c for c in queue_id if c.isascii())[:64]
    per_message = [f"Reporting-MTA: dns; {reporting_mta}"]
    if queue_id:
        per_message.append(f"X-Queue-ID: {queue_id}")  # RFC 3464 3: extension field
    per_message.append(f"Arrival-Date: {format_datetime(failure.arrival_date)}")
    if failure.recipient.isascii():
        final = f"rfc822; {failure.recipient}"
    else:  # RFC 6533 3: utf-8 address type, 7-bit form in message/delivery-status
        final = f"utf-8; {_utf8_xtext(failure.recipient)}"
    per_recipient = [f"Final-Recipient: {final}", "Action: failed", f"Status: {status}"]
    if failure.remote_mta:
        per_recipient.append(f"Remote-MTA: dns; {failure.remote_mta}")
    if diagnostic:
        kind = "smtp" if _SMTP_REPLY.match(diagnostic) else "X-Solo-Relay"  # RFC 3464 2.3.6
        per_recipient += _fold(f"Diagnostic-Code: {kind}; {diagnostic}")
    per_recipient.append(f"Last-Attempt-Date: {format_datetime(failure.last_attempt)}")
    head = _lines(["Content-Type: message/delivery-status", "Content-Description: Delivery report"])
    return head + b"\r\n" + _lines(per_message) + b"\r\n" + _lines(per_recipient)


def _headers_part(original: bytes) -> bytes:
    """Part 3: the failed copy's header section, CRLF, without the blank line."""
    text = original.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\0", b"")
    lines: list[bytes] = []
    for line in text.split(b"\n"):
        if not line:  # the end of the header section: never a body
            break
        lines.append(_cut(line, LINE_MAX))
    body = b"".join(line + b"\r\n" for line in lines)
    head = ["Content-Type: text/rfc822-headers", "Content-Description: Undelivered message headers"]
    if not body.isascii():  # RFC 6532 header fields
        head = ["Content-Type: text/rfc822-headers; charset=utf-8", head[1]]
        head.append("Content-Transfer-Encoding: 8bit")
    return _lines(head) + b"\r\n" + body


def _boundary(queue_id: str, parts: tuple[bytes, ...]) -> str:
    """A boundary from the queue id and a content hash, checked against it (RFC 2046 5.1.1)."""
    stem = _BOUNDARY_UNSAFE.sub("", queue_id)[:24]
    haystack = [part.lower() for part in parts]
    salt = 0
    while True:
        digest = hashlib.sha256(str(salt).encode() + b"".join(parts)).hexdigest()[:24]
        boundary = f"=_dsn.{stem}.{digest}"  # at most 54 of the 70 characters allowed
        needle = boundary.lower().encode("ascii")
        if not any(needle in part for part in haystack):
            return boundary
        salt += 1


def _utf8_xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: QCHARs as they are, everything else as \\x{HEX}."""
    return "".join(
        c if "!" <= c <= "~" and c not in "\\+=" else f"\\x{{{ord(c):02X}}}" for c in address
    )


def _fold(field: str) -> list[str]:
    """A header-style field folded at spaces near ``FOLD_WIDTH`` (RFC 5322 2.2.3)."""
    lines: list[str] = []
    current = ""
    for word in field.split(" "):
        if current and len(current) + 1 + len(word) > FOLD_WIDTH:
            lines.append(current)
            current = " " + word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return lines


def _cut(line: bytes, limit: int) -> bytes:
    """``line`` cut to ``limit`` octets, never inside a UTF-8 sequence."""
    if len(line) <= limit:
        return line
    end = limit
    while end > 0 and 0x80 <= line[end] < 0xC0:  # a continuation byte: back off
        end -= 1
    return line[:end]


def _lines(lines: list[str]) -> bytes:
    return b"".join(line.encode("utf-8") + b"\r\n" for line in lines)
