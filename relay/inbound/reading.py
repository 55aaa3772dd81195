"""How the listener reads: command lines that end only at CRLF, and DATA in blocks.

Rule 3 of ``relay.inbound.smtp``: DATA is read in blocks, ends only at CRLF "."
CRLF, and is handed on only when complete; a client that drops or half-closes
mid-DATA leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any

from relay.core.dotstream import DataCollector

log = logging.getLogger("relay.inbound")

READ_BLOCK = 65536  # one socket read; lines of any length fit, in as many blocks as they need
DATA_CLOSED = "connection closed during DATA: nothing was taken"


class CommandReader(asyncio.StreamReader):
    r"""Command lines end only at CRLF, and the end of the stream ends the session.

    aiosmtpd reads commands up to a bare LF, so ``RCPT TO:<x\nRCPT TO:<v@x>``
    would run a second command hidden in the first line; here the bare LF stays
    inside the line, which is then refused as a whole. At end of stream
    aiosmtpd's loop would answer ``IncompleteReadError`` and read again, for
    ever: a cancellation ends the session the way aiosmtpd ends it at EOF.
    """

    auth_line = False  # the line read last (or being read, when too long) is an AUTH command
    _overrun = False  # a line over the limit is being read in pieces

    async def readuntil(self, separator: Any = b"\n") -> bytes:  # typeshed's type is private
        try:
            line = await super().readuntil(b"\r\n" if separator == b"\n" else separator)
        except asyncio.IncompleteReadError as exc:
            raise asyncio.CancelledError from exc
        except asyncio.LimitOverrunError:
            if not self._overrun:
                self.auth_line = _is_auth(bytes(self._buffer[:5]))  # type: ignore[attr-defined]
            self._overrun = True
            raise
        if not self._overrun:
            self.auth_line = _is_auth(line[:5])
        self._overrun = False
        return line


def _is_auth(start: bytes) -> bool:
    return start.upper() in (b"AUTH ", b"AUTH\r")


class DataEnd(enum.Enum):
    """How reading DATA ended."""

    COMPLETE = "complete"  # the final dot arrived (the collector may still be too big)
    CLOSED = "closed"  # the client closed its side before the final dot
    TIMEOUT = "timeout"  # smtp.idle_timeout between blocks, or smtp.data_timeout in all


async def read_data(
    reader: asyncio.StreamReader,
    collector: DataCollector,
    *,
    data_timeout: float,
    idle_timeout: float,
    on_block: Callable[[], None],
) -> DataEnd:
    """Feed ``collector`` blocks from ``reader`` up to the final dot; ``on_block`` after each.

    Whatever follows the final dot (pipelined commands) goes back into ``reader``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + data_timeout
    while not collector.done:
        remaining = min(deadline - loop.time(), idle_timeout)
        try:
            # Not wait_for: it drops the cancellation aiosmtpd sends at EOF
            # when the read has just completed (Python 3.11).
            async with asyncio.timeout(max(remaining, 0)):
                block = await reader.read(READ_BLOCK)
        except asyncio.CancelledError:
            # aiosmtpd cancels the session at EOF or reset, before the read returns.
            log.info(DATA_CLOSED)
            raise
        except TimeoutError:
            return DataEnd.TIMEOUT
        if not block:
            log.info(DATA_CLOSED)
            return DataEnd.CLOSED
        on_block()
        rest = collector.feed(block)
        if rest:
            # Pipelined commands after the end of data go back where the
            # command loop reads them (aiosmtpd itself uses this buffer).
            reader._buffer[0:0] = rest  # type: ignore[attr-defined]
    return DataEnd.COMPLETE
