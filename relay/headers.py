"""Strict parsing of message data into header fields and a shared body.

Rule 1: the data is checked on its bytes before anything reads it as lines:
a bare CR, a bare LF or a NUL anywhere rejects it (``550 5.5.2``), unless the
``normalize`` option turns bare LF into CRLF and a stray CR into a space
first (Postfix's ``cleanup_replace_stray_cr_lf``); NUL is refused always.
Rule 2: a header section the grammar of RFC 5322 2.2 and 3.6 does not allow
is refused (``554 5.6.0``); nothing is guessed or repaired.
Rule 3: each field keeps its exact bytes (name, value, folding, CRLFs); the
body is never copied, only viewed.

Not here: what the relay does with the fields (``split``), or address
searches (``guard``). Pure: bytes in, values or ``Rejected`` out.
"""

from __future__ import annotations

import email.errors
import email.policy
import re
from dataclasses import dataclass

from relay.errors import BadData, HeaderDefect

MAX_LINE_OCTETS = 998  # RFC 5322 2.1.1, RFC 5321 4.5.3.1.6 (without the CRLF)
CRLF = b"\r\n"

_STRAY_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"(?<!\r)\n")
# RFC 5322 3.6.8: ftext is printable US-ASCII except the colon.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


# One mailbox in its plainest forms: ``Name <addr>``, ``"Name" <addr>``, or a bare
# dot-atom addr-spec. No comments, groups, encoded words (``=``) or escapes: for these, the
# email package's parser (the main cost of a small message) would find the same pair.
_ATOM = r"[A-Za-z0-9_!#$%&'*+/=?^`{|}~-]+"
_ADDR = rf"{_ATOM}(?:\.{_ATOM})*@[\w-]+(?:\.[\w-]+)*"
_PLAIN_MAILBOX = re.compile(
    r'(?:"(?P<quoted>[^"\\=]*)"|(?P<atoms>[^\W_](?:[\w .\'-]*[\w.])?)?)\s*'
    rf"<(?P<addr>{_ADDR})>|(?P<bare>{_ADDR})"
)


def plain_mailbox(text: str) -> tuple[str, str] | None:
    """(display name, addr-spec) when ``text`` is one mailbox in a plain form, else None."""
    plain = _PLAIN_MAILBOX.fullmatch(text.strip())
    if plain is None:
        return None
    if plain["bare"] is not None:
        return "", plain["bare"]
    name = plain["quoted"] if plain["quoted"] is not None else plain["atoms"] or ""
    return " ".join(name.split()), plain["addr"]


@dataclass(frozen=True, slots=True)
class Field:
    """One header field: ``raw`` is its exact bytes, folding and final CRLF included."""

    name: str  # lower case, for comparison
    raw: bytes

    @property
    def display_name(self) -> str:
        """The field name as it was written (``Reply-To``), for reasons and reports."""
        return self.raw[: self.raw.index(b":")].decode("ascii", "replace")

    @property
    def value(self) -> bytes:
        """The bytes after the colon, unfolded, without the final CRLF."""
        colon = self.raw.index(b":")
        return self.raw[colon + 1 :].rstrip(b"\r\n").replace(b"\r\n", b"")

    def text(self) -> str:
        """The unfolded value as text (UTF-8; undecodable bytes kept as escapes)."""
        return self.value.decode("utf-8", "surrogateescape")

    def mailboxes(self, *, utf8: bool = False) -> list[tuple[str, str]]:
        """(display name, addr-spec) pairs of an address-list field, RFC 2047 decoded.

        Empty when the list does not parse cleanly: a caller that would trust
        a name or an address from a malformed list gets nothing to trust.
        ``utf8``: a UTF-8 local part (RFC 6532, SMTPUTF8) is not a defect.
        """
        text = self.text()
        plain = plain_mailbox(text)
        if plain is not None:
            return [plain]
        try:
            header = email.policy.default.header_factory(self.name, text)
            found = [(str(m.display_name), str(m.addr_spec)) for m in header.addresses]
        except (
            email.errors.HeaderParseError,
            ValueError,
            IndexError,
            TypeError,
            AttributeError,
            RecursionError,  # deeply nested comments
        ):
            return []
        allowed: tuple[type[email.errors.MessageDefect], ...] = (email.errors.ObsoleteHeaderDefect,)
        if utf8:
            allowed += (email.errors.NonASCIILocalPartDefect,)
        if any(not isinstance(d, allowed) for d in header.defects):
            return []
        return found


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """Message data split into fields and a body view that no copy duplicates."""

    data: bytes  # the whole message, after normalisation if that was asked for
    fields: tuple[Field, ...]
    body_offset: int  # index in ``data`` where the body starts (after the blank line)

    @property
    def body(self) -> memoryview:
        return memoryview(self.data)[self.body_offset :]

    def named(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.name == name]


def check_line_endings(data: bytes, *, normalize: bool) -> bytes:
    """Return ``data`` with CRLF-only line endings, or raise ``BadData``.

    With ``normalize``, a bare LF becomes CRLF and a stray CR a space; the
    three counts below are one C-speed pass each, so clean data costs no copy.
    """
    if b"\x00" in data:
        raise BadData("NUL in message data")
    crlf = data.count(CRLF)
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data
    if not normalize:
        raise BadData("bare CR or LF in message data")
    data = _STRAY_CR.sub(b" ", data)
    return _BARE_LF.sub(CRLF, data)


def parse_message(
    data: bytes, *, smtputf8: bool, normalize: bool = False, max_header_octets: int
) -> ParsedMessage:
    """Check and split ``data`` (DATA content, dot-unstuffed) into fields and body.

    Raises ``BadData`` (550 5.5.2) or ``HeaderDefect`` (554 5.6.0).
    """
    data = check_line_endings(data, normalize=normalize)
    if data.startswith(CRLF):
        return ParsedMessage(data, (), 2)
    end = data.find(b"\r\n\r\n")
    if end < 0:
        # No blank line: the data is all header section and the body is empty.
        if not data.endswith(CRLF):
            data += CRLF
        section = data
        body_offset = len(data)
    else:
        section = data[: end + 2]
        body_offset = end + 4
    if len(section) > max_header_octets:
        raise HeaderDefect(f"header section over {max_header_octets} octets")
    return ParsedMessage(data, parse_fields(section, smtputf8=smtputf8), body_offset)


def parse_fields(section: bytes, *, smtputf8: bool) -> tuple[Field, ...]:
    """Split a CRLF-terminated header section into fields, refusing any defect."""
    if not section.isascii():
        if not smtputf8:
            raise HeaderDefect("8-bit header without SMTPUTF8")
        try:
            section.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HeaderDefect("header is not valid UTF-8") from exc
    lines = section.split(CRLF)
    lines.pop()  # the section ends with CRLF: the last item is empty
    fields: list[Field] = []
    name = ""
    start = 0  # byte offset of the current field in ``section``
    offset = 0
    for number, line in enumerate(lines, start=1):
        if len(line) > MAX_LINE_OCTETS:
            raise HeaderDefect(f"header line {number} over {MAX_LINE_OCTETS} octets")
        if line[:1] in (b" ", b"\t"):
            if not fields and not name:
                raise HeaderDefect("header section starts with a continuation line")
            if not line.strip(b" \t"):
                raise HeaderDefect(f"header line {number} is whitespace only")
        else:
            if name:
                fields.append(Field(name, section[start:offset]))
            name = _field_name(line, number)
            start = offset
        offset += len(line) + 2
    if name:
        fields.append(Field(name, section[start:offset]))
    return tuple(fields)


def _field_name(line: bytes, number: int) -> str:
    colon = line.find(b":")
    if colon < 0:
        raise HeaderDefect(f"header line {number} has no colon")
    name = line[:colon]
    if not name:
        raise HeaderDefect(f"header line {number} has an empty field name")
    if name[-1:] in (b" ", b"\t"):
        raise HeaderDefect(f"header line {number} has whitespace before the colon")
    if not _FIELD_NAME.fullmatch(name):
        raise HeaderDefect(f"header line {number} has a forbidden character in its name")
    return name.decode("ascii").lower()
