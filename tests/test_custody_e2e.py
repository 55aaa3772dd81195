"""Custody through the wire: queue mode's 250 only after the spool write, and 4xx (never 5xx,
never 250) when custody cannot be taken."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from relay import intake
from relay.core.policy import Backoff
from relay.custody.rows import Rows
from relay.custody.spool import Spool, SpoolError
from tests.relay_harness import RawClient, running_relay, until
from tests.upstream_server import USER, Delay, Transaction, UpstreamServer

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
        await until(lambda: len(plain_server.transactions) >= 2, "both copies at the upstream")
        assert relay.spool is not None and relay.deliverer is not None
        spool = relay.spool
        await until(lambda: spool.live == 0, "an empty spool")
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
    insert = Rows.insert
    writing = threading.Event()

    def slow_insert(self: Rows, conn: Any, message: Any) -> None:
        writing.set()
        time.sleep(0.3)  # a slow disk, in the writer thread
        insert(self, conn, message)

    monkeypatch.setattr(Rows, "insert", slow_insert)
    async with running_relay(tmp_path, plain_server.url(), QUEUE) as relay:
        client = await RawClient.connect(relay.smtp_port)
        await client.command("EHLO app.example.org")
        await client.command("MAIL FROM:<news@example.org>")
        await client.command("RCPT TO:<alice@example.com>")
        await client.command("RCPT TO:<bob@example.com>")
        await client.command("DATA")
        await client.send(b"From: news@example.org\r\nSubject: t\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        await until(writing.is_set, "the slow spool write under way")
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


# -- direct mode says exactly what happened (issue 13, section 4) -------------------------


def sample(relay: Any, name: str, labels: dict[str, str] | None = None) -> float:
    value = relay.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)


class FlakySpool:
    """Makes the next ``count`` settle writes (discard, record, record_delivered) fail.

    A real disk cannot be made to refuse exactly the write after the upstream's reply,
    so this is the one mock in the file.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.left = count
        self.failed = 0
        monkeypatch.setattr(intake, "SETTLE_RETRY", Backoff(0.05, 0.1))  # no waiting for seconds
        for name in ("discard", "record", "record_delivered"):
            real = getattr(Spool, name)
            monkeypatch.setattr(Spool, name, self._wrap(real))

    def _wrap(self, real: Any) -> Any:
        flaky = self

        async def write(self: Spool, *args: Any, **kwargs: Any) -> Any:
            if flaky.left > 0:
                flaky.left -= 1
                flaky.failed += 1
                raise SpoolError("disk I/O error (injected)")
            return await real(self, *args, **kwargs)

        return write


async def test_direct_refusal_is_reported_as_refused_and_never_resent(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """One copy 550: 250 says "1 refused", not "queued for retry"; the sender gets a DSN.

    The refused copy is never offered to the upstream again (it was resent from the
    queue before, and delivered when the upstream changed its mind).
    """
    plain_server.script("RCPT", ["550 5.1.1 no such user"])
    env = {"RELAY_UPSTREAM_POOL_SIZE": "1"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        _, reply = await send(relay.smtp_port, ["alice@example.com", "bob@example.com"])
        assert reply.startswith("250 2.0.0"), reply
        assert "1 of 2 copies delivered" in reply and "1 refused" in reply
        assert "queued for retry" not in reply
        assert relay.spool is not None
        await until(
            lambda: len(plain_server.transactions) >= 2 and not relay.spool.live,
            "both copies sent and none left in the spool",
        )
        await asyncio.sleep(0.2)  # a resend, if any, would show here
        assert sample(relay, "solo_relay_dsn_sent_total") == 1
    rcpts = [t.rcpt_tos[0] for t in plain_server.transactions]
    assert len(rcpts) == 2 and "news@example.org" in rcpts  # one copy, one DSN
    dsn = next(t for t in plain_server.transactions if t.rcpt_tos == ["news@example.org"])
    assert dsn.mail_from == "<>"  # RFC 3464 2: the null reverse-path


async def test_direct_refusal_with_a_failing_discard_is_still_the_upstreams_reply(
    tmp_path: Path, plain_server: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every copy 550 and the spool's discard fails twice: the client gets the 550, not 451.

    The discard is retried while the relay runs, so a restart sends nothing.
    """
    plain_server.script("RCPT", [550, 550])
    flaky = FlakySpool(monkeypatch, 2)
    async with running_relay(tmp_path, plain_server.url()) as relay:
        _, reply = await send(relay.smtp_port, ["alice@example.com", "bob@example.com"])
        assert reply.startswith("550 5.0.0"), reply
        assert relay.spool is not None
        await until(lambda: relay.spool is not None and relay.spool.live == 0, "an empty spool")
    assert flaky.failed == 2
    async with running_relay(tmp_path, plain_server.url()) as relay:
        await asyncio.sleep(0.3)  # a restart would resend what was left "delivering"
    assert plain_server.transactions == []


async def test_direct_delivered_copies_are_not_sent_again_when_their_record_fails(
    tmp_path: Path, plain_server: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both copies 250 and the spool refuses the writes that follow: 250, and no resend."""
    flaky = FlakySpool(monkeypatch, 3)
    async with running_relay(tmp_path, plain_server.url()) as relay:
        _, reply = await send(relay.smtp_port, ["alice@example.com", "bob@example.com"])
        assert reply.startswith("250 2.0.0") and "2 copies delivered" in reply, reply
        assert relay.spool is not None
        await until(lambda: relay.spool is not None and relay.spool.live == 0, "an empty spool")
    assert flaky.failed == 3
    async with running_relay(tmp_path, plain_server.url()) as relay:
        await asyncio.sleep(0.3)
    assert len(plain_server.transactions) == 2


async def test_direct_partial_delivery_with_failing_records_sends_each_copy_once(
    tmp_path: Path, plain_server: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One copy 250, one 451; the records fail at first: alice once, bob retried once, no more."""
    plain_server.script("RCPT", [451])
    flaky = FlakySpool(monkeypatch, 2)
    env = {"RELAY_UPSTREAM_POOL_SIZE": "1", "RELAY_DELIVERY_RETRY_INITIAL": "0.2"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        _, reply = await send(relay.smtp_port, ["alice@example.com", "bob@example.com"])
        assert reply.startswith("250 2.0.0") and "queued for retry" in reply, reply
        await until(lambda: relay.spool is not None and relay.spool.live == 0, "an empty spool")
    assert flaky.failed == 2
    async with running_relay(tmp_path, plain_server.url()) as relay:
        await asyncio.sleep(0.3)
    assert sorted(t.rcpt_tos[0] for t in plain_server.transactions) == [
        "alice@example.com",
        "bob@example.com",
    ]


# -- a client gone before the reply (issue 13, section 7) ---------------------------------


@pytest.mark.parametrize("slow", ["spool", "isolation"])
@pytest.mark.parametrize("mode", ["queue", "direct"])
async def test_client_gone_before_the_reply_is_still_accounted(
    tmp_path: Path,
    plain_server: UpstreamServer,
    *,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    slow: str,
) -> None:
    """Final dot, then EOF before the reply (while the spool write, or the isolation of a
    large message in its thread, is under way): taken, delivered, logged and counted."""
    busy = threading.Event()  # the slow part is under way
    if slow == "spool":
        insert = Rows.insert

        def slow_insert(self: Rows, conn: Any, message: Any) -> None:
            busy.set()
            time.sleep(0.3)  # a slow disk, in the writer thread
            insert(self, conn, message)

        monkeypatch.setattr(Rows, "insert", slow_insert)
    else:
        isolate = intake.isolate

        def slow_isolate(*args: Any) -> Any:
            busy.set()
            time.sleep(0.3)  # a large message, in its thread
            return isolate(*args)

        monkeypatch.setattr(intake, "isolate", slow_isolate)
        monkeypatch.setattr(intake, "OFFLOAD_RECIPIENTS", 0)  # every message in a thread
    caplog.set_level("INFO", logger="relay.intake")
    async with running_relay(tmp_path, plain_server.url(), {"RELAY_MODE": mode}) as relay:
        client = await RawClient.connect(relay.smtp_port)
        await client.command("EHLO app.example.org")
        await client.command("MAIL FROM:<news@example.org>")
        await client.command("RCPT TO:<alice@example.com>")
        await client.command("RCPT TO:<bob@example.com>")
        await client.command("DATA")
        await client.send(b"From: news@example.org\r\nSubject: t\r\n\r\nhi\r\n.\r\n")
        await until(busy.is_set, f"the slow {slow} under way")
        client.writer.write_eof()  # gone before the reply
        await client.reader.read()
        await client.close()
        await until(lambda: len(plain_server.transactions) == 2, "copies at the upstream")
        accepted = {"result": "accepted"}
        await until(
            lambda: sample(relay, "solo_relay_messages_received_total", accepted) == 1,
            "solo_relay_messages_received_total",
        )
        assert sample(relay, "solo_relay_message_recipients_count") == 1
        assert sample(relay, "solo_relay_message_recipients_sum") == 2
        assert any(r.getMessage() == "message received" for r in caplog.records)
        assert relay.spool is not None
        await until(lambda: relay.spool is not None and relay.spool.live == 0, "an empty spool")


# -- bounces reach someone (issue 13, section 5) ------------------------------------------

APP_SECRET = "app-provider-secret"
BOUNCER = "bounces@example.net"
BOUNCER_SECRET = "bounce-secret"


def provider(**kwargs: Any) -> UpstreamServer:
    """An upstream that, like a provider, refuses MAIL before AUTH (530 5.7.0)."""
    users = {USER: APP_SECRET, BOUNCER: BOUNCER_SECRET}
    return UpstreamServer(auth_require_tls=False, users=users, auth_required=True, **kwargs)


async def send_logged_in(port: int, rcpt: str, user: str = USER, secret: str = APP_SECRET) -> str:
    """AUTH PLAIN as the application, one message from news@example.org; the final reply."""
    client = await RawClient.connect(port)
    try:
        await client.command("EHLO app.example.org")
        token = base64.b64encode(f"\0{user}\0{secret}".encode()).decode()
        assert (await client.command(f"AUTH PLAIN {token}")).startswith("235")
        await client.command("MAIL FROM:<news@example.org>")
        await client.command(f"RCPT TO:<{rcpt}>")
        await client.command("DATA")
        await client.send(b"From: news@example.org\r\nSubject: t\r\n\r\nhi\r\n.\r\n")
        return await client.reply()
    finally:
        await client.close()


def dsn_of(server: UpstreamServer) -> Transaction:
    (dsn,) = [t for t in server.transactions if t.rcpt_tos == ["news@example.org"]]
    return dsn


PASSTHROUGH = {"RELAY_MODE": "queue", "RELAY_SMTP_AUTH": "passthrough"}


@pytest.mark.parametrize("mode", ["queue", "direct"])
async def test_passthrough_dsn_goes_out_with_the_messages_login(tmp_path: Path, mode: str) -> None:
    """Passthrough: the DSN for a refused copy logs in as the message did, and is counted once
    the upstream takes it (it went without AUTH, got 530 and was dropped, yet counted)."""
    upstream = provider()
    upstream.script("RCPT", ["550 5.1.1 no such user"])
    env = {**PASSTHROUGH, "RELAY_MODE": mode}
    async with upstream, running_relay(tmp_path, upstream.url(), env) as relay:
        reply = await send_logged_in(relay.smtp_port, "alice@example.com")
        assert reply.startswith("250" if mode == "queue" else "550 5.1.1"), reply
        if mode == "direct":  # nothing delivered, the application has its 550: no DSN
            assert sample(relay, "solo_relay_dsn_sent_total") == 0
            return
        await until(
            lambda: any(t.rcpt_tos == ["news@example.org"] for t in upstream.transactions),
            "the DSN at the upstream",
        )
        assert sample(relay, "solo_relay_dsn_sent_total") == 1
    dsn = dsn_of(upstream)
    assert dsn.mail_from == "<>" and dsn.login == USER


async def test_passthrough_dsn_in_direct_mode_beside_a_delivery(tmp_path: Path) -> None:
    """Direct mode, one copy delivered and one refused: the DSN goes with the message's login."""
    upstream = provider()
    upstream.script("RCPT", ["550 5.1.1 no such user"])
    async with (
        upstream,
        running_relay(
            tmp_path,
            upstream.url(),
            {"RELAY_SMTP_AUTH": "passthrough", "RELAY_UPSTREAM_POOL_SIZE": "1"},
        ) as relay,
    ):
        client = await RawClient.connect(relay.smtp_port)
        await client.command("EHLO app.example.org")
        token = base64.b64encode(f"\0{USER}\0{APP_SECRET}".encode()).decode()
        await client.command(f"AUTH PLAIN {token}")
        await client.command("MAIL FROM:<news@example.org>")
        await client.command("RCPT TO:<alice@example.com>")
        await client.command("RCPT TO:<bob@example.com>")
        await client.command("DATA")
        await client.send(b"From: news@example.org\r\nSubject: t\r\n\r\nhi\r\n.\r\n")
        reply = await client.reply()
        await client.close()
        assert reply.startswith("250 2.0.0") and "1 refused" in reply, reply
        await until(
            lambda: sample(relay, "solo_relay_dsn_sent_total") == 1, "solo_relay_dsn_sent_total"
        )
    assert dsn_of(upstream).login == USER


async def test_a_dsn_refused_for_now_stays_queued_and_is_counted_when_taken(
    tmp_path: Path,
) -> None:
    """The DSN's first try gets 451: it is retried like any copy, and counted only once taken."""
    upstream = provider()
    upstream.script("RCPT", ["550 5.1.1 no such user", "451 4.3.0 try later"])
    env = {**PASSTHROUGH, "RELAY_DELIVERY_RETRY_INITIAL": "0.3"}
    async with upstream, running_relay(tmp_path, upstream.url(), env) as relay:
        await send_logged_in(relay.smtp_port, "alice@example.com")
        transient = {"outcome": "transient"}
        await until(
            lambda: sample(relay, "solo_relay_copies_total", transient) == 1,
            "solo_relay_copies_total",
        )
        assert sample(relay, "solo_relay_dsn_sent_total") == 0  # queued, not yet taken
        assert relay.spool is not None and relay.spool.live == 1
        await until(
            lambda: sample(relay, "solo_relay_dsn_sent_total") == 1, "solo_relay_dsn_sent_total"
        )
        assert relay.spool.live == 0
    assert dsn_of(upstream).login == USER


async def test_a_configured_bounce_login_sends_the_dsn(tmp_path: Path) -> None:
    """delivery.dsn_user: the DSN logs in with the bounce account, not the application's."""
    upstream = provider()
    upstream.script("RCPT", ["550 5.1.1 no such user"])
    secret_file = tmp_path / "bounce-secret"
    secret_file.write_text(BOUNCER_SECRET + "\n")
    env = {
        **PASSTHROUGH,
        "RELAY_DELIVERY_DSN_USER": BOUNCER,
        "RELAY_DELIVERY_DSN_PASSWORD_FILE": str(secret_file),
    }
    async with upstream, running_relay(tmp_path, upstream.url(), env) as relay:
        await send_logged_in(relay.smtp_port, "alice@example.com")
        await until(
            lambda: sample(relay, "solo_relay_dsn_sent_total") == 1, "solo_relay_dsn_sent_total"
        )
    assert dsn_of(upstream).login == BOUNCER
    assert (BOUNCER, BOUNCER_SECRET) in [(user, pw) for _, user, pw in upstream.auths]


async def test_a_530_for_missing_credentials_holds_mail_instead_of_bouncing_it(
    tmp_path: Path,
) -> None:
    """No upstream login configured and the provider wants one (530): the copy waits, no
    bounce is made of it, and delivery pauses as for refused credentials (535)."""
    upstream = provider()
    async with upstream, running_relay(tmp_path, upstream.url(), {"RELAY_MODE": "queue"}) as relay:
        _, reply = await send(relay.smtp_port, ["alice@example.com"])
        assert reply.startswith("250")
        await until(
            lambda: sample(relay, "solo_relay_upstream_auth_failures_total") == 1,
            "solo_relay_upstream_auth_failures_total",
        )
        assert relay.spool is not None and relay.spool.live == 1  # still queued
        assert sample(relay, "solo_relay_copies_total", {"outcome": "permanent"}) == 0
        assert sample(relay, "solo_relay_upstream_auth_paused") == 1
    assert upstream.transactions == []


@pytest.mark.parametrize(
    ("env", "author"),
    [
        ({}, "MAILER-DAEMON@example.org"),  # relay.example.test is no public domain
        ({"RELAY_SMTP_HOSTNAME": "mail.example.com"}, "MAILER-DAEMON@mail.example.com"),
        ({"RELAY_DELIVERY_DSN_FROM": "bounces@example.net"}, "bounces@example.net"),
    ],
)
async def test_the_dsn_from_address_is_one_a_provider_takes(
    tmp_path: Path, plain_server: UpstreamServer, env: dict[str, str], author: str
) -> None:
    """delivery.dsn_from, else MAILER-DAEMON@smtp.hostname if public, else @ the sender's domain."""
    plain_server.script("RCPT", [550])
    async with running_relay(tmp_path, plain_server.url(), {"RELAY_MODE": "queue", **env}) as relay:
        await send(relay.smtp_port, ["alice@example.com"])
        await until(
            lambda: sample(relay, "solo_relay_dsn_sent_total") == 1, "solo_relay_dsn_sent_total"
        )
    message = email.message_from_bytes(dsn_of(plain_server).content)
    assert message["From"] == f"Mail Delivery System <{author}>"
    assert str(message["Message-ID"]).endswith("@" + author.rpartition("@")[2] + ">")


async def test_a_stop_lets_a_message_whose_client_left_finish(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Direct mode, the client gone mid-delivery, then a stop: the delivery ends and is
    written down before the spool closes (it was cut off, left 'delivering', and sent
    again at the next start)."""
    plain_server.script("DOT", [Delay(0.5, 250)])
    async with running_relay(tmp_path, plain_server.url()) as relay:
        client = await RawClient.connect(relay.smtp_port)
        await client.command("EHLO app.example.org")
        await client.command("MAIL FROM:<news@example.org>")
        await client.command("RCPT TO:<alice@example.com>")
        await client.command("DATA")
        await client.send(b"From: news@example.org\r\nSubject: t\r\n\r\nhi\r\n.\r\n")
        await until(
            lambda: len(plain_server.transactions) == 1, "copies at the upstream"
        )  # at the upstream now
        await client.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "spool" / "spool.db")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM copies").fetchone() == (0,)
    async with running_relay(tmp_path, plain_server.url()):
        await asyncio.sleep(0.3)
    assert len(plain_server.transactions) == 1


async def test_a_dsn_the_upstream_never_takes_expires_uncounted(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """A DSN refused for now at every try is retried until its lifetime ends, then dropped
    (never bounced) and never counted as sent."""
    plain_server.script("RCPT", [550] + [451] * 50)
    env = {
        "RELAY_MODE": "queue",
        "RELAY_DELIVERY_LIFETIME": "1.5",
        "RELAY_DELIVERY_RETRY_INITIAL": "0.2",
    }
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        await send(relay.smtp_port, ["alice@example.com"])
        transient = {"outcome": "transient"}
        await until(
            lambda: sample(relay, "solo_relay_copies_total", transient) >= 2,
            "solo_relay_copies_total",
        )
        assert relay.spool is not None and relay.spool.live == 1  # the DSN, waiting
        await until(lambda: relay.spool is not None and relay.spool.live == 0, "an empty spool")
        assert sample(relay, "solo_relay_dsn_sent_total") == 0
    assert plain_server.transactions == []


async def test_direct_retries_start_with_the_queues_jittered_backoff(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Copies deferred by direct mode come back after retry_initial +/- retry_jitter."""
    plain_server.script("RCPT", [451, 451])  # two of three; the third is delivered
    env = {"RELAY_UPSTREAM_POOL_SIZE": "1"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        _, reply = await send(
            relay.smtp_port, ["alice@example.com", "bob@example.com", "carol@example.net"]
        )
        assert "2 queued for retry" in reply, reply
        with contextlib.closing(sqlite3.connect(tmp_path / "spool" / "spool.db")) as conn:
            rows = conn.execute(
                "SELECT next_try - updated, attempts FROM copies WHERE state = 'deferred'"
            ).fetchall()
    assert len(rows) == 2
    assert all(60 * 0.8 <= delay <= 60 * 1.2 and attempts == 1 for delay, attempts in rows)
    assert rows[0][0] != rows[1][0]  # each its own jitter (it was 60 s for both)
