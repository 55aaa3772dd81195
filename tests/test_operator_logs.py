"""What an operator sees of refusals and failures (issue 14, items 6-8), end to end.

Real ``smtplib`` clients as the application, the in-loop relay of
``tests/relay_harness.py``, the recording upstream of ``tests/upstream_server.py``;
the log lines are read as the relay's own handler writes them (JSON, redacted).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relay.config import LogConfig, LogFormat
from relay.logs import AddressTokens, setup_logging
from relay.server import Relay
from tests.relay_harness import TEST_KEY, running_relay
from tests.upstream_server import PASSWORD, USER, UpstreamServer

SENDER = "news@example.org"
BOB = "bob@example.com"
CAROL = "carol@example.net"
TOKENS = AddressTokens(TEST_KEY)
MESSAGE = f"From: <{SENDER}>\r\nTo: <{BOB}>\r\nSubject: order\r\n\r\nHello.\r\n"


@contextlib.contextmanager
def json_logs() -> Iterator[io.StringIO]:
    """The relay's handler writing JSON lines into a buffer, as ``serve`` sets it up."""
    stream = io.StringIO()
    setup_logging(LogConfig(format=LogFormat.JSON, level="debug"), key=TEST_KEY, stream=stream)
    try:
        yield stream
    finally:
        logging.getLogger().handlers.clear()


def lines(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    logging.getLogger().handlers[0].flush()
    found = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [line for line in found if line["event"] == event]


def send(port: int, rcpts: list[str], sender: str = SENDER, data: str = MESSAGE) -> Any:
    """One message through smtplib; the refused recipients dict, or the exception raised."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            return client.sendmail(sender, rcpts, data)
    except smtplib.SMTPException as exc:
        return exc


async def wait_for(stream: io.StringIO, event: str, count: int = 1) -> list[dict[str, Any]]:
    for _ in range(400):
        found = lines(stream, event)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.025)
    raise AssertionError(f"no {event!r} line in {stream.getvalue()}")


# -- item 7: the upstream's reply text --------------------------------------------------


async def test_deferral_logs_the_upstream_reply_with_addresses_as_tokens(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """A 451 at RCPT naming the recipient: 'copy deferred' has the reply, the address a token."""
    plain_server.script("RCPT", [f"451 4.2.0 <{BOB}> mailbox busy, try later"])
    with json_logs() as stream:
        async with running_relay(tmp_path, plain_server.url(), {"RELAY_MODE": "queue"}) as relay:
            assert await asyncio.to_thread(send, relay.smtp_port, [BOB]) == {}
            (line,) = await wait_for(stream, "copy deferred")
    assert line["reply"] == f"<{TOKENS(BOB)}> mailbox busy, try later"
    assert (line["code"], line["enhanced"], line["rcpt"]) == (451, "4.2.0", TOKENS(BOB))
    assert BOB not in stream.getvalue()


async def test_failure_logs_the_upstream_reply(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """A 550 after the dot: 'copy failed' carries the upstream's text, the address a token."""
    plain_server.script("DOT", [f"550 5.7.1 message from {SENDER} to {BOB} refused as spam"])
    with json_logs() as stream:
        async with running_relay(tmp_path, plain_server.url(), {"RELAY_MODE": "queue"}) as relay:
            await asyncio.to_thread(send, relay.smtp_port, [BOB])
            (line,) = await wait_for(stream, "copy failed")
    assert line["reply"] == f"message from {TOKENS(SENDER)} to {TOKENS(BOB)} refused as spam"
    assert "@" not in stream.getvalue().replace("relay.example.test", "")


async def test_direct_mode_copy_line_carries_the_reply(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Direct mode: the 'copy' line of a refused copy has the reply; a delivered one has none."""
    plain_server.script("RCPT", [f"550 5.1.1 <{CAROL}>: no such user"])
    with json_logs() as stream:
        async with running_relay(tmp_path, plain_server.url()) as relay:
            refused = await asyncio.to_thread(send, relay.smtp_port, [CAROL, BOB])
            assert refused == {}
            copies = await wait_for(stream, "copy", 2)
    by_rcpt = {line["rcpt"]: line for line in copies}
    assert by_rcpt[TOKENS(CAROL)]["reply"] == f"<{TOKENS(CAROL)}>: no such user"
    assert "reply" not in by_rcpt[TOKENS(BOB)]


# -- item 8: readiness during an AUTH pause ------------------------------------------------


async def readyz(relay: Relay) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.metrics_port)
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


async def test_readyz_is_not_ready_while_delivery_is_paused_for_credentials(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """535 from the upstream: /readyz answers 503 naming the pause, not 200."""
    env = {
        "RELAY_MODE": "queue",
        "RELAY_UPSTREAM_PASSWORD": PASSWORD + "-wrong",
    }
    async with running_relay(tmp_path, plain_server.url(user=USER), env) as relay:
        assert (await readyz(relay))[0] == 200
        assert await asyncio.to_thread(send, relay.smtp_port, [BOB]) == {}
        assert relay.deliverer is not None
        for _ in range(400):
            if relay.deliverer.paused_until:
                break
            await asyncio.sleep(0.025)
        status, body = await readyz(relay)
        assert relay.deliverer.upstream_reachable  # the upstream answered: only the pause says no
    assert status == 503
    assert body == "delivery paused: the upstream refused the relay's credentials\n"
    assert plain_server.transactions == []
