"""A MIME walk over the message body that yields what the leak guard reads.

Rule 1: the body is never copied whole; entities are offsets into the
message data, and only text parts (decoded from base64 or quoted-printable)
and header sections come out: every body part's own, those of embedded
``message/rfc822`` and ``message/global`` messages (an encoded one is
decoded into a buffer of its own and walked like the rest, RFC 6532 3.5),
and ``text/rfc822-headers`` parts (RFC 6522 4), each named by its place.
Rule 2: nesting past the limit (Postfix's ``mime_nesting_limit``) is refused
with ``554 5.6.0``: a structure that deep exists only to hide things.
Rule 3: the walk is a loop with an explicit stack, never recursion, so no
input can exhaust the interpreter's stack.

Not here: what counts as an address (``guard``). Pure: no I/O.
"""

from __future__ import annotations

import binascii
import dataclasses
import email.message
import email.parser
import email.policy
import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass

from relay.core.errors import HeaderDefect


class Piece(enum.Enum):
    TEXT = "text"  # decoded content of a text part
    HEADERS = "headers"  # the header section of an embedded message


# Parts whose content is a header section of another message (RFC 6522 4).
_HEADER_PARTS = frozenset({"text/rfc822-headers"})
_BARE_LF = re.compile(rb"(?<!\r)\n")
_FIELD_BREAK = re.compile(rb"\r?\n(?![ \t])")  # a line break that ends a field
_STRUCTURE = frozenset({b"content-type", b"content-transfer-encoding"})


@dataclass(frozen=True, slots=True)
class _Entity:
    data: bytes  # the message data, or the decoded content of an encoded message part
    start: int
    end: int
    content_type: str
    boundary: str | None
    encoding: str
    depth: int
    header_start: int = 0  # this entity's own header section: data[header_start:start]
    has_headers: bool = False
    place: str = ""  # for an embedded message: the place of the part that holds it


def walk(
    data: bytes,
    body_offset: int,
    content_type: str | None,
    encoding: str | None,
    *,
    limit: int,
    read: bool = True,
    headers: bool | None = None,
) -> Iterator[tuple[Piece, bytes, str]]:
    """Yield each text part and each header section inside the body at ``body_offset``.

    Header sections are those of every body part (``Content-Disposition:
    attachment; filename=...`` is shown to the recipient too), of embedded
    messages, and the content of ``text/rfc822-headers`` parts; each piece
    comes with its place, for reasons: ``part 3 (message/rfc822)``.
    ``content_type`` and ``encoding`` are the top-level header values (``None``
    when absent: RFC 2045 5.2 makes that ``text/plain``). Raises
    ``HeaderDefect`` when containers nest deeper than ``limit``. ``read``
    False yields no text part, ``headers`` False no header section (``None``:
    as ``read``); with neither, only the structure is checked.
    """
    headers = read if headers is None else headers
    top = _headers(content_type, encoding)
    stack = [_entity(data, body_offset, len(data), top, 0)]
    number = 0
    while stack:
        entity = stack.pop()
        buffer = entity.data
        place = entity.place or f"part {number} ({entity.content_type})"
        number += 1
        if headers and entity.has_headers and entity.start > entity.header_start:
            yield Piece.HEADERS, buffer[entity.header_start : entity.start], place
        maintype = entity.content_type.partition("/")[0]
        if maintype in ("multipart", "message") and entity.depth + 1 > limit:
            raise HeaderDefect(f"MIME nesting deeper than {limit}")
        if maintype == "multipart" and entity.boundary:
            parts = list(
                _parts(buffer, entity.start, entity.end, entity.boundary.encode("ascii", "replace"))
            )
            for start, end in reversed(parts):
                stack.append(_part(buffer, start, end, entity.depth + 1))
        elif maintype == "message":
            held = _embedded(entity, place)
            if held is not None:
                stack.append(held)
            elif headers:  # all header section, no body
                yield Piece.HEADERS, buffer[entity.start : entity.end], place
        elif entity.content_type in _HEADER_PARTS:
            if headers:
                content = _crlf(_decode(buffer[entity.start : entity.end], entity.encoding))
                yield Piece.HEADERS, content, place
        elif read and maintype in ("text", "multipart"):  # multipart, no boundary: as text
            yield Piece.TEXT, _decode(buffer[entity.start : entity.end], entity.encoding), place


def _embedded(entity: _Entity, place: str) -> _Entity | None:
    """An embedded message as an entity of its own; ``None`` when it is all header section.

    Its header section is yielded as a part's, when it is popped. An encoded
    message/global (RFC 6532 3.5) is decoded first, with CRLF line ends, into a
    buffer of its own, and walked like the rest.
    """
    buffer = entity.data
    if entity.encoding in ("base64", "quoted-printable"):
        inner = _crlf(_decode(buffer[entity.start : entity.end], entity.encoding))
        held = _part(inner, 0, len(inner), entity.depth + 1)
    elif buffer.find(b"\r\n\r\n", entity.start, entity.end) >= 0:
        held = _part(buffer, entity.start, entity.end, entity.depth + 1)
    else:
        return None
    return dataclasses.replace(held, place=place)


def _crlf(content: bytes) -> bytes:
    """Decoded content with CRLF line ends, as a header section is read (RFC 5322 2.1)."""
    return _BARE_LF.sub(b"\r\n", content) if b"\n" in content else content


def _headers(content_type: str | None, encoding: str | None) -> email.message.Message:
    message = email.message.Message()
    if content_type is not None:
        message["Content-Type"] = content_type
    if encoding is not None:
        message["Content-Transfer-Encoding"] = encoding
    return message


def _entity(
    data: bytes,
    start: int,
    end: int,
    headers: email.message.Message,
    depth: int,
    *,
    header_start: int | None = None,
) -> _Entity:
    boundary = headers.get_param("boundary")
    return _Entity(
        data,
        start,
        end,
        headers.get_content_type(),
        boundary if isinstance(boundary, str) else None,
        str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower(),
        depth,
        header_start if header_start is not None else start,
        header_start is not None,
    )


def _part(data: bytes, start: int, end: int, depth: int) -> _Entity:
    """An entity whose own header section starts at ``start``."""
    if data.startswith(b"\r\n", start, end):
        return _entity(data, start + 2, end, email.message.Message(), depth)
    split = data.find(b"\r\n\r\n", start, end)
    if split < 0:
        split = end
    headers = _structure_fields(data[start:split])
    return _entity(data, min(split + 4, end), end, headers, depth, header_start=start)


def _structure_fields(section: bytes) -> email.message.Message:
    """The two fields of a part's header section that give its structure (RFC 2045 5, 6).

    Only these are parsed (unfolded, the first of each kept, as the email package's
    ``get`` would): a part's other fields are read by the leak guard, not here.
    """
    headers = email.message.Message()
    for raw in _FIELD_BREAK.split(section):
        name, colon, value = raw.partition(b":")
        lowered = name.strip().lower()
        if colon and lowered in _STRUCTURE and lowered.decode() not in headers:
            text = value.replace(b"\r\n", b"").replace(b"\n", b"").strip()
            headers[lowered.decode()] = text.decode("ascii", "surrogateescape")
    return headers


def _parts(data: bytes, start: int, end: int, boundary: bytes) -> Iterator[tuple[int, int]]:
    """Offsets of each body part between delimiter lines (RFC 2046 5.1.1)."""
    delimiter = b"--" + boundary
    part_start = -1
    at = start if data.startswith(delimiter, start, end) else _next(data, delimiter, start, end)
    while at >= 0:
        after = at + len(delimiter)
        line_end = data.find(b"\r\n", after, end)
        line_end = end if line_end < 0 else line_end
        rest = data[after:line_end]
        closing = rest.startswith(b"--")
        if rest.strip(b" \t") and not closing:
            # Only a prefix of the boundary: not a delimiter line.
            at = _next(data, delimiter, after, end)
            continue
        if part_start >= 0:
            yield part_start, max(part_start, at - 2)
        if closing:
            return
        part_start = min(line_end + 2, end)
        at = _next(data, delimiter, part_start - 2, end)
    if part_start >= 0:
        yield part_start, end  # no closing delimiter: the last part runs to the end


def _next(data: bytes, delimiter: bytes, start: int, end: int) -> int:
    found = data.find(b"\r\n" + delimiter, start, end)
    return found + 2 if found >= 0 else -1


def _decode(content: bytes, encoding: str) -> bytes:
    try:
        if encoding == "base64":
            return binascii.a2b_base64(content)
        if encoding == "quoted-printable":
            return binascii.a2b_qp(content)
    except (binascii.Error, ValueError):
        return content
    return content
