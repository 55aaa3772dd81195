"""A real relay in the test's event loop, on 127.0.0.1 port 0, and raw SMTP clients for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry

from relay.config import load
from relay.ops.logs import AddressTokens
from relay.server import Relay

TEST_KEY = b"k" * 32


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
