"""A real relay in the test's event loop, on 127.0.0.1 port 0; raw SMTP clients for it;
one way to wait for a condition (``until``) and one way to submit a message (``submit``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from relay.config import load
from relay.ops.logs import AddressTokens
from relay.server import Relay

TEST_KEY = b"k" * 32
WAIT_TIMEOUT = 15.0  # seconds for a delivery, a record or a process to show up
POLL = 0.02  # seconds between two looks at a condition no event announces


async def until(condition: Callable[[], object], what: str, timeout: float = WAIT_TIMEOUT) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds.

    For state another process or thread changes (an upstream's transactions, a
    spool database, a log file): the test's own loop has no event to wait on.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(POLL)


@contextlib.asynccontextmanager
async def running_relay(
    tmp_path: Path, upstream_url: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[Relay]:
    """Start a relay with ``RELAY_*`` settings ``env`` over test defaults; stop it after."""
    settings = {
        "RELAY_LISTEN": "127.0.0.1:0",
        "RELAY_METRICS_LISTEN": "127.0.0.1:0",
        "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "RELAY_UPSTREAM": upstream_url,
        "RELAY_SMTP_HOSTNAME": "relay.example.test",
        # Direct mode makes the upstream's transactions visible when the reply arrives;
        # queue-mode tests ask for RELAY_MODE=queue and wait for delivery.
        "RELAY_MODE": "direct",
        "RELAY_SPOOL_MIN_FREE_BYTES": "0",
        **(env or {}),
    }
    relay = Relay(
        load(environ=settings), registry=CollectorRegistry(), tokens=AddressTokens(TEST_KEY)
    )
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop(grace=1.0)


class RawClient:
    """An SMTP client that sends exactly the bytes it is given (for hostile inputs)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        await client.reply()  # the greeting
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 10.0) -> str:
        """One whole reply (all its lines), as text."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                break
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        return "\n".join(lines)

    async def command(self, line: str | bytes) -> str:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def submit(
    port: int,
    data: bytes,
    recipients: Sequence[str],
    *,
    sender: str,
    pause: float = 0.0,
    ehlo: str = "client.example.test",
) -> str:
    """One message over a new connection; the reply to its DATA, or the first refusal.

    ``data`` is the message without the final dot. With ``pause``, it goes in two
    writes that far apart (a crash "during DATA"). "" when the connection failed
    or was cut. After a 250 the session ends with QUIT, if the relay still listens.
    """
    try:
        client = await RawClient.connect(port)
    except OSError:
        return ""
    try:
        for line in (f"EHLO {ehlo}", f"MAIL FROM:<{sender}>"):
            reply = await client.command(line)
            if not reply.startswith("250"):
                return reply
        for rcpt in recipients:
            reply = await client.command(f"RCPT TO:<{rcpt}>")
            if not reply.startswith("250"):
                return reply
        reply = await client.command("DATA")
        if not reply.startswith("354"):
            return reply
        if pause:
            half = len(data) // 2
            await client.send(data[:half])
            await asyncio.sleep(pause)  # the gap itself is the point: a crash inside DATA
            data = data[half:]
        await client.send(data + b".\r\n")
        reply = await client.reply()
        if reply.startswith("250"):
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                await client.command("QUIT")  # the relay may be gone already (after-250)
        return reply
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return ""
    finally:
        await client.close()
