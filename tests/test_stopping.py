"""A stop (SIGTERM) in the middle of mail (issue 13, F3): no new transaction begins, and
every message whose final dot arrived is answered and written down before the exit.

The relay runs in the test's loop; ``Relay.stop`` is what SIGTERM runs.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from prometheus_client import CollectorRegistry

from relay.config import load
from relay.ops.logs import AddressTokens
from relay.server import Relay
from tests.relay_harness import TEST_KEY, RawClient, until
from tests.upstream_server import Delay, UpstreamServer

MESSAGE = b"From: news@example.org\r\nSubject: t\r\n\r\nhello\r\n.\r\n"


def make_relay(tmp_path: Path, upstream: UpstreamServer, **env: str) -> Relay:
    settings = {
        "RELAY_LISTEN": "127.0.0.1:0",
        "RELAY_METRICS_LISTEN": "127.0.0.1:0",
        "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "RELAY_UPSTREAM": upstream.url(),
        "RELAY_SMTP_HOSTNAME": "relay.example.test",
        "RELAY_SPOOL_MIN_FREE_BYTES": "0",
        **env,
    }
    return Relay(
        load(environ=settings), registry=CollectorRegistry(), tokens=AddressTokens(TEST_KEY)
    )


def copies_left(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "spool" / "spool.db") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM copies").fetchone()[0])


async def test_mail_after_the_stop_began_gets_421_and_the_session_is_closed(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """A session open at SIGTERM may not begin a transaction: 421 4.3.2, then EOF."""
    relay = make_relay(tmp_path, plain_server, RELAY_MODE="queue")
    await relay.start()
    client = await RawClient.connect(relay.smtp_port)
    assert (await client.command("EHLO app.example.org")).startswith("250")
    stopping = asyncio.ensure_future(relay.stop(grace=5.0))
    await until(lambda: relay.stopping, "the stop to begin")
    reply = await client.command("MAIL FROM:<news@example.org>")
    assert reply.startswith("421 4.3.2"), reply
    async with asyncio.timeout(5):
        assert await client.reader.read() == b""  # the relay closed the connection
    await client.close()
    async with asyncio.timeout(5):
        await stopping  # no session left: the stop does not wait out its grace
    assert plain_server.transactions == []


async def test_a_direct_delivery_begun_late_in_the_stop_is_answered_and_recorded(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Direct mode: the final dot arrives near the end of the sessions' grace and the
    upstream is slow. The delivery gets its own deadline: the client hears 250, the copy
    is written down (nothing left for the next start), and only then does the relay stop."""
    plain_server.script("DOT", [Delay(2.0, 250)])
    relay = make_relay(
        tmp_path, plain_server, RELAY_MODE="direct", RELAY_DELIVERY_DIRECT_DEADLINE="4"
    )
    await relay.start()
    client = await RawClient.connect(relay.smtp_port)
    await client.command("EHLO app.example.org")
    await client.command("MAIL FROM:<news@example.org>")
    await client.command("RCPT TO:<alice@example.com>")
    assert (await client.command("DATA")).startswith("354")
    stopping = asyncio.ensure_future(relay.stop(grace=4.0))
    await asyncio.sleep(3.5)  # the dot arrives 0.5 s before the sessions' grace is up
    await client.send(MESSAGE)
    reply = await client.reply(timeout=10)
    assert reply.startswith("250 2.0.0") and "1 copies delivered" in reply, reply
    await client.close()
    async with asyncio.timeout(10):
        await stopping
    assert len(plain_server.transactions) == 1
    assert copies_left(tmp_path) == 0
