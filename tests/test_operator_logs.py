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
from relay.ops.logs import AddressTokens, setup_logging
from relay.server import Relay
from tests.relay_harness import TEST_KEY, running_relay, until
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
    # One upstream connection: the copies go in envelope order, so the scripted refusal
    # is CAROL's (with two, BOB's RCPT could come first and take it).
    env = {"RELAY_UPSTREAM_POOL_SIZE": "1"}
    with json_logs() as stream:
        async with running_relay(tmp_path, plain_server.url(), env) as relay:
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
        deliverer = relay.deliverer
        assert deliverer is not None
        await until(lambda: deliverer.paused_until, "delivery paused")
        status, body = await readyz(relay)
        assert deliverer.upstream_reachable  # the upstream answered: only the pause says no
    assert status == 503
    assert body == "delivery paused: the upstream refused the relay's credentials\n"
    assert plain_server.transactions == []


# -- item 6: refusals at connect, MAIL and RCPT ------------------------------------------


def refusals(relay: Relay, reason: str) -> float:
    value = relay.registry.get_sample_value("solo_relay_smtp_refusals_total", {"reason": reason})
    assert value is not None, reason
    return value


async def test_rcpt_refusals_are_logged_and_counted_by_reason(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """A bad recipient (553) and one over the limit (452): a line and a count each."""
    env = {"RELAY_SMTP_MAX_RECIPIENTS": "2"}
    over = "dave@example.org"

    def session(port: int) -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("app.example.org")
            client.mail(SENDER)
            replies = [client.rcpt(r) for r in ("root@localhost", BOB, CAROL, over)]
            client.rset()
            return replies

    with json_logs() as stream:
        async with running_relay(tmp_path, plain_server.url(), env) as relay:
            replies = await asyncio.to_thread(session, relay.smtp_port)
            counts = {
                reason: refusals(relay, reason)
                for reason in ("bad_recipient", "too_many_recipients", "network")
            }
        found = lines(stream, "refused")
    assert [code for code, _ in replies] == [553, 250, 250, 452]
    assert counts == {"bad_recipient": 1, "too_many_recipients": 1, "network": 0}
    by_reason = {line["reason"]: line for line in found}
    assert by_reason["too_many_recipients"]["reply"] == "452 4.5.3 Too many recipients"
    assert by_reason["too_many_recipients"]["rcpt"] == TOKENS(over)
    assert by_reason["too_many_recipients"]["sender"] == TOKENS(SENDER)
    assert by_reason["bad_recipient"]["reply"].startswith("553 5.1.")
    assert by_reason["bad_recipient"]["rcpt"] == TOKENS("root@localhost")
    assert {line["stage"] for line in found} == {"rcpt"}
    assert {line["client"] for line in found} == {"127.0.0.1"}
    assert over not in stream.getvalue() and "root@localhost" not in stream.getvalue()


async def test_network_and_size_refusals_at_mail_are_logged_and_counted(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """A client outside smtp.allow_networks gets 550 5.7.1 at MAIL, logged with the sender token."""
    env = {"RELAY_SMTP_ALLOW_NETWORKS": "192.0.2.0/24"}
    with json_logs() as stream:
        async with running_relay(tmp_path, plain_server.url(), env) as relay:
            error = await asyncio.to_thread(send, relay.smtp_port, [BOB])
            network = refusals(relay, "network")
        (line,) = lines(stream, "refused")
    assert isinstance(error, smtplib.SMTPSenderRefused) and error.smtp_code == 550
    assert network == 1
    assert line["stage"] == "mail" and line["reason"] == "network"
    assert line["reply"] == "550 5.7.1 Relaying not allowed from your network"
    assert line["sender"] == TOKENS(SENDER)
    assert SENDER not in stream.getvalue()

    def oversized(port: int) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("app.example.org")
            return client.mail(SENDER, ["SIZE=999999999"])

    async with running_relay(tmp_path / "2", plain_server.url()) as relay:
        code, _ = await asyncio.to_thread(oversized, relay.smtp_port)
        assert code == 552
        assert refusals(relay, "too_big") == 1


async def test_a_connection_over_the_limit_is_logged_and_counted(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """smtp.max_connections = 1: the second connection gets 421 4.7.0, a line and a count."""

    def two(port: int) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as first:
            first.ehlo("app.example.org")
            try:
                smtplib.SMTP("127.0.0.1", port, timeout=30)
            except smtplib.SMTPConnectError as exc:
                return exc.smtp_code
        return 0

    with json_logs() as stream:
        env = {"RELAY_SMTP_MAX_CONNECTIONS": "1"}
        async with running_relay(tmp_path, plain_server.url(), env) as relay:
            assert await asyncio.to_thread(two, relay.smtp_port) == 421
            assert refusals(relay, "connection_limit") == 1
        (line,) = lines(stream, "refused")
    assert line["stage"] == "connect" and line["reply"].startswith("421 4.7.0")
