"""Upstream outage (SPEC 1 and 5): the queue keeps what it acknowledged until the upstream is back.

The relay runs in the test's event loop (``tests/relay_harness.py``) in queue
mode, pointed at a loopback port where nothing listens; later a recording
``UpstreamServer`` opens on that same port.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path

from relay.server import Relay
from tests.relay_harness import running_relay, submit, until
from tests.upstream_server import UpstreamServer

MESSAGES = 10
RECIPIENTS_PER_MESSAGE = 100
COPIES = MESSAGES * RECIPIENTS_PER_MESSAGE
LIVE_STATES = ("queued", "delivering", "deferred")
DELIVERY_TIMEOUT = 20.0  # seconds for every copy to arrive once the upstream is back


class FixedPortUpstream(UpstreamServer):
    """A recording upstream on a port chosen in advance: the one the relay already points at."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    async def start(self) -> UpstreamServer:
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(self._protocol, self.host, self.port)
            self._previous_handler = loop.get_exception_handler()
        return self


def free_port() -> int:
    """A loopback port with nothing listening on it (bound once, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def news(index: int, recipients: list[str]) -> bytes:
    """One message to ``recipients``, all of them in its folded ``To:``."""
    to = ",\r\n ".join(recipients)  # folded: one line of 100 addresses passes 998 octets
    return (
        f"From: news@example.org\r\nTo: {to}\r\n"
        f"Subject: update {index}\r\n\r\nThe upstream is down; this must still arrive.\r\n"
    ).encode()


def sample(relay: Relay, name: str, **labels: str) -> float:
    value = relay.registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name} {labels}"
    return value


def spool_gauges(relay: Relay) -> dict[str, float]:
    return {
        state: sample(relay, "solo_relay_spool_copies", state=state)
        for state in (*LIVE_STATES, "delivered", "failed")
    }


async def test_outage_then_recovery_delivers_each_of_1000_copies_once(tmp_path: Path) -> None:
    """1,000 copies taken while the upstream is down all arrive once when it comes back."""
    port = free_port()
    recipients = [
        [f"user{m:02d}-{r:03d}@example.com" for r in range(RECIPIENTS_PER_MESSAGE)]
        for m in range(MESSAGES)
    ]
    env = {
        "RELAY_MODE": "queue",
        "RELAY_DELIVERY_RETRY_INITIAL": "0.1",
        "RELAY_DELIVERY_RETRY_MAX": "0.5",
    }
    async with running_relay(tmp_path, f"smtp+plain://127.0.0.1:{port}", env) as relay:
        spool, deliverer = relay.spool, relay.deliverer
        assert spool is not None and deliverer is not None
        for index, batch in enumerate(recipients):
            reply = await submit(
                relay.smtp_port,
                news(index, batch),
                batch,
                sender="news@example.org",
                ehlo="app.example.test",
            )
            assert reply.startswith("250 2.0.0 OK: queued as "), reply
        assert spool.live == COPIES
        assert sample(relay, "solo_relay_messages_received_total", result="accepted") == MESSAGES
        await until(
            lambda: sample(relay, "solo_relay_retries_total") > 0, "a deferral", timeout=10.0
        )
        await deliverer.refresh_gauges(time.time())
        waiting = spool_gauges(relay)
        assert sum(waiting[state] for state in LIVE_STATES) == COPIES, waiting
        assert waiting["deferred"] > 0, waiting
        assert sample(relay, "solo_relay_copies_total", outcome="delivered") == 0
        assert sample(relay, "solo_relay_copies_total", outcome="transient") > 0

        async with FixedPortUpstream(port) as upstream:
            await until(
                lambda: len(upstream.transactions) >= COPIES and spool.live == 0,
                "every copy to be delivered",
                timeout=DELIVERY_TIMEOUT,
            )
            await deliverer.refresh_gauges(time.time())
            assert sample(relay, "solo_relay_copies_total", outcome="delivered") == COPIES
            assert sample(relay, "solo_relay_copies_total", outcome="permanent") == 0
            assert spool_gauges(relay) == dict.fromkeys((*LIVE_STATES, "delivered", "failed"), 0)
            assert spool.live == 0
            assert sample(relay, "solo_relay_dsn_sent_total") == 0

    batch_of = {rcpt: batch for batch in recipients for rcpt in batch}
    for t in upstream.transactions:
        (rcpt,) = t.rcpt_tos
        header = t.content.split(b"\r\n\r\n", 1)[0].decode()
        assert not [other for other in batch_of[rcpt] if other != rcpt and other in header]
    counts = Counter(t.rcpt_tos[0] for t in upstream.transactions)
    assert counts == Counter(rcpt for batch in recipients for rcpt in batch)  # each exactly once
