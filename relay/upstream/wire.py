"""The wire of a transaction: its bytes onto the transport, its replies off it, in order.

aiosmtplib's protocol reads one reply per command it wrote and drops what
arrives before that reply was taken, so it cannot pipeline (RFC 2920). For one
transaction, pipelined or not, a ``Reader`` takes its place on the transport
(``borrow``: ``set_protocol``) and hands the transport back after the final
reply (``give_back``). Connection, TLS, EHLO, AUTH, RSET and QUIT stay
aiosmtplib's. Replies are parsed by ``transaction.ReplyParser``, the only reply
parser a transaction has.
"""

from __future__ import annotations

import asyncio
import collections
from typing import cast

from aiosmtplib import SMTP, SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.protocol import SMTPProtocol

from relay.upstream.transaction import Body, Reply, ReplyParser, stuffed_headers

WRITE_SLICE = 256 * 1024  # body bytes handed to the transport at a time


# The aiosmtplib versions ``Reader.borrow``'s swap was read against (aiosmtplib/smtp.py
# and protocol.py); tests/test_upstream.py fails on any other one until it is read again.
AIOSMTPLIB_CHECKED = frozenset({"5.1.3"})


class Reader(asyncio.Protocol):
    """Replies read straight off the transport, in order, for one transaction."""

    def __init__(self, transport: asyncio.WriteTransport, protocol: SMTPProtocol) -> None:
        self.transport = transport
        self._protocol = protocol  # aiosmtplib's, put back by ``give_back``
        self._parser = ReplyParser()
        self._replies: collections.deque[Reply] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self.error: BaseException | None = None  # the connection is gone, or spoke garbage

    def __repr__(self) -> str:
        return f"<Reader replies={len(self._replies)} error={self.error!r}>"

    @classmethod
    def borrow(cls, smtp: SMTP) -> Reader:
        """Take ``smtp``'s transport for one transaction; raises when the connection is gone.

        Checked against aiosmtplib 5.1.3 (pyproject pins <5.2), whose public
        ``SMTP.transport`` and ``SMTP.protocol`` are all this touches: between
        commands its ``SMTPProtocol`` waits for nothing (it drops what arrives then),
        so it may sit off the transport for a transaction and be put back after.
        """
        transport, protocol = smtp.transport, smtp.protocol
        if transport is None or protocol is None or transport.is_closing():
            raise SMTPServerDisconnected("connection lost")
        reader = cls(cast("asyncio.WriteTransport", transport), protocol)  # uvloop's: duck-typed
        transport.set_protocol(reader)
        return reader

    def give_back(self) -> None:
        """aiosmtplib's own protocol on the transport again (RSET, QUIT, reuse)."""
        if not self.transport.is_closing():
            self.transport.set_protocol(self._protocol)

    def data_received(self, data: bytes) -> None:
        replies, problem = self._parser.feed(data)
        self._replies.extend(replies)
        if problem is not None:
            self._fail(SMTPResponseException(-1, problem))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("the upstream closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or SMTPServerDisconnected("connection lost"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.transport.is_closing():  # closed here, its connection_lost still to come
            raise SMTPServerDisconnected("connection lost")
        self.transport.write(data)

    async def drain(self) -> None:
        while self._paused and self.error is None:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self.error is not None:
            raise self.error

    async def reply(self, timeout: float) -> Reply:
        async with asyncio.timeout(timeout):
            while not self._replies:
                if self.error is not None:
                    raise self.error
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
        return self._replies.popleft()

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def send_data(reader: Reader, headers: bytes, body: Body, timeout: float) -> None:
    """The copy's header section and the shared body, dot-stuffed, and the final dot."""
    headers = stuffed_headers(headers)
    if len(body.payload) <= WRITE_SLICE:  # one write, one system call
        reader.write(b"".join((headers, body.payload, body.tail)))
        return
    reader.write(headers)
    async with asyncio.timeout(timeout):
        await _stream(reader, body.payload)
    reader.write(body.tail)


async def _stream(reader: Reader, payload: bytes | memoryview) -> None:
    """Write a body in slices, each once the transport has room for it.

    One ``write`` of a 10 MB body would leave most of it copied into the
    transport's buffer, once per connection; slices of the shared body keep
    that to about one slice per connection (SPEC 8: memory flat per copy).
    """
    view = memoryview(payload)
    for start in range(0, len(view), WRITE_SLICE):
        reader.write(view[start : start + WRITE_SLICE])  # type: ignore[arg-type]  # a buffer
        await reader.drain()
