"""Custody through the wire: queue mode's 250 only after the spool write, and 4xx (never 5xx,
never 250) when custody cannot be taken."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from relay.spool import Spool
from tests.relay_harness import RawClient, running_relay
from tests.upstream_server import UpstreamServer

QUEUE = {"RELAY_MODE": "queue"}


async def send(port: int, rcpts: list[str], body: bytes = b"hello\r\n") -> tuple[str, str]:
    """The reply to MAIL, and the reply to the final dot (or "" when MAIL was refused)."""
    client = await RawClient.connect(port)
    try:
        await client.command("EHLO app.example.org")
        mail = await client.command("MAIL FROM:<news@example.org>")
        if not mail.startswith("250"):
            return mail, ""
        for rcpt in rcpts:
            await client.command(f"RCPT TO:<{rcpt}>")
        await client.command("DATA")
        await client.send(b"From: news@example.org\r\nSubject: t\r\n\r\n" + body + b".\r\n")
        return mail, await client.reply()
    finally:
        await client.close()


async def test_queue_mode_answers_after_the_spool_write_then_delivers(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Queue mode: 250 "queued as ID" once the copies are in the spool, then both are delivered."""
    async with running_relay(tmp_path, plain_server.url(), QUEUE) as relay:
        _, reply = await send(relay.smtp_port, ["alice@example.com", "bob@example.com"])
        assert reply.startswith("250 2.0.0 OK: queued as ")
        async with asyncio.timeout(10):
            while len(plain_server.transactions) < 2:
                await asyncio.sleep(0.02)
        assert relay.spool is not None and relay.deliverer is not None
        async with asyncio.timeout(10):
            while relay.spool.live:
                await asyncio.sleep(0.02)
    assert sorted(t.rcpt_tos[0] for t in plain_server.transactions) == [
        "alice@example.com",
        "bob@example.com",
    ]


async def test_client_gone_during_the_spool_write_still_gets_its_copies_delivered(
    tmp_path: Path, plain_server: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Final dot, QUIT and a half-close while the write is slow: the copies still go out.

    aiosmtpd cancels the session at the client's EOF; the write commits anyway (the
    message is in custody), so its copies must be delivered now, not left marked
    ``delivering`` until the next start (found in review).
    """
    insert = Spool._insert

    def slow_insert(self: Spool, conn: Any, message: Any) -> None:
        time.sleep(0.3)  # a slow disk, in the writer thread
        insert(self, conn, message)

    monkeypatch.setattr(Spool, "_insert", slow_insert)
    async with running_relay(tmp_path, plain_server.url(), QUEUE) as relay:
        client = await RawClient.connect(relay.smtp_port)
        await client.command("EHLO app.example.org")
        await client.command("MAIL FROM:<news@example.org>")
        await client.command("RCPT TO:<alice@example.com>")
        await client.command("RCPT TO:<bob@example.com>")
        await client.command("DATA")
        await client.send(b"From: news@example.org\r\nSubject: t\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        await asyncio.sleep(0.05)
        client.writer.write_eof()  # gone before the 250
        await client.reader.read()
        await client.close()
        async with asyncio.timeout(10):
            while len(plain_server.transactions) < 2:
                await asyncio.sleep(0.02)
        assert relay.spool is not None
        async with asyncio.timeout(10):
            while relay.spool.live:  # nothing left behind as "delivering"
                await asyncio.sleep(0.02)
    assert sorted(t.rcpt_tos[0] for t in plain_server.transactions) == [
        "alice@example.com",
        "bob@example.com",
    ]


async def test_spool_write_failure_is_451_never_250(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """A spool that cannot take the message (its size cap) answers 451 4.3.0; nothing is sent."""
    env = {**QUEUE, "RELAY_SPOOL_MAX_BYTES": "200000"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        _, reply = await send(relay.smtp_port, ["alice@example.com"], (b"y" * 998 + b"\r\n") * 400)
        assert reply.startswith("451 4.3.0")
        _, small = await send(relay.smtp_port, ["alice@example.com"])
        assert small.startswith("250 2.0.0")


async def test_low_disk_space_refuses_at_mail_with_452(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Less free space than spool.min_free_bytes: MAIL gets 452 4.3.1."""
    env = {**QUEUE, "RELAY_SPOOL_MIN_FREE_BYTES": str(1 << 62)}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        mail, _ = await send(relay.smtp_port, ["alice@example.com"])
    assert mail.startswith("452 4.3.1")
    assert plain_server.transactions == []


async def test_queue_over_its_bound_refuses_at_mail_with_451_4_3_2(tmp_path: Path) -> None:
    """More live copies than delivery.max_queued: new mail gets 451 4.3.2 until it drains."""
    env = {**QUEUE, "RELAY_DELIVERY_MAX_QUEUED": "2", "RELAY_DELIVERY_RETRY_INITIAL": "3600"}
    async with running_relay(tmp_path, "smtp+plain://127.0.0.1:9", env) as relay:
        _, first = await send(relay.smtp_port, ["alice@example.com", "bob@example.com"])
        assert first.startswith("250 2.0.0")
        mail, _ = await send(relay.smtp_port, ["carol@example.net"])
        assert mail.startswith("451 4.3.2")


async def test_direct_mode_takes_custody_before_it_sends(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Direct mode spools first: a spool that cannot take the message means 451 and nothing sent."""
    env = {"RELAY_MODE": "direct", "RELAY_SPOOL_MAX_BYTES": "200000"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        _, reply = await send(relay.smtp_port, ["alice@example.com"], (b"y" * 998 + b"\r\n") * 400)
        assert reply.startswith("451 4.3.0")
        assert plain_server.transactions == []
        _, small = await send(relay.smtp_port, ["alice@example.com"])
        assert small.startswith("250 2.0.0")
        assert relay.spool is not None and relay.spool.live == 0
    assert len(plain_server.transactions) == 1
