"""Strict parsing of message data into header fields and a shared body.

Rule 1: the data is checked on its bytes before anything reads it as lines:
a bare CR, a bare LF or a NUL anywhere rejects it (``550 5.5.2``), unless the
``normalize`` option turns bare LF into CRLF and a stray CR into a space
first (Postfix's ``cleanup_replace_stray_cr_lf``); NUL is refused always.
Rule 2: a header section the grammar of RFC 5322 2.2 and 3.6 does not allow
is refused (``554 5.6.0``); nothing is guessed or repaired.
Rule 3: each field keeps its exact bytes (name, value, folding, CRLFs); the
body is never copied, only viewed.
Rule 4: a line's length is no defect on the way in (a ``To:`` of thousands of
addresses on one line is the mistake the relay exists for, and the split
drops it); on the way out no line is over 998 octets: ``fold`` folds a kept
field at its own whitespace, and refuses one it cannot fold.

Not here: what the relay does with the fields (``split``), or address
searches (``guard``). Pure: bytes in, values or ``Rejected`` out.
"""

from __future__ import annotations

import bisect
import email.errors
import email.policy
import re
from dataclasses import dataclass

from relay.core.errors import BadData, HeaderDefect

MAX_LINE_OCTETS = 998  # RFC 5322 2.1.1, RFC 5321 4.5.3.1.6 (without the CRLF)
FOLD_OCTETS = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
# The email package's address parser is quadratic: 8 KB of hostile list costs ~0.1 s.
# 100 mailboxes of 80 characters fit; a longer From: or Sender: exempts nobody.
MAX_PARSED_CHARS = 8192
CRLF = b"\r\n"

_STRAY_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"(?<!\r)\n")
# RFC 5322 3.6.8: ftext is printable US-ASCII except the colon.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
# A place to fold: the first of a run of blanks with more than blanks after it.
_FOLD_POINT = re.compile(rb"(?<![ \t])[ \t]+(?=[^ \t])")


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

    def mailboxes(
        self, *, utf8: bool = False, limit: int | None = MAX_PARSED_CHARS
    ) -> list[tuple[str, str]]:
        """(display name, addr-spec) pairs of an address-list field, RFC 2047 decoded.

        Empty when the list does not parse cleanly, or is longer than ``limit``
        characters (None: no limit): a caller that would trust a name or an
        address from a malformed list gets nothing to trust, and the email
        package's parser takes time that grows with the square of the length.
        ``utf8``: a UTF-8 local part (RFC 6532, SMTPUTF8) is not a defect.
        """
        text = self.text()
        plain = plain_mailbox(text)
        if plain is not None:
            return [plain]
        if limit is not None and len(text) > limit:
            return []
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
    # Offsets in ``data`` where ``normalize`` replaced a bare LF or a stray CR: an
    # application's DKIM signature over those bytes no longer verifies.
    normalized_at: tuple[int, ...] = ()

    @property
    def body_normalized(self) -> bool:
        """Whether normalisation changed a byte of the body."""
        return bool(self.normalized_at) and self.normalized_at[-1] >= self.body_offset

    def normalized_fields(self) -> frozenset[str]:
        """Names of the fields in which normalisation changed a byte."""
        if not self.normalized_at:
            return frozenset()
        names = set()
        start = 0
        for f in self.fields:
            end = start + len(f.raw)
            if any(start <= at < end for at in self.normalized_at):
                names.add(f.name)
            start = end
        return frozenset(names)

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
    return normalize_line_endings(data, normalize=normalize)[0]


def normalize_line_endings(data: bytes, *, normalize: bool) -> tuple[bytes, tuple[int, ...]]:
    """``check_line_endings``, and the offsets in the result where a byte was replaced."""
    if b"\x00" in data:
        raise BadData("NUL in message data")
    crlf = data.count(CRLF)
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data, ()
    if not normalize:
        raise BadData("bare CR or LF in message data")
    # A stray CR becomes a space in place; each bare LF gains a CR before it, which
    # moves everything after it one byte on: offsets are given in the result.
    strays = [m.start() for m in _STRAY_CR.finditer(data)]
    data = _STRAY_CR.sub(b" ", data)
    lfs = [m.start() for m in _BARE_LF.finditer(data)]
    changed = sorted(
        [at + bisect.bisect_left(lfs, at) for at in strays]
        + [at + shift for shift, at in enumerate(lfs)]
    )
    return _BARE_LF.sub(CRLF, data), tuple(changed)


def parse_message(
    data: bytes, *, smtputf8: bool, normalize: bool = False, max_header_octets: int
) -> ParsedMessage:
    """Check and split ``data`` (DATA content, dot-unstuffed) into fields and body.

    Lines of any length are accepted here (rule 4): the split decides what a long
    line means. Raises ``BadData`` (550 5.5.2) or ``HeaderDefect`` (554 5.6.0).
    """
    data, normalized_at = normalize_line_endings(data, normalize=normalize)
    if data.startswith(CRLF):
        return ParsedMessage(data, (), 2, normalized_at)
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
    fields = parse_fields(section, smtputf8=smtputf8, max_line=None)
    return ParsedMessage(data, fields, body_offset, normalized_at)


def parse_fields(
    section: bytes, *, smtputf8: bool, max_line: int | None = MAX_LINE_OCTETS
) -> tuple[Field, ...]:
    """Split a CRLF-terminated header section into fields, refusing any defect.

    ``max_line`` (None: no limit) refuses a longer line: the leak guard reads a
    copy's final section with the 998-octet limit of RFC 5322 2.1.1.
    """
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
        if max_line is not None and len(line) > max_line:
            raise HeaderDefect(f"header line {number} over {max_line} octets")
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


def fold(f: Field) -> Field:
    """``f`` with no line over 998 octets: long lines folded at their own whitespace.

    Folding inserts a CRLF before a space or tab the field already has (RFC
    5322 2.2.3), so unfolding gives the same value back; lines are cut at 78
    octets where the words allow it, at 998 where they do not. A field with no
    long line is returned as it is, byte for byte. Raises ``HeaderDefect``
    (554 5.6.0, naming the field) when a run of 998 octets has no whitespace.
    """
    if len(f.raw) <= MAX_LINE_OCTETS + 2:
        return f  # no line of it can be longer
    lines = f.raw[:-2].split(CRLF)
    if all(len(line) <= MAX_LINE_OCTETS for line in lines):
        return f
    out: list[bytes] = []
    for number, line in enumerate(lines):
        if len(line) <= MAX_LINE_OCTETS:
            out.append(line)
            continue
        # The first line's field name and colon are no place to fold.
        floor = line.index(b":") + 1 if number == 0 else 0
        out.extend(_fold_line(line, floor, f.display_name))
    return Field(f.name, CRLF.join(out) + CRLF)


def _fold_line(line: bytes, floor: int, name: str) -> list[bytes]:
    """Cut one long line before its whitespace into pieces of 78 octets, 998 at most."""
    # A place to fold starts a run of blanks with a word after it (a continuation of
    # blanks only is no line, RFC 5322 3.2.2), past the field name and its colon.
    breaks = [m.start() for m in _FOLD_POINT.finditer(line, floor) if m.start() > floor]
    pieces: list[bytes] = []
    start = 0
    while len(line) - start > FOLD_OCTETS:
        after = bisect.bisect_right(breaks, start)
        if after == len(breaks):
            break
        within = bisect.bisect_right(breaks, start + FOLD_OCTETS)
        cut = breaks[within - 1] if within > after else breaks[after]
        if cut - start > MAX_LINE_OCTETS:
            break
        pieces.append(line[start:cut])
        start = cut
    if len(line) - start > MAX_LINE_OCTETS:
        raise HeaderDefect(f"{name}: a line over {MAX_LINE_OCTETS} octets has no place to fold")
    pieces.append(line[start:])
    return pieces
