"""A MIME walk over the message body that yields what the leak guard reads.

Rule 1: the body is never copied whole; entities are offsets into the
message data, and only text parts (decoded from base64 or quoted-printable)
and embedded header sections come out: those of ``message/rfc822`` and
``message/global`` parts (decoded first when a ``message/global`` is
base64 or quoted-printable, RFC 6532 3.5) and ``text/rfc822-headers`` parts
(RFC 6522 4), each named by its place in the tree.
Rule 2: nesting past the limit (Postfix's ``mime_nesting_limit``) is refused
with ``554 5.6.0``: a structure that deep exists only to hide things.
Rule 3: the walk is a loop with an explicit stack, never recursion, so no
input can exhaust the interpreter's stack.

Not here: what counts as an address (``guard``). Pure: no I/O.
"""

from __future__ import annotations

import binascii
import email.message
import email.parser
import email.policy
import enum
from collections.abc import Iterator
from dataclasses import dataclass

from relay.errors import HeaderDefect


class Piece(enum.Enum):
    TEXT = "text"  # decoded content of a text part
    HEADERS = "headers"  # the header section of an embedded message


# Parts whose content is a header section of another message (RFC 6522 4).
_HEADER_PARTS = frozenset({"text/rfc822-headers"})


@dataclass(frozen=True, slots=True)
class _Entity:
    start: int
    end: int
    content_type: str
    boundary: str | None
    encoding: str
    depth: int


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
    """Yield each text part and embedded header section of the body at ``body_offset``.

    Each comes with its place, for reasons: ``part 3 (message/rfc822)``.
    ``content_type`` and ``encoding`` are the top-level header values (``None``
    when absent: RFC 2045 5.2 makes that ``text/plain``). Raises
    ``HeaderDefect`` when containers nest deeper than ``limit``. ``read``
    False yields no text part, ``headers`` False no header section (``None``:
    as ``read``); with neither, only the structure is checked.
    """
    headers = read if headers is None else headers
    stack = [_entity(body_offset, len(data), _headers(content_type, encoding), 0)]
    number = 0
    while stack:
        entity = stack.pop()
        place = f"part {number} ({entity.content_type})"
        number += 1
        maintype = entity.content_type.partition("/")[0]
        if maintype in ("multipart", "message") and entity.depth + 1 > limit:
            raise HeaderDefect(f"MIME nesting deeper than {limit}")
        if maintype == "multipart" and entity.boundary:
            parts = list(
                _parts(data, entity.start, entity.end, entity.boundary.encode("ascii", "replace"))
            )
            for start, end in reversed(parts):
                stack.append(_part(data, start, end, entity.depth + 1))
        elif maintype == "message" and entity.encoding not in ("base64", "quoted-printable"):
            split = data.find(b"\r\n\r\n", entity.start, entity.end)
            header_end = entity.end if split < 0 else split + 2
            if headers:
                yield Piece.HEADERS, data[entity.start : header_end], place
            if split >= 0:
                stack.append(_part(data, entity.start, entity.end, entity.depth + 1))
        elif maintype == "message" or entity.content_type in _HEADER_PARTS:
            # An encoded message/global (RFC 6532 3.5) is read decoded, its own structure
            # as text; a text/rfc822-headers part is all header section.
            if not (headers or read):
                continue
            content = _decode(data[entity.start : entity.end], entity.encoding)
            split = content.find(b"\r\n\r\n") if maintype == "message" else -1
            if headers:
                yield Piece.HEADERS, content if split < 0 else content[: split + 2], place
            if read and split >= 0:
                yield Piece.TEXT, content[split + 4 :], place
        elif read and maintype in ("text", "multipart"):  # multipart, no boundary: as text
            yield Piece.TEXT, _decode(data[entity.start : entity.end], entity.encoding), place


def _headers(content_type: str | None, encoding: str | None) -> email.message.Message:
    message = email.message.Message()
    if content_type is not None:
        message["Content-Type"] = content_type
    if encoding is not None:
        message["Content-Transfer-Encoding"] = encoding
    return message


def _entity(start: int, end: int, headers: email.message.Message, depth: int) -> _Entity:
    boundary = headers.get_param("boundary")
    return _Entity(
        start,
        end,
        headers.get_content_type(),
        boundary if isinstance(boundary, str) else None,
        str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower(),
        depth,
    )


def _part(data: bytes, start: int, end: int, depth: int) -> _Entity:
    """An entity whose own header section starts at ``start``."""
    if data.startswith(b"\r\n", start, end):
        return _entity(start + 2, end, email.message.Message(), depth)
    split = data.find(b"\r\n\r\n", start, end)
    if split < 0:
        split = end
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    headers = parser.parsebytes(data[start:split])
    return _entity(min(split + 4, end), end, headers, depth)


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
