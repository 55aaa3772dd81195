"""One SMTP transaction, as data: what to send, how it goes out, and what the replies say.

Pure: no I/O, no clock, no aiosmtplib. The wire (``relay.upstream.wire``) writes
what is decided here and feeds what it reads to ``ReplyParser``, the one reply
parser of a transaction; ``SmtpUpstream`` runs the two together.

Rule 1: the body is scanned (and stuffed, when a line starts with a dot) once
per message (``prepare_body``); a bare CR, LF or NUL is never sent (SPEC 4).
Rule 2: MAIL, RCPT and DATA are the same bytes whether they go out one by one
or, with an upstream that offers PIPELINING (RFC 2920), in one write
(``Commands.writes``); either way their replies are read in order and the
first refusal decides (``refusal``).
Rule 3: a reply is what RFC 5321 4.2 allows and nothing more: lines of three
digits, "-" or " ", and text; at most ``MAX_REPLY_LINES`` lines and
``MAX_REPLY_OCTETS`` buffered.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from relay.core.model import Copy, Outcome, Stage, Status
from relay.core.policy import split_enhanced

_LINE_DOT = re.compile(rb"(?m)^\.")  # RFC 5321 4.5.2: transparency
# What aiosmtplib refuses in a command argument (CR, LF and NUL allow injection).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
MAX_REPLY_OCTETS = 32 * 1024  # a reply line, or what is buffered of one (aiosmtplib: 8,192)
MAX_REPLY_LINES = 100  # lines of one multi-line reply
# The replies that let a transaction go on, by the command they answer.
EXPECTED = {Stage.MAIL: (250,), Stage.RCPT: (250, 251), Stage.DATA: (354,)}
DATA = b"DATA\r\n"
EMPTY_DATA = b".\r\n"  # closes a DATA opened with nobody to deliver to


class Reply(NamedTuple):
    code: int
    message: str  # the lines' texts, joined by "\n"


@dataclass(frozen=True, slots=True)
class Body:
    """A message body made ready to send: stuffed if needed, and what it needs upstream."""

    payload: bytes | memoryview  # the shared body itself unless a line starts with "."
    tail: bytes  # the end-of-data marker, after a CRLF when the body lacks one
    eight_bit: bool


def prepare_body(body: memoryview) -> Body | None:
    """``None`` when the body holds a bare CR, LF or NUL (never sent: SPEC 4).

    Byte counts and ``find`` run in C at memory speed; the equivalent regular
    expressions (lookarounds, ``^`` in multiline mode) took 28 ms per megabyte.
    """
    data = bytes(body)  # one copy per message: bytes has the fast methods memoryview lacks
    crlf = data.count(b"\r\n")
    if b"\x00" in data or data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        return None
    stuffed = data.startswith(b".") or b"\n." in data
    payload: bytes | memoryview = _LINE_DOT.sub(b"..", data) if stuffed else body
    tail = b".\r\n" if not data or data.endswith(b"\r\n") else b"\r\n.\r\n"
    return Body(payload, tail, not data.isascii())


def stuffed_headers(headers: bytes) -> bytes:
    """The copy's header section, dot-stuffed (RFC 5321 4.5.2)."""
    return _LINE_DOT.sub(b"..", headers)


@dataclass(frozen=True, slots=True)
class Commands:
    """MAIL and RCPT of one copy (each ending in CRLF), and whether to pipeline them."""

    mail: bytes
    rcpt: bytes
    pipelined: bool

    @property
    def writes(self) -> tuple[tuple[tuple[Stage, ...], bytes], ...]:
        """Each write, with the stages whose replies it asks for (in order)."""
        if self.pipelined:  # RFC 2920: MAIL, RCPT and DATA in one write
            return (((Stage.MAIL, Stage.RCPT, Stage.DATA), self.mail + self.rcpt + DATA),)
        return (((Stage.MAIL,), self.mail), ((Stage.RCPT,), self.rcpt), ((Stage.DATA,), DATA))


def commands(
    offered: Collection[str], mail_from: str, copy: Copy, body: Body, *, smtputf8: bool
) -> Commands | Outcome:
    """The commands for ``copy`` to an upstream offering ``offered`` (lower case), or the
    permanent outcome when it lacks an extension the copy needs.

    Raises ``ValueError`` for an address holding a control character, as aiosmtplib's
    ``execute_command`` did (the addresses were checked long before; never sent).
    """
    rcpt = copy.recipient.text
    non_ascii = not (mail_from.isascii() and rcpt.isascii() and copy.headers.isascii())
    if non_ascii and "smtputf8" not in offered:
        text = "the upstream does not offer SMTPUTF8, which this copy needs"
        return Outcome(Status.PERMANENT, Stage.MAIL, 553, "5.6.7", text)  # RFC 6531 3.7.4.1
    utf8 = (smtputf8 or non_ascii) and "smtputf8" in offered
    eight_bit = body.eight_bit or not copy.headers.isascii()
    if eight_bit and "8bitmime" not in offered and not utf8:
        text = "the upstream does not offer 8BITMIME, which this copy needs"
        return Outcome(Status.PERMANENT, Stage.MAIL, 554, "5.6.3", text)  # RFC 6152 3
    options = [f"SIZE={copy.size}".encode()] if "size" in offered else []
    options += [b"BODY=8BITMIME"] if eight_bit and "8bitmime" in offered else []
    options += [b"SMTPUTF8"] if utf8 else []
    encoding = "utf-8" if utf8 else "ascii"
    sender = mail_from.encode(encoding)
    to = rcpt.encode(encoding)
    if _CONTROL.search(sender) or _CONTROL.search(to):
        raise ValueError("Command arg contains a prohibited control character")
    mail = b" ".join([b"MAIL FROM:<" + sender + b">", *options])
    return Commands(mail + b"\r\n", b"RCPT TO:<" + to + b">\r\n", "pipelining" in offered)


def refusal(replies: Sequence[Reply]) -> tuple[Stage, Reply] | None:
    """The first reply (to MAIL, RCPT, DATA, in order) that stops the transaction, if any."""
    for stage, reply in zip(EXPECTED, replies, strict=False):
        if reply.code not in EXPECTED[stage]:
            return stage, reply
    return None


def data_opened(replies: Sequence[Reply]) -> bool:
    """Whether DATA was answered 354 (pipelined, even after a refused MAIL or RCPT)."""
    return len(replies) == len(EXPECTED) and replies[-1].code == 354


def delivered(reply: Reply) -> Outcome:
    """The outcome of a 250 after the final dot."""
    enhanced, text = split_enhanced(reply.code, reply.message)
    return Outcome(Status.DELIVERED, Stage.DOT, reply.code, enhanced, text)


class ReplyParser:
    """Replies out of a byte stream, in order (RFC 5321 4.2), however the reads split them."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []

    def __repr__(self) -> str:
        return f"<ReplyParser buffered={len(self._buffer)} lines={len(self._lines)}>"

    def feed(self, data: bytes) -> tuple[list[Reply], str | None]:
        """The replies ``data`` completes, and what is wrong with the stream (or None).

        After a problem (``"malformed reply"``, ``"reply too long"``) the stream is
        not to be trusted: the replies completed before it are still returned.
        """
        self._buffer += data
        replies: list[Reply] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if not line[:3].isdigit() or line[3:4] not in (b"-", b" ", b"\r", b"\n"):
                return replies, "malformed reply"
            self._lines.append(line)
            if line[3:4] != b"-":
                text = b"\n".join(part[4:].strip(b" \t\r\n") for part in self._lines)
                replies.append(Reply(int(line[:3]), text.decode("utf-8", "replace")))
                self._lines = []
        if len(self._buffer) > MAX_REPLY_OCTETS or len(self._lines) > MAX_REPLY_LINES:
            return replies, "reply too long"
        return replies, None
