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

import html
import re
from collections.abc import Sequence

from relay.errors import BadData, HeaderDefect, LeakDetected
from relay.headers import Field, ParsedMessage, check_line_endings, parse_fields
from relay.mime import Piece, walk
from relay.model import BodyCheck, Copy, Envelope, IsolationOptions
from relay.spellings import address_key, addresses_in, key

# Entities that can spell an "@" or a dot in HTML text: only then is an unescaped view made.
_ENTITY_HINT = re.compile(r"&(?:#|commat;|period;)", re.IGNORECASE)


def _field_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape").replace("\r\n", "")


def _senders(message: ParsedMessage, envelope: Envelope) -> set[str]:
    """MAIL FROM, and the mailbox of a From: or Sender: that names exactly one.

    A From: listing several mailboxes exempts none of them: otherwise it would
    carry the very list of customers this relay exists to hide.
    """
    keys = set()
    if envelope.sender is not None:
        keys.add(address_key(envelope.sender))
    for f in message.fields:
        if f.name in ("from", "sender"):
            mailboxes = f.mailboxes()
            if len(mailboxes) == 1:
                local, _, domain = mailboxes[0][1].rpartition("@")
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
        others = False
        for number, copy in enumerate(copies, start=1):
            others |= self._check_copy(number, copy)
        return self._check_body(copies, scan=others)

    def _addresses(self, raw: bytes) -> frozenset[str]:
        found = self._cache.get(raw)
        if found is None:
            found = frozenset(addresses_in(_field_text(raw)))
            self._cache[raw] = found
        return found

    def _check_copy(self, number: int, copy: Copy) -> bool:
        """Raise ``LeakDetected`` for a copy that shows anyone else; True if anyone else exists.

        When every watched address is one of the copy's own (a message to one recipient
        whose To: names just that one), no field can name another: the search is skipped.
        """
        own = address_key(copy.recipient)
        # Every way the scanner reads the copy's own address ("o'brien@x" also reads as
        # "brien@x"): none of them is "another recipient" in this copy.
        own_forms = addresses_in(copy.recipient.text) | {own}
        fields = self._reparse(number, copy.headers)
        to_fields = [f for f in fields if f.name == "to"]
        named = self._addresses(to_fields[0].raw) if len(to_fields) == 1 else frozenset()
        if own not in named or named - own_forms:
            raise LeakDetected(f"copy {number}: To: is not exactly the copy's recipient")
        others = bool(self._watched - own_forms)
        for f in fields:
            if f.name in self._options.removed_headers:
                raise LeakDetected(f"copy {number}: removed field {f.name} is still present")
            if others and (self._addresses(f.raw) & self._watched) - own_forms:
                raise LeakDetected(f"copy {number}: {f.display_name} names another recipient")
        return others

    def _reparse(self, number: int, headers: bytes) -> tuple[Field, ...]:
        if not headers.endswith(b"\r\n\r\n") or headers.find(b"\r\n\r\n") != len(headers) - 4:
            raise LeakDetected(f"copy {number}: header section is not one block")
        try:
            check_line_endings(headers, normalize=False)
            return parse_fields(headers[:-2], smtputf8=self._smtputf8)
        except (BadData, HeaderDefect) as exc:
            raise LeakDetected(f"copy {number}: header section unreadable ({exc.reason})") from exc

    def _check_body(self, copies: Sequence[Copy], *, scan: bool) -> tuple[str, ...]:
        """The body is shared, so one reading serves every copy (SPEC 3, body checks).

        ``scan`` False: no copy has anyone else to hide, so the body is not read (its
        MIME structure still is, for the nesting limit).
        """
        mode = self._options.body_check
        found = self._body_addresses(scan=scan and mode is not BodyCheck.OFF) & self._watched
        if not found:
            return ()
        exposed = sum(
            1 for c in copies if found - addresses_in(c.recipient.text) - {address_key(c.recipient)}
        )
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
            read=scan,
        )
        for kind, content in pieces:
            text = content.decode("utf-8", "surrogateescape")
            if kind is Piece.HEADERS:
                text = text.replace("\r\n ", " ").replace("\r\n\t", " ")
            # Comments belong to header fields (RFC 5322 3.2.2); body text is read without
            # that view, which would cost a pass over every "(" of a large HTML part.
            found |= addresses_in(text, comments=kind is Piece.HEADERS)
            if kind is Piece.TEXT and _ENTITY_HINT.search(text):
                found |= addresses_in(html.unescape(text), comments=False)
        return found
