"""The leak guard: the last, independent check on each copy's final bytes.

Rule 1: a copy never contains another recipient's address. "Another
recipient" is any envelope recipient or any address in the original's
recipient-bearing fields (``To``, and every field on the removal list),
other than the copy's own and the sender's (MAIL FROM, every mailbox of the
one ``From:`` and the one mailbox of the one ``Sender:``): a copy may show
who sent it.
Rule 2: the guard trusts nothing the splitter did. It re-parses each copy's
header section with the 998-octet line limit, requires exactly one ``To:``
naming only the copy's recipient and no removed field, and searches every
field in every spelling ``relay.core.spellings`` reads (folds anywhere, RFC 2047
and 2231, URL lists, percent and entity forms, Unicode normal forms without
invisible characters, every IDNA form of a domain, VERP), case-insensitively.
Rule 3: a copy's own address is matched as a whole address: a reading of
another recipient's address that lies inside the copy's own (``brien@x``
inside ``o'brien@x``) or inside the sender's is no disclosure; the same
reading anywhere else is.
Rule 4: it fails closed: any hit, and any copy it cannot read, rejects the
whole message with ``550 5.7.1``; nothing of it is delivered.
Rule 5: the shared body is read once per message: the header sections in it
(every body part's, like an attachment's ``filename``, and those of embedded
messages: ``message/rfc822``, ``message/global``, ``text/rfc822-headers``)
with the ``embedded_check`` action (default reject), text parts with the
``body_check`` action (default warn).
Every field's spellings are computed once per message, not once per copy.

Pure: no I/O; reasons name header fields and MIME parts, never addresses.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence

from relay.core.addresses import Address
from relay.core.errors import BadData, HeaderDefect, LeakDetected
from relay.core.headers import Field, ParsedMessage, check_line_endings, parse_fields
from relay.core.mime import Piece, walk
from relay.core.model import BodyCheck, Copy, Envelope, IsolationOptions
from relay.core.spellings import Spellings, address_key, key, primaries, spellings

# What every spelling of an address holds in some form: "@", "%40", "&#64;", "=" (VERP,
# RFC 2047, RFC 2231) or a non-ASCII character (a fullwidth at sign, an encoded byte).
_ADDRESS_MARK = re.compile(rb"[@%&=\x80-\xff]")
# Entities that can spell an "@" or a dot in HTML text: only then is an unescaped view made.
_ENTITY_HINT = re.compile(r"&(?:#|commat;|period;)", re.IGNORECASE)
# An address with no URL break, "=" or "%" in it: its only reading is the address itself.
_PLAIN = re.compile(r"[A-Za-z0-9._+-]+@[A-Za-z0-9.-]+")
# What stands for the copy's own "<address>" in a field read once for every copy.
_OWN_BRACKETED = b"<\x00>"
_SECTION = re.compile(rb"\*(?:\d+\*?)?\s*=")  # an RFC 2231 parameter section
# Where one field of an embedded header section ends: a line break not followed by a blank.
_FIELD_END = re.compile(rb"\r?\n(?![ \t])")

# A field's readings of watched addresses: each key, and the whole addresses it was read in.
Hits = dict[str, frozenset[str]]


def field_spellings(raw: bytes) -> Spellings:
    """Every spelling in one field's value, folds and all (``spellings`` field views)."""
    value = raw[raw.find(b":") + 1 :].rstrip(b"\r\n")
    if not _ADDRESS_MARK.search(value):
        return {}  # no "@" in any form: no view of it can spell an address
    return spellings(value.decode("utf-8", "surrogateescape"), field=True)


def sender_keys(message: ParsedMessage, envelope: Envelope, removed: frozenset[str]) -> set[str]:
    """MAIL FROM, and every mailbox of the one From: and the one Sender: (RFC 5322 3.6).

    Only a field every copy keeps, and only when it occurs once, names the
    sender: a repeated From: or Sender:, or a Sender: of several mailboxes, is
    no exemption (``split`` refuses those messages too; the guard trusts nothing
    it did). A From: with several mailboxes comes with a Sender: (``split``).
    """
    keys = set()
    if envelope.sender is not None:
        keys.add(address_key(envelope.sender))
    for name in ("from", "sender"):
        if name in removed:
            continue
        fields = message.named(name)
        mailboxes = fields[0].mailboxes(utf8=envelope.smtputf8) if len(fields) == 1 else []
        if name == "sender" and len(mailboxes) != 1:
            continue
        for _, addr_spec in mailboxes:
            local, _, domain = addr_spec.rpartition("@")
            keys.add(key(local, domain))
    keys.discard("")
    return keys


def leaks(hits: Hits, own: str, exempt: frozenset[str]) -> bool:
    """Whether ``hits`` read another recipient anywhere but inside ``exempt`` addresses."""
    return any(form != own and not parents <= exempt for form, parents in hits.items())


class LeakGuard:
    """Checks the copies of one message against everyone else it was meant for."""

    def __init__(
        self, message: ParsedMessage, envelope: Envelope, options: IsolationOptions
    ) -> None:
        self._message = message
        self._options = options
        self._smtputf8 = envelope.smtputf8
        self._hits: dict[bytes, Hits] = {}
        visible: set[str] = set()
        for f in message.fields:
            if f.name == "to" or f.name in options.removed_headers:
                visible |= set(field_spellings(f.raw))
        recipients = {address_key(r) for r in envelope.recipients}
        self._sender_keys = frozenset(sender_keys(message, envelope, options.removed_headers))
        self._watched = frozenset((recipients | visible) - self._sender_keys)

    def check(self, copies: Sequence[Copy]) -> tuple[str, ...]:
        """Raise ``LeakDetected`` if any copy discloses another recipient; return warnings."""
        others = False
        for number, copy in enumerate(copies, start=1):
            others |= self._check_copy(number, copy)
        return self.check_body(copies, scan=others)

    def _own(self, recipient: Address) -> tuple[str, frozenset[str]]:
        """The copy's own key, and the whole addresses its own address reads as (rule 3).

        A whole address the own address also reads as (a VERP form of it) counts
        as its own only if it is nobody else's.
        """
        own = address_key(recipient)
        if _PLAIN.fullmatch(recipient.text):
            return own, frozenset((own,))  # no break, no "=", no "%": it reads as itself only
        readings = {p for p in primaries(spellings(recipient.text)) if p not in self._watched}
        return own, frozenset((*readings, own))

    def _exempt(self, recipient: Address) -> tuple[str, frozenset[str]]:
        """The copy's own key, and the whole addresses whose readings it may show."""
        own, readings = self._own(recipient)
        return own, readings | self._sender_keys

    def _field_hits(self, raw: bytes) -> Hits:
        """The watched readings of one field, kept: each distinct field is read once."""
        found = field_spellings(raw)
        hits = {form: frozenset(found[form]) for form in found.keys() & self._watched}
        self._hits[raw] = hits
        return hits

    def _check_copy(self, number: int, copy: Copy) -> bool:
        """Raise ``LeakDetected`` for a copy that shows anyone else; True if anyone else exists.

        When every watched address is the copy's own (a message to one recipient
        whose To: names just that one), no field can name another: the search is skipped.
        """
        own, readings = self._own(copy.recipient)
        exempt = readings | self._sender_keys
        fields = self._reparse(number, copy.headers)
        to_fields = [f for f in fields if f.name == "to"]
        if len(to_fields) != 1:
            raise LeakDetected(f"copy {number}: To: is not exactly the copy's recipient")
        raw = to_fields[0].raw
        # A bare "To: addr" whose address reads as itself only names exactly that one.
        bare = readings == {own} and raw == b"To: " + copy.recipient.text.encode() + b"\r\n"
        named = {own: {own}} if bare else field_spellings(raw)
        if own not in named or not primaries(named) <= readings:
            raise LeakDetected(f"copy {number}: To: is not exactly the copy's recipient")
        others = len(self._watched) > (own in self._watched)  # anyone but ``own``
        # "<own>" of a plain address reads as that address and nothing else, and its
        # brackets keep it apart from its neighbours in every view: a field that differs
        # between copies only there (the relay's Received: ... for <own>) is read once.
        own_bracketed = b"<" + copy.recipient.text.encode() + b">" if readings == {own} else None
        for f in fields:
            if f.name in self._options.removed_headers:
                raise LeakDetected(f"copy {number}: removed field {f.name} is still present")
            if not others or f.name == "to":
                continue
            raw = f.raw
            # Not in RFC 2231 sections, whose readers join them and may drop their brackets.
            if own_bracketed is not None and own_bracketed in raw and not _SECTION.search(raw):
                raw = raw.replace(own_bracketed, _OWN_BRACKETED)
            hits = self._hits.get(raw)
            if hits is None:
                hits = self._field_hits(raw)
            if hits and leaks(hits, own, exempt):
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

    def check_body(self, copies: Sequence[Copy], *, scan: bool) -> tuple[str, ...]:
        """The body is shared, so one reading serves every copy (rule 5).

        ``scan`` False: no copy has anyone else to hide, so the body is not read (its
        MIME structure still is, for the nesting limit).
        """
        body_mode = self._options.body_check
        embedded_mode = self._options.embedded_check
        text, embedded = self._body_hits(
            text=scan and body_mode is not BodyCheck.OFF,
            headers=scan and embedded_mode is not BodyCheck.OFF,
        )
        warnings = []
        for place, hits in embedded:
            exposed = self._exposed(copies, hits)
            if exposed:
                reason = (
                    f"{place}: a header section in the body (an attachment's, or an embedded "
                    f"message's) names other recipients in {exposed} of {len(copies)} copies"
                )
                if embedded_mode is BodyCheck.REJECT:
                    raise LeakDetected(reason)
                warnings.append(reason)
        exposed = self._exposed(copies, text)
        if exposed:
            reason = f"the body names other recipients in {exposed} of {len(copies)} copies"
            if body_mode is BodyCheck.REJECT:
                raise LeakDetected(reason)
            warnings.append(reason)
        return tuple(warnings)

    def _exposed(self, copies: Sequence[Copy], hits: Hits) -> int:
        """How many copies would see another recipient in ``hits``."""
        if not hits:
            return 0
        return sum(1 for c in copies if leaks(hits, *self._exempt(c.recipient)))

    def _body_hits(self, *, text: bool, headers: bool) -> tuple[Hits, list[tuple[str, Hits]]]:
        """Walk the MIME tree (always: the nesting limit holds even with checks off).

        Returns the watched readings of the text parts, and those of each embedded
        header section with its place.
        """
        top = {f.name: f.text() for f in reversed(self._message.fields)}
        found: Spellings = {}
        embedded: list[tuple[str, Hits]] = []
        pieces = walk(
            self._message.data,
            self._message.body_offset,
            top.get("content-type"),
            top.get("content-transfer-encoding"),
            limit=self._options.mime_nesting_limit,
            read=text,
            headers=headers,
        )
        for kind, content, place in pieces:
            if kind is Piece.HEADERS:
                section: Spellings = {}
                for raw in _FIELD_END.split(content):
                    _merge(section, [field_spellings(raw)] if b":" in raw else [])
                hits = self._watched_in(section)
                if hits:
                    embedded.append((place, hits))
                continue
            decoded = content.decode("utf-8", "surrogateescape")
            # Comments belong to header fields (RFC 5322 3.2.2); body text is read without
            # that view, which would cost a pass over every "(" of a large HTML part.
            views = [spellings(decoded, comments=False)]
            if _ENTITY_HINT.search(decoded):
                views.append(spellings(html.unescape(decoded), comments=False))
            _merge(found, views)
        return self._watched_in(found), embedded

    def _watched_in(self, found: Spellings) -> Hits:
        return {form: frozenset(found[form]) for form in found.keys() & self._watched}


def _merge(into: Spellings, more: Iterable[Spellings]) -> None:
    for found in more:
        for form, parents in found.items():
            into.setdefault(form, set()).update(parents)
