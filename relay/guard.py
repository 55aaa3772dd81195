"""The leak guard: the last, independent check on each copy's final bytes.

Rule 1: a copy never contains another recipient's address. "Another
recipient" is any envelope recipient or any address in the original's
recipient-bearing fields (``To``, and every field on the removal list),
other than the copy's own and the sender's (MAIL FROM and the mailboxes of
``From:`` and ``Sender:``): a copy may show who sent it.
Rule 2: the guard trusts nothing the splitter did. It re-parses each copy's
header section, requires exactly one ``To:`` naming only the copy's
recipient and no removed field, and searches every field raw, RFC 2047
decoded and percent-decoded, case-insensitively, with domains compared as
A-labels (so a U-label spelling matches too), and addresses spelled in VERP
form (``bounce+bob=example.com@...``).
Rule 3: it fails closed: any hit, and any copy it cannot read, rejects the
whole message with ``550 5.7.1``; nothing of it is delivered.
Rule 4: body checks read the shared body once per message (text parts and
nested message headers), with the configured action: off, warn or reject.

Pure: no I/O; reasons name header fields, never addresses.
"""

from __future__ import annotations

import email.errors
import email.header
import html
import re
import urllib.parse
from collections.abc import Sequence

from relay.addresses import Address, domain_key
from relay.errors import BadData, HeaderDefect, LeakDetected
from relay.headers import Field, ParsedMessage, check_line_endings, parse_fields
from relay.mime import Piece, walk
from relay.model import BodyCheck, Copy, Envelope, IsolationOptions

# Local-part characters (RFC 5322 atext, RFC 6531 non-ASCII) and domain characters.
_LOCAL = r"a-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOMAIN = r"a-z0-9\-\u0080-\U0010ffff"
# The longest run of local characters (dots too) before an "@": "sal@x" never
# reads as "al@x", but ".bob@x" still reads as "bob@x".
_AT_FORM = re.compile(rf'([{_LOCAL}.]+|"(?:[^"\\\r\n]|\\.)*")@([{_DOMAIN}.]+)')
# VERP and friends: "bounce+bob=example.com@list.example" spells bob@example.com.
_VERP_LOCAL = r"a-z0-9!#$'*/?^_`{|}~\-\u0080-\U0010ffff."  # no "+", "=", "&": they end the run
_VERP_FORM = re.compile(rf"([{_VERP_LOCAL}]+)=([{_DOMAIN}]+(?:\.[{_DOMAIN}]+)+)")
# Characters that are atext but in practice end a URL or template part before an address;
# "-", "+" and "." are not among them: "x.bob@" is not "bob@" (both may be customers).
_URL_BREAKS = frozenset("?=/&#'`{}|")
_ENCODED_WORD = "=?"
_MAX_UNQUOTE_ROUNDS = 3  # "%2540" is "%40" is "@"


def key(local: str, domain: str) -> str:
    """The guard's comparison form: local part case-folded, domain as lower-case A-label."""
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    local = local.strip(".")
    domain = domain.strip(".-")
    return f"{local.lower()}@{domain_key(domain)}" if local and domain else ""


def address_key(address: Address) -> str:
    return key(address.local, address.domain)


def views(text: str) -> list[str]:
    """The spellings the guard searches: raw, RFC 2047 decoded, percent-decoded; all lower case."""
    found = [text.lower()]
    if _ENCODED_WORD in text:
        found.append(_decode_words(text).lower())
    for view in list(found):
        current = view
        for _ in range(_MAX_UNQUOTE_ROUNDS):
            unquoted = urllib.parse.unquote(current) if "%" in current else current
            if unquoted == current:
                break
            found.append(unquoted)
            current = unquoted
    return found


def addresses_in(text: str) -> set[str]:
    """Every address key the text spells, in any of its views."""
    found: set[str] = set()
    for view in views(text):
        if "@" in view:
            for m in _AT_FORM.finditer(view):
                local, domain = m.group(1), m.group(2)
                found.add(key(local, domain))
                # URL and template syntax is atext too: "?who=bob@x", "/u/bob@x", "{bob@x}".
                found.update(
                    key(local[i + 1 :], domain) for i, c in enumerate(local) if c in _URL_BREAKS
                )
        if "=" in view:
            for m in _VERP_FORM.finditer(view):
                local, domain = m.group(1), m.group(2)
                found.add(key(local, domain))
                # "bounces-bob=example.com": the part after a separator is the address.
                found.update(key(local[i + 1 :], domain) for i, c in enumerate(local) if c in "-.")
    found.discard("")
    return found


def _decode_words(text: str) -> str:
    """RFC 2047 decoding; adjacent encoded words join, bad charsets fall back to Latin-1."""
    try:
        chunks = email.header.decode_header(text)
    except (email.errors.HeaderParseError, ValueError):
        return text
    out = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
            continue
        try:
            out.append(chunk.decode(charset or "ascii", "replace"))
        except LookupError:
            out.append(chunk.decode("latin-1"))
    return "".join(out)


def _field_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape").replace("\r\n", "")


def _senders(message: ParsedMessage, envelope: Envelope) -> set[str]:
    """MAIL FROM and the mailbox addresses (not display names) of From: and Sender:."""
    keys = set()
    if envelope.sender is not None:
        keys.add(address_key(envelope.sender))
    for f in message.fields:
        if f.name in ("from", "sender"):
            for _, addr_spec in f.mailboxes():
                local, _, domain = addr_spec.rpartition("@")
                keys.add(key(local, domain))
    keys.discard("")
    return keys


class LeakGuard:
    """Checks the copies of one message against everyone else it was meant for."""

    def __init__(
        self, message: ParsedMessage, envelope: Envelope, options: IsolationOptions
    ) -> None:
        self._message = message
        self._options = options
        self._smtputf8 = envelope.smtputf8
        self._cache: dict[bytes, frozenset[str]] = {}
        visible: set[str] = set()
        for f in message.fields:
            if f.name == "to" or f.name in options.removed_headers:
                visible |= self._addresses(f.raw)
        recipients = {address_key(r) for r in envelope.recipients}
        self._watched = frozenset((recipients | visible) - _senders(message, envelope))

    def check(self, copies: Sequence[Copy]) -> tuple[str, ...]:
        """Raise ``LeakDetected`` if any copy discloses another recipient; return warnings."""
        for number, copy in enumerate(copies, start=1):
            self._check_copy(number, copy)
        return self._check_body(copies)

    def _addresses(self, raw: bytes) -> frozenset[str]:
        found = self._cache.get(raw)
        if found is None:
            found = frozenset(addresses_in(_field_text(raw)))
            self._cache[raw] = found
        return found

    def _check_copy(self, number: int, copy: Copy) -> None:
        own = address_key(copy.recipient)
        fields = self._reparse(number, copy.headers)
        to_fields = [f for f in fields if f.name == "to"]
        if len(to_fields) != 1 or self._addresses(to_fields[0].raw) != {own}:
            raise LeakDetected(f"copy {number}: To: is not exactly the copy's recipient")
        for f in fields:
            if f.name in self._options.removed_headers:
                raise LeakDetected(f"copy {number}: removed field {f.name} is still present")
            if (self._addresses(f.raw) & self._watched) - {own}:
                raise LeakDetected(f"copy {number}: {_display(f)} names another recipient")

    def _reparse(self, number: int, headers: bytes) -> tuple[Field, ...]:
        if not headers.endswith(b"\r\n\r\n") or headers.find(b"\r\n\r\n") != len(headers) - 4:
            raise LeakDetected(f"copy {number}: header section is not one block")
        try:
            check_line_endings(headers, normalize=False)
            return parse_fields(headers[:-2], smtputf8=self._smtputf8)
        except (BadData, HeaderDefect) as exc:
            raise LeakDetected(f"copy {number}: header section unreadable ({exc.reason})") from exc

    def _check_body(self, copies: Sequence[Copy]) -> tuple[str, ...]:
        """The body is shared, so one reading serves every copy (SPEC 3, body checks)."""
        mode = self._options.body_check
        found = self._body_addresses(scan=mode is not BodyCheck.OFF) & self._watched
        if not found:
            return ()
        exposed = sum(1 for c in copies if found - {address_key(c.recipient)})
        if not exposed:
            return ()
        reason = f"the body names other recipients in {exposed} of {len(copies)} copies"
        if mode is BodyCheck.REJECT:
            raise LeakDetected(reason)
        return (reason,)

    def _body_addresses(self, *, scan: bool) -> set[str]:
        """Walk the MIME tree (always: the nesting limit holds even with checks off)."""
        top = {f.name: f.text() for f in reversed(self._message.fields)}
        found: set[str] = set()
        pieces = walk(
            self._message.data,
            self._message.body_offset,
            top.get("content-type"),
            top.get("content-transfer-encoding"),
            limit=self._options.mime_nesting_limit,
        )
        for kind, content in pieces:
            if not scan:
                continue
            text = content.decode("utf-8", "surrogateescape")
            if kind is Piece.TEXT and "&" in text:
                text = text + "\n" + html.unescape(text)
            if kind is Piece.HEADERS:
                text = text.replace("\r\n ", " ").replace("\r\n\t", " ")
            found |= addresses_in(text)
        return found


def _display(f: Field) -> str:
    return f.raw[: f.raw.index(b":")].decode("ascii", "replace")
