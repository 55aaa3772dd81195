"""The upstream against a real, recording SMTP server on loopback (tests/upstream_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.metadata
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtplib import SMTP, SMTPResponseException, SMTPServerDisconnected

from relay.config import UpstreamConfig
from relay.core.addresses import parse_address
from relay.core.errors import ConfigError
from relay.core.isolation import isolate
from relay.core.model import Copy, Credentials, Envelope, Outcome, Stage, Status
from relay.core.policy import classify_reply
from relay.upstream.outbox import OutboxUpstream
from relay.upstream.smtp import Upstream, open_upstream
from relay.upstream.target import Target, parse_upstream_url
from relay.upstream.transaction import (
    MAX_REPLY_LINES,
    MAX_REPLY_OCTETS,
    Commands,
    Reply,
    ReplyParser,
    commands,
    data_opened,
    prepare_body,
    refusal,
)
from relay.upstream.wire import AIOSMTPLIB_CHECKED, Reader
from tests.conftest import message
from tests.relay_harness import until
from tests.upstream_server import (
    DISCONNECT,
    PASSWORD,
    TOKEN,
    USER,
    Delay,
    UpstreamServer,
    self_signed_context,
    server_context,
)

SENDER = "news@example.org"
RCPT = "alice@example.com"
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")


def make_copy(
    rcpt: str = RCPT, body: bytes = b"Hello.\r\n", *, smtputf8: bool = False, rcpts: int = 1
) -> Copy:
    recipients = [rcpt] + [f"other{i}@example.net" for i in range(1, rcpts)]
    data = message("From: News <news@example.org>", f"To: {rcpt}", "Subject: Hi", body=body)
    return isolate(Envelope.parse(SENDER, recipients, smtputf8=smtputf8), data).copies[0]


def config(server: UpstreamServer, scheme: str = "smtp+plain", **options: Any) -> UpstreamConfig:
    user = options.pop("user", None)
    settings: dict[str, Any] = {
        "connect_timeout": 2.0,
        "command_timeout": 2.0,
        "data_timeout": 2.0,
        "password": PASSWORD if user else "",
    }
    settings.update(options)
    return UpstreamConfig(url=server.url(scheme, user), **settings)


@contextlib.asynccontextmanager
async def opened(cfg: UpstreamConfig) -> AsyncIterator[Upstream]:
    upstream = open_upstream(cfg, helo_name="relay.example.com")
    try:
        yield upstream
    finally:
        await upstream.aclose()


async def send_one(cfg: UpstreamConfig, copy: Copy | None = None, **kw: Any) -> Outcome:
    async with opened(cfg) as upstream:
        return await upstream.send(SENDER, copy or make_copy(), smtputf8=False, **kw)


def stuffed(data: bytes) -> bytes:
    return re.sub(rb"(?m)^\.", b"..", data) + b".\r\n"


# -- delivery ------------------------------------------------------------------


# Every test here runs against an upstream that offers PIPELINING (as the large providers
# do: MAIL, RCPT and DATA go out in one write) and one that does not (one by one).
@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def plain_server(pipelining: bool) -> UpstreamServer:
    return UpstreamServer(auth_require_tls=False, pipelining=pipelining)


@pytest.fixture
def upstream_server(server_tls: ssl.SSLContext, pipelining: bool) -> UpstreamServer:
    return UpstreamServer(tls_context=server_tls, pipelining=pipelining)


@pytest.fixture
def implicit_tls_server(server_tls: ssl.SSLContext, pipelining: bool) -> UpstreamServer:
    return UpstreamServer(tls_context=server_tls, implicit_tls=True, pipelining=pipelining)


async def test_plain_delivery_to_loopback_sends_the_exact_bytes(
    plain_server: UpstreamServer,
) -> None:
    """smtp+plain:// to loopback delivers; upstream gets exactly headers+body, no bare CR/LF/NUL."""
    copy = make_copy(body=b".starts with a dot\r\n..two dots\r\nend\r\n")
    outcome = await send_one(config(plain_server), copy)
    assert (outcome.status, outcome.stage, outcome.code) == (Status.DELIVERED, Stage.DOT, 250)
    assert outcome.enhanced == "2.0.0"
    [t] = plain_server.transactions
    assert (t.mail_from, t.rcpt_tos, t.tls) == (SENDER, [RCPT], False)
    assert t.content == bytes(copy)
    assert t.wire == stuffed(bytes(copy))
    assert BARE.search(plain_server.clear_bytes()) is None


async def test_null_sender_is_sent_as_empty_path(plain_server: UpstreamServer) -> None:
    """mail_from "" goes upstream as MAIL FROM:<>."""
    async with opened(config(plain_server)) as upstream:
        outcome = await upstream.send("", make_copy(), smtputf8=False)
    assert outcome.status is Status.DELIVERED
    assert b"MAIL FROM:<>" in plain_server.clear_bytes()


async def test_starttls_then_auth_plain(upstream_server: UpstreamServer, ca_file: str) -> None:
    """smtp:// does STARTTLS, verifies the certificate, then AUTH PLAIN; nothing in clear."""
    outcome = await send_one(config(upstream_server, "smtp", user=USER, ca_file=ca_file))
    assert outcome.status is Status.DELIVERED
    [t] = upstream_server.transactions
    assert (t.tls, t.login) == (True, USER)
    assert upstream_server.auths == [("PLAIN", USER, PASSWORD)]
    clear = upstream_server.clear_bytes()
    assert b"STARTTLS" in clear
    for verb in (b"AUTH", b"MAIL", b"RCPT", b"DATA"):
        assert verb not in clear


async def test_auth_login_when_only_login_is_offered(
    server_tls: ssl.SSLContext, ca_file: str
) -> None:
    """An upstream offering only AUTH LOGIN gets LOGIN."""
    async with UpstreamServer(tls_context=server_tls, auth_mechanisms=["LOGIN"]) as server:
        outcome = await send_one(config(server, "smtp", user=USER, ca_file=ca_file))
    assert outcome.status is Status.DELIVERED
    assert server.auths == [("LOGIN", USER, PASSWORD)]


async def test_implicit_tls(implicit_tls_server: UpstreamServer, ca_file: str) -> None:
    """smtps:// speaks TLS from the first byte: the server never sees a clear byte."""
    cfg = config(implicit_tls_server, "smtps", user=USER, ca_file=ca_file)
    outcome = await send_one(cfg)
    assert outcome.status is Status.DELIVERED
    assert implicit_tls_server.transactions[0].login == USER
    assert implicit_tls_server.clear_bytes() == b""


async def test_auth_in_clear_to_loopback_plain(plain_server: UpstreamServer) -> None:
    """smtp+plain:// may AUTH in clear only because the host is loopback."""
    outcome = await send_one(config(plain_server, user=USER))
    assert outcome.status is Status.DELIVERED
    assert plain_server.transactions[0].login == USER


async def test_xoauth2_token_is_read_at_each_connection(
    upstream_server: UpstreamServer, ca_file: str, tmp_path: Path
) -> None:
    """XOAUTH2 uses the token file as it is when each connection opens."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = config(
        upstream_server,
        "smtp",
        user=USER,
        password="",
        ca_file=ca_file,
        oauth_token_file=str(token_file),
        max_messages_per_connection=1,
    )
    upstream_server.tokens.add("ya29.token-two")
    async with opened(cfg) as upstream:
        first = await upstream.send(SENDER, make_copy(), smtputf8=False)
        token_file.write_text("ya29.token-two\n")
        second = await upstream.send(SENDER, make_copy(), smtputf8=False)
    assert first.status is second.status is Status.DELIVERED
    assert [a[2] for a in upstream_server.auths] == [TOKEN, "ya29.token-two"]
    assert {a[0] for a in upstream_server.auths} == {"XOAUTH2"}


async def test_passthrough_credentials_are_used_and_pooled_apart(
    upstream_server: UpstreamServer, ca_file: str
) -> None:
    """Credentials given to send() replace the configured ones; each set has its own connection."""
    upstream_server.users["app@example.org"] = "app-pw"
    app = Credentials("app@example.org", "app-pw")
    async with opened(config(upstream_server, "smtp", ca_file=ca_file)) as upstream:
        outcomes = [
            await upstream.send(SENDER, make_copy(), smtputf8=False, credentials=app),
            await upstream.send(SENDER, make_copy(), smtputf8=False, credentials=app),
        ]
        outcomes.append(
            await upstream.send(
                SENDER, make_copy(), smtputf8=False, credentials=Credentials(USER, PASSWORD)
            )
        )
    assert all(o.status is Status.DELIVERED for o in outcomes)
    logins = [(t.login, t.connection) for t in upstream_server.transactions]
    assert logins == [("app@example.org", 0), ("app@example.org", 0), (USER, 1)]


# -- the pool ----------------------------------------------------------------------


async def test_pool_reuses_one_connection_for_copies_of_one_message(
    plain_server: UpstreamServer,
) -> None:
    """Two copies sharing one body go over one connection; the shared body is unchanged."""
    data = message("From: news@example.org", "To: a@example.com", body=b".hi\r\n")
    plan = isolate(Envelope.parse(SENDER, ["a@example.com", "b@example.net"]), data)
    body_before = bytes(plan.copies[0].body)
    async with opened(config(plain_server)) as upstream:
        for copy in plan.copies:
            assert (await upstream.send(SENDER, copy, smtputf8=False)).status is Status.DELIVERED
    assert len(plain_server.connections) == 1
    assert plain_server.connections[0].commands()[-1] == "QUIT"  # aclose() QUITs idle ones
    assert [t.content for t in plain_server.transactions] == [bytes(c) for c in plan.copies]
    assert [t.wire for t in plain_server.transactions] == [stuffed(bytes(c)) for c in plan.copies]
    assert bytes(plan.copies[1].body) == body_before


async def test_connection_is_replaced_after_max_messages(plain_server: UpstreamServer) -> None:
    """After max_messages_per_connection transactions the connection QUITs; the next is new."""
    async with opened(config(plain_server, max_messages_per_connection=2)) as upstream:
        for _ in range(3):
            await upstream.send(SENDER, make_copy(), smtputf8=False)
    assert [t.connection for t in plain_server.transactions] == [0, 0, 1]
    assert plain_server.connections[0].commands()[-1] == "QUIT"


async def test_pool_size_bounds_open_connections(plain_server: UpstreamServer) -> None:
    """Ten concurrent sends with pool_size 2 open at most two connections."""
    plain_server.script("DOT", [Delay(0.05, 250)] * 10)
    async with opened(config(plain_server, pool_size=2)) as upstream:
        sends = [upstream.send(SENDER, make_copy(), smtputf8=False) for _ in range(10)]
        outcomes = await asyncio.gather(*sends)
    assert all(o.status is Status.DELIVERED for o in outcomes)
    assert len(plain_server.connections) == 2


async def test_a_full_pool_closes_an_idle_connection_of_other_credentials(
    upstream_server: UpstreamServer, ca_file: str
) -> None:
    """With pool_size 1, a send with other credentials first closes the idle connection."""
    upstream_server.users["app@example.org"] = "app-pw"
    app, own = Credentials("app@example.org", "app-pw"), Credentials(USER, PASSWORD)
    cfg = config(upstream_server, "smtp", ca_file=ca_file, pool_size=1)
    async with opened(cfg) as upstream:
        for credentials in (app, own, app):
            outcome = await upstream.send(
                SENDER, make_copy(), smtputf8=False, credentials=credentials
            )
            assert outcome.status is Status.DELIVERED
            assert "idle=1" in repr(upstream)
    assert [t.connection for t in upstream_server.transactions] == [0, 1, 2]


async def test_rset_after_a_refusal_then_the_connection_is_reused(
    plain_server: UpstreamServer, pipelining: bool
) -> None:
    """A refused RCPT is followed by RSET, and the same connection carries the next copy.

    With PIPELINING, DATA went out with MAIL and RCPT and was refused in turn (RFC 2920).
    """
    plain_server.script("RCPT", [550])
    async with opened(config(plain_server)) as upstream:
        first = await upstream.send(SENDER, make_copy(), smtputf8=False)
        second = await upstream.send(SENDER, make_copy(), smtputf8=False)
    assert (first.status, first.stage, first.code) == (Status.PERMANENT, Stage.RCPT, 550)
    assert second.status is Status.DELIVERED
    assert len(plain_server.connections) == 1
    first_try = ["MAIL", "RCPT", "DATA"] if pipelining else ["MAIL", "RCPT"]
    assert plain_server.connections[0].commands() == [
        "EHLO",
        *first_try,
        "RSET",
        "MAIL",
        "RCPT",
        "DATA",
        "QUIT",
    ]


async def test_reconnect_after_421(plain_server: UpstreamServer) -> None:
    """A 421 drops the connection (no RSET); the next copy opens a new one."""
    plain_server.script("MAIL", [421])
    async with opened(config(plain_server)) as upstream:
        first = await upstream.send(SENDER, make_copy(), smtputf8=False)
        second = await upstream.send(SENDER, make_copy(), smtputf8=False)
    assert (first.status, first.code, first.stage) == (Status.TRANSIENT, 421, Stage.MAIL)
    assert second.status is Status.DELIVERED
    assert len(plain_server.connections) == 2
    assert "RSET" not in plain_server.connections[0].commands()


async def test_a_pooled_connection_the_server_dropped_is_replaced(
    plain_server: UpstreamServer,
) -> None:
    """A pooled connection the server closed (idle, or at MAIL) is replaced, and the copy sent."""
    async with opened(config(plain_server)) as upstream:
        await upstream.send(SENDER, make_copy(), smtputf8=False)
        for protocol in plain_server._protocols:
            assert protocol.transport is not None
            protocol.transport.close()
        await until(lambda: plain_server.open_connections() == 0, "the server's close")
        idle_closed = await upstream.send(SENDER, make_copy(), smtputf8=False)
        plain_server.script("MAIL", [DISCONNECT])
        dropped_at_mail = await upstream.send(SENDER, make_copy(), smtputf8=False)
    assert idle_closed.status is dropped_at_mail.status is Status.DELIVERED
    assert [t.connection for t in plain_server.transactions] == [0, 1, 2]


async def test_cancelled_send_does_not_return_its_connection(plain_server: UpstreamServer) -> None:
    """A send cancelled mid-transaction closes its connection; the pool stays usable."""
    plain_server.script("DOT", [Delay(1.0, 250)])
    async with opened(config(plain_server)) as upstream:
        task = asyncio.ensure_future(upstream.send(SENDER, make_copy(), smtputf8=False))
        await until(lambda: plain_server.delays_begun == 1, "the upstream holding the final dot")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        outcome = await upstream.send(SENDER, make_copy(), smtputf8=False)
        assert "busy=0" in repr(upstream)
    assert outcome.status is Status.DELIVERED
    assert len(plain_server.connections) == 2


# -- classification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "code", "status"),
    [
        ("MAIL", 451, Status.TRANSIENT),
        ("MAIL", 550, Status.PERMANENT),
        ("RCPT", 450, Status.TRANSIENT),
        ("RCPT", 550, Status.PERMANENT),
        ("RCPT", 552, Status.TRANSIENT),  # RFC 5321 4.5.3.1.10
        ("DATA", 451, Status.TRANSIENT),
        ("DATA", 554, Status.PERMANENT),
        ("DOT", 452, Status.TRANSIENT),
        ("DOT", 554, Status.PERMANENT),
    ],
)
async def test_reply_classification(
    plain_server: UpstreamServer, stage: str, code: int, status: Status
) -> None:
    """4xx and 552 at RCPT are transient, other 5xx permanent, with the enhanced code parsed."""
    plain_server.script(stage, [code])
    outcome = await send_one(config(plain_server))
    assert (outcome.status, outcome.stage, outcome.code) == (status, Stage[stage], code)
    assert outcome.enhanced == f"{code // 100}.0.0"
    assert outcome.text == "scripted"
    assert not outcome.ambiguous


async def test_421_at_greeting_is_transient(plain_server: UpstreamServer) -> None:
    """421 at the greeting: transient at CONNECT, nothing sent."""
    plain_server.script("GREETING", ["421 4.3.2 Service shutting down"])
    outcome = await send_one(config(plain_server))
    assert (outcome.status, outcome.stage, outcome.code) == (Status.TRANSIENT, Stage.CONNECT, 421)
    assert outcome.enhanced == "4.3.2"
    assert plain_server.transactions == []


async def test_connection_refused_is_transient() -> None:
    """Nothing listening: transient at CONNECT with code 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = await send_one(UpstreamConfig(url=f"smtp+plain://127.0.0.1:{port}"))
    assert (outcome.status, outcome.stage, outcome.code) == (Status.TRANSIENT, Stage.CONNECT, 0)


async def test_connect_timeout_is_transient() -> None:
    """A server that never greets: transient at CONNECT, code 0, after connect_timeout."""
    silent = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        cfg = UpstreamConfig(url=f"smtp+plain://127.0.0.1:{port}", connect_timeout=0.2)
        outcome = await send_one(cfg)
    finally:
        silent.close()
    assert (outcome.status, outcome.stage, outcome.code) == (Status.TRANSIENT, Stage.CONNECT, 0)
    assert "timed out" in outcome.text.lower()


async def test_disconnect_after_dot_is_ambiguous(plain_server: UpstreamServer) -> None:
    """No reply after the final dot (disconnect): transient, ambiguous, at DOT."""
    plain_server.script("DOT", [DISCONNECT])
    outcome = await send_one(config(plain_server))
    assert (outcome.status, outcome.stage, outcome.code) == (Status.TRANSIENT, Stage.DOT, 0)
    assert outcome.ambiguous
    assert len(plain_server.transactions) == 1  # the server did get the data


async def test_slow_reply_after_dot_times_out_as_ambiguous(plain_server: UpstreamServer) -> None:
    """A reply slower than data_timeout after the dot: transient, ambiguous, at DOT."""
    plain_server.script("DOT", [Delay(1.0, 250)])
    outcome = await send_one(config(plain_server, data_timeout=0.3))
    assert (outcome.status, outcome.stage, outcome.ambiguous) == (Status.TRANSIENT, Stage.DOT, True)


async def test_reply_after_dot_gets_data_timeout_not_command_timeout(
    plain_server: UpstreamServer,
) -> None:
    """The wait after the dot uses data_timeout (RFC 5321 4.5.3.2.6), not command_timeout."""
    plain_server.script("DOT", [Delay(0.4, 250)])
    outcome = await send_one(config(plain_server, command_timeout=0.2, data_timeout=2.0))
    assert outcome.status is Status.DELIVERED


async def test_535_is_transient_and_flags_auth_failed(
    upstream_server: UpstreamServer, ca_file: str
) -> None:
    """Bad credentials (535): transient at AUTH with auth_failed, and no MAIL sent."""
    cfg = config(upstream_server, "smtp", user=USER, password="wrong", ca_file=ca_file)
    outcome = await send_one(cfg)
    assert (outcome.status, outcome.stage, outcome.code) == (Status.TRANSIENT, Stage.AUTH, 535)
    assert outcome.auth_failed and outcome.enhanced == "5.7.8"
    assert "MAIL" not in upstream_server.connections[0].commands()


async def test_missing_starttls_sends_nothing_in_clear(
    upstream_server: UpstreamServer, ca_file: str
) -> None:
    """smtp:// to a server without STARTTLS: transient at TLS; no AUTH or MAIL on the wire."""
    upstream_server.edit_ehlo(remove=["STARTTLS"], add=["AUTH PLAIN LOGIN"])
    outcome = await send_one(config(upstream_server, "smtp", user=USER, ca_file=ca_file))
    assert (outcome.status, outcome.stage) == (Status.TRANSIENT, Stage.TLS)
    clear = upstream_server.clear_bytes()
    assert b"EHLO" in clear
    for verb in (b"AUTH", b"MAIL", b"RCPT", PASSWORD.encode()):
        assert verb not in clear


async def test_refused_starttls_sends_nothing_in_clear(
    upstream_server: UpstreamServer, ca_file: str
) -> None:
    """STARTTLS answered 454: transient at TLS with the code; no AUTH or MAIL follows."""
    upstream_server.script("STARTTLS", ["454 4.7.0 TLS not available"])
    outcome = await send_one(config(upstream_server, "smtp", user=USER, ca_file=ca_file))
    assert (outcome.status, outcome.stage, outcome.code) == (Status.TRANSIENT, Stage.TLS, 454)
    assert upstream_server.connections[0].commands() == ["EHLO", "STARTTLS"]


def _expired(ca: trustme.CA) -> ssl.SSLContext:
    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.issue_cert(
        "127.0.0.1",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    return server_context(leaf)


BAD_CERTIFICATES = {
    "self-signed": lambda ca: self_signed_context(),
    "wrong-host": lambda ca: server_context(ca.issue_cert("mail.example.org")),
    "expired": _expired,
    "unknown-ca": lambda ca: server_context(trustme.CA().issue_cert("127.0.0.1")),
}


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
@pytest.mark.parametrize("kind", sorted(BAD_CERTIFICATES))
async def test_bad_certificate_is_transient_at_tls(
    tls_ca: trustme.CA, ca_file: str, kind: str, scheme: str
) -> None:
    """A self-signed, wrong-host, expired or untrusted certificate: transient at TLS, no AUTH."""
    context = BAD_CERTIFICATES[kind](tls_ca)
    async with UpstreamServer(tls_context=context, implicit_tls=scheme == "smtps") as server:
        outcome = await send_one(config(server, scheme, user=USER, ca_file=ca_file))
    assert (outcome.status, outcome.stage, outcome.code) == (Status.TRANSIENT, Stage.TLS, 0)
    assert "TLS failed" in outcome.text
    assert server.auths == [] and server.transactions == []
    assert b"AUTH" not in server.clear_bytes()


async def test_auth_offered_only_before_tls(upstream_server: UpstreamServer, ca_file: str) -> None:
    """AUTH offered in clear but not after STARTTLS: transient at AUTH; AUTH never sent."""
    upstream_server.edit_ehlo(add=["AUTH PLAIN LOGIN"], tls=False)
    upstream_server.edit_ehlo(remove=["AUTH"], tls=True)
    outcome = await send_one(config(upstream_server, "smtp", user=USER, ca_file=ca_file))
    assert (outcome.status, outcome.stage) == (Status.TRANSIENT, Stage.AUTH)
    assert "after TLS" in outcome.text
    assert "AUTH" not in upstream_server.connections[0].commands()


async def test_missing_smtputf8_upstream_is_permanent_553() -> None:
    """A copy that needs SMTPUTF8 to an upstream without it: permanent 553 5.6.7, no MAIL."""
    async with UpstreamServer(smtputf8=False, auth_require_tls=False) as server:
        copy = make_copy("jürgen@example.com", smtputf8=True)
        async with opened(config(server)) as upstream:
            outcome = await upstream.send(SENDER, copy, smtputf8=True)
    assert (outcome.status, outcome.code, outcome.enhanced) == (Status.PERMANENT, 553, "5.6.7")
    assert "MAIL" not in server.connections[0].commands()


async def test_smtputf8_and_8bitmime_are_declared(plain_server: UpstreamServer) -> None:
    """Non-ASCII recipient and 8-bit body go with MAIL FROM SMTPUTF8 and BODY=8BITMIME."""
    copy = make_copy("jürgen@example.com", body="Grüße\r\n".encode(), smtputf8=True)
    async with opened(config(plain_server)) as upstream:
        outcome = await upstream.send(SENDER, copy, smtputf8=True)
    assert outcome.status is Status.DELIVERED
    [t] = plain_server.transactions
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(t.mail_options)
    assert t.rcpt_tos == ["jürgen@example.com"]
    assert t.content == bytes(copy)


async def test_missing_8bitmime_upstream_is_permanent_554(plain_server: UpstreamServer) -> None:
    """An 8-bit body to an upstream without 8BITMIME: permanent 554 5.6.3, no MAIL."""
    plain_server.edit_ehlo(remove=["8BITMIME", "SMTPUTF8"])
    outcome = await send_one(config(plain_server), make_copy(body="Grüße\r\n".encode()))
    assert (outcome.status, outcome.code, outcome.enhanced) == (Status.PERMANENT, 554, "5.6.3")
    assert "MAIL" not in plain_server.connections[0].commands()


async def test_a_bare_line_feed_is_never_sent(plain_server: UpstreamServer) -> None:
    """A copy holding a bare LF (which inbound already refuses) is refused here too, unsent."""
    recipient = parse_address(RCPT, smtputf8=False)
    assert recipient is not None
    copy = Copy(recipient, b"To: alice@example.com\r\n\r\n", memoryview(b"a\nb\r\n"), ())
    outcome = await send_one(config(plain_server), copy)
    assert (outcome.status, outcome.code, outcome.enhanced) == (Status.PERMANENT, 554, "5.6.0")
    assert plain_server.connections == []


def test_classify_reply_table() -> None:
    """AUTH refusals and CONNECT 5xx are transient; an enhanced code of another class is dropped."""
    assert classify_reply(Stage.AUTH, 454, "4.7.0 Try later") == Outcome(
        Status.TRANSIENT, Stage.AUTH, 454, "4.7.0", "Try later"
    )
    assert classify_reply(Stage.AUTH, 534, "5.7.9 Web login required").auth_failed
    assert classify_reply(Stage.CONNECT, 554, "No service").status is Status.TRANSIENT
    odd = classify_reply(Stage.MAIL, 550, "4.1.1 mismatched\n4.1.1 second")
    assert (odd.status, odd.enhanced, odd.text) == (
        Status.PERMANENT,
        "",
        "4.1.1 mismatched 4.1.1 second",
    )
    multi = classify_reply(Stage.RCPT, 550, "5.1.1 No such user\n5.1.1 here")
    assert (multi.enhanced, multi.text) == ("5.1.1", "No such user here")


# -- check() --------------------------------------------------------------------------


async def test_check_reports_each_step(upstream_server: UpstreamServer, ca_file: str) -> None:
    """check() walks connect, tls, ehlo, auth, all ok, and never shows the password."""
    async with opened(config(upstream_server, "smtp", user=USER, ca_file=ca_file)) as upstream:
        steps = await upstream.check()
    assert [(s.name, s.ok) for s in steps] == [
        ("connect", True),
        ("tls", True),
        ("ehlo", True),
        ("auth", True),
    ]
    assert "TLSv1." in steps[1].detail and "PLAIN" in steps[3].detail
    assert all(PASSWORD not in str(s) for s in steps)
    assert upstream_server.connections[0].commands()[-1] == "QUIT"


async def test_check_stops_at_the_failing_step(
    upstream_server: UpstreamServer, ca_file: str
) -> None:
    """check() reports the first failure (here 535 at auth) with the reply, not the password."""
    cfg = config(upstream_server, "smtp", user=USER, password="wrong-pw", ca_file=ca_file)
    async with opened(cfg) as upstream:
        steps = await upstream.check()
    assert [(s.name, s.ok) for s in steps][-1] == ("auth", False)
    assert "535" in steps[-1].detail and "wrong-pw" not in steps[-1].detail


async def test_check_names_tls_when_starttls_is_missing(
    upstream_server: UpstreamServer, ca_file: str
) -> None:
    """check() against a server without STARTTLS fails at the tls step."""
    upstream_server.edit_ehlo(remove=["STARTTLS"])
    async with opened(config(upstream_server, "smtp", ca_file=ca_file)) as upstream:
        steps = await upstream.check()
    assert [(s.name, s.ok) for s in steps] == [("connect", True), ("tls", False)]


async def test_check_names_connect_when_nothing_listens() -> None:
    """check() with nothing listening fails at the connect step."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with opened(UpstreamConfig(url=f"smtp+plain://127.0.0.1:{port}")) as upstream:
        steps = await upstream.check()
    assert [(s.name, s.ok) for s in steps] == [("connect", False)]


# -- outbox ---------------------------------------------------------------------------


async def test_outbox_writes_the_exact_bytes_atomically(tmp_path: Path) -> None:
    """outbox: one .eml per copy, exact bytes, no address in the name, no temp file left."""
    directory = tmp_path / "new" / "outbox"
    copy = make_copy(rcpts=2)
    async with opened(UpstreamConfig(url=f"outbox:{directory}")) as upstream:
        assert isinstance(upstream, OutboxUpstream)
        outcomes = [await upstream.send(SENDER, copy, smtputf8=False) for _ in range(2)]
    assert outcomes[0] == Outcome(Status.DELIVERED, Stage.WRITE, 250, "2.0.0", outcomes[0].text)
    files = sorted(directory.iterdir())
    assert len(files) == 2 and all(f.suffix == ".eml" for f in files)
    assert all(f.read_bytes() == bytes(copy) for f in files)
    assert all("@" not in f.name and "alice" not in f.name for f in files)


async def test_outbox_write_failure_is_transient(tmp_path: Path) -> None:
    """An outbox path that cannot be a directory: transient at WRITE, nothing left behind."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    async with opened(UpstreamConfig(url=f"outbox:{blocker}")) as upstream:
        outcome = await upstream.send(SENDER, make_copy(), smtputf8=False)
        steps = await upstream.check()
    assert (outcome.status, outcome.stage, outcome.code) == (Status.TRANSIENT, Stage.WRITE, 0)
    assert [(s.name, s.ok) for s in steps] == [("outbox", False)]


async def test_outbox_check_probes_the_directory(tmp_path: Path) -> None:
    """check() on the outbox creates the directory, writes a probe and removes it."""
    async with opened(UpstreamConfig(url=f"outbox:{tmp_path / 'out'}")) as upstream:
        steps = await upstream.check()
    assert [(s.name, s.ok) for s in steps] == [("outbox", True)]
    assert list((tmp_path / "out").iterdir()) == []


# -- URLs and credentials -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtps://user@mail.example.net", Target("smtps", "mail.example.net", 465, "user")),
        ("smtp://user@mail.example.net", Target("smtp", "mail.example.net", 587, "user")),
        ("smtp://mail.example.net:2587", Target("smtp", "mail.example.net", 2587)),
        (
            "SMTPS://a%40example.com@MAIL.example.net:465",
            Target("smtps", "mail.example.net", 465, "a@example.com"),
        ),
        ("smtp+plain://127.0.0.1:25", Target("smtp+plain", "127.0.0.1", 25)),
        ("smtp+plain://localhost", Target("smtp+plain", "localhost", 25)),
        ("smtp+plain://[::1]:2525", Target("smtp+plain", "::1", 2525)),
        (
            "smtps://u:p%3Ass@mail.example.net/",
            Target("smtps", "mail.example.net", 465, "u", "p:ss"),
        ),
        ("outbox:./outbox", Target("outbox", outbox_dir="./outbox")),
    ],
)
def test_parse_good_urls(url: str, expected: Target) -> None:
    """Each URL form parses to its scheme, host, default or given port, and decoded user."""
    assert parse_upstream_url(url, insecure=False) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mail.example.net:587",
        "http://mail.example.net",
        "smtp:mail.example.net",
        "smtp://",
        "smtp://user@",
        "smtp://mail.example.net:0",
        "smtp://mail.example.net:99999",
        "smtp://mail.example.net:abc",
        "smtp://mail.example.net/path",
        "smtp://mail.example.net?x=1",
        "smtp://mail.example.net#frag",
        "smtp://mail .example.net",
        "smtp://mail.example.net\r\n",
        "smtp://mail_example!.net",
        "smtp+plain://mail.example.net:25",
        "smtp://[zz::1]:25",
        "smtp://[::1:25",
        "outbox:",
    ],
)
def test_parse_bad_urls(url: str) -> None:
    """Every malformed or unsafe URL is a ConfigError naming upstream.url."""
    with pytest.raises(ConfigError) as info:
        parse_upstream_url(url, insecure=False)
    assert info.value.key == "upstream.url"
    assert "\n" not in str(info.value)


def test_plain_to_a_remote_host_needs_insecure() -> None:
    """smtp+plain:// to a host that is not loopback parses only with insecure."""
    target = parse_upstream_url("smtp+plain://mail.example.net:25", insecure=True)
    assert target.host == "mail.example.net"


def test_redacted_never_shows_the_password() -> None:
    """Target.redacted() replaces only the password (issue 14 item 4); repr() leaves it out."""
    target = parse_upstream_url("smtps://user:hunter2@mail.example.net", insecure=False)
    assert target.redacted() == "smtps://user:***@mail.example.net:465"
    bare = parse_upstream_url("smtps://user%40example.org@mail.example.net", insecure=False)
    assert bare.redacted() == "smtps://user%40example.org@mail.example.net:465"
    assert "hunter2" not in repr(target)
    v6 = parse_upstream_url("smtp+plain://[::1]:25", insecure=False)
    assert v6.redacted() == "smtp+plain://[::1]:25"


def test_credential_problems_name_their_key(tmp_path: Path) -> None:
    """A user without password, a password without user, unreadable files: ConfigError per key."""
    cases = [
        (UpstreamConfig(url="smtps://user@mail.example.net"), "upstream.password"),
        (UpstreamConfig(url="smtps://mail.example.net", password="pw"), "upstream.url"),
        (
            UpstreamConfig(url="smtps://u@mail.example.net", password_file=str(tmp_path / "no")),
            "upstream.password_file",
        ),
        (
            UpstreamConfig(url="smtps://u@mail.example.net", oauth_token_file=str(tmp_path / "no")),
            "upstream.oauth_token_file",
        ),
        (
            UpstreamConfig(url="smtps://mail.example.net", oauth_token_file=str(tmp_path)),
            "upstream.oauth_token_file",
        ),
        (
            UpstreamConfig(url="smtps://u:p@mail.example.net", ca_file=str(tmp_path / "none.pem")),
            "upstream.ca_file",
        ),
        (
            UpstreamConfig(url="smtp+plain://u@mail.example.net", password="pw", insecure=True),
            "upstream.url",
        ),
    ]
    for cfg, key in cases:
        with pytest.raises(ConfigError) as info:
            open_upstream(cfg)
        assert info.value.key == key, cfg


async def test_password_file_wins_over_password_and_url(
    upstream_server: UpstreamServer, ca_file: str, tmp_path: Path
) -> None:
    """The password comes from password_file, else password, else the URL (newline stripped)."""
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    user = USER.replace("@", "%40")
    base = f"smtp://{user}:url-pw@127.0.0.1:{{port}}"
    for options in (
        {"password_file": str(secret), "password": "wrong"},
        {"password": PASSWORD},
    ):
        cfg = UpstreamConfig(url=base.format(port=upstream_server.port), ca_file=ca_file, **options)
        assert (await send_one(cfg)).status is Status.DELIVERED
    url_only = f"smtp://{user}:{PASSWORD.replace('ä', '%C3%A4')}@127.0.0.1:{upstream_server.port}"
    outcome = await send_one(UpstreamConfig(url=url_only, ca_file=ca_file))
    assert outcome.status is Status.DELIVERED
    assert [a[2] for a in upstream_server.auths] == [PASSWORD] * 3


async def test_pipelining_sends_mail_rcpt_and_data_in_one_write(
    plain_server: UpstreamServer, pipelining: bool
) -> None:
    """Offered PIPELINING: one write for MAIL, RCPT and DATA (half the round trips)."""
    async with opened(config(plain_server)) as upstream:
        for _ in range(2):  # a fresh connection, then a reused one
            outcome = await upstream.send(SENDER, make_copy(), smtputf8=False)
            assert outcome.status is Status.DELIVERED
    chunks = [data for _, data in plain_server.connections[0].chunks]
    together = [c for c in chunks if b"MAIL FROM:" in c and b"RCPT TO:" in c and b"DATA\r\n" in c]
    assert len(together) == (2 if pipelining else 0)
    assert len(plain_server.transactions) == 2


async def test_a_reply_that_is_not_smtp_is_a_transient_failure(
    plain_server: UpstreamServer, pipelining: bool
) -> None:
    """Garbage where a reply should be: not sent, retried later; the connection is dropped."""
    plain_server.script("MAIL", ["this is not an SMTP reply"])
    async with opened(config(plain_server)) as upstream:
        outcome = await upstream.send(SENDER, make_copy(), smtputf8=False)
        assert (outcome.status, outcome.stage) == (Status.TRANSIENT, Stage.MAIL)
        assert not outcome.ambiguous
        again = await upstream.send(SENDER, make_copy(), smtputf8=False)
        assert again.status is Status.DELIVERED
    assert len(plain_server.connections) == 2  # the confused session was not reused
    assert len(plain_server.transactions) == 1


async def test_a_slow_goodbye_does_not_hold_the_outcome(plain_server: UpstreamServer) -> None:
    """The last message of a connection is answered at the provider's 250, not after its
    QUIT: a deadline during a slow goodbye never takes an accepted copy for one in flight."""
    plain_server.script("QUIT", [Delay(30.0, 221)])
    cfg = config(plain_server, max_messages_per_connection=1, command_timeout=5.0)
    async with opened(cfg) as upstream:
        outcome = await asyncio.wait_for(upstream.send(SENDER, make_copy(), smtputf8=False), 2)
        assert outcome.status is Status.DELIVERED
        assert len(plain_server.transactions) == 1


# -- the transaction, as data, and its wire ----------------------------------------------


def test_one_by_one_and_pipelined_send_the_same_commands() -> None:
    """PIPELINING changes how the commands are grouped into writes, never their bytes."""
    copy = make_copy()
    body = prepare_body(copy.body)
    assert body is not None
    plain = commands({"size"}, SENDER, copy, body, smtputf8=False)
    pipelined = commands({"size", "pipelining"}, SENDER, copy, body, smtputf8=False)
    assert isinstance(plain, Commands) and isinstance(pipelined, Commands)
    assert plain.mail == f"MAIL FROM:<{SENDER}> SIZE={copy.size}\r\n".encode()
    assert plain.rcpt == f"RCPT TO:<{RCPT}>\r\n".encode()
    assert [stages for stages, _ in plain.writes] == [(Stage.MAIL,), (Stage.RCPT,), (Stage.DATA,)]
    assert [stages for stages, _ in pipelined.writes] == [(Stage.MAIL, Stage.RCPT, Stage.DATA)]
    assert b"".join(d for _, d in plain.writes) == b"".join(d for _, d in pipelined.writes)
    with pytest.raises(ValueError, match="control character"):
        commands(set(), "a\r\nRSET@example.org", copy, body, smtputf8=False)


def test_the_first_refusal_decides() -> None:
    ok, opened = Reply(250, "ok"), Reply(354, "go on")
    assert refusal([ok, Reply(251, "forwarded"), opened]) is None
    assert refusal([Reply(550, "no"), Reply(554, "no rcpt"), opened]) == (
        Stage.MAIL,
        Reply(550, "no"),
    )
    assert refusal([ok, Reply(452, "full")]) == (Stage.RCPT, Reply(452, "full"))
    assert refusal([ok, ok, Reply(503, "no")]) == (Stage.DATA, Reply(503, "no"))
    assert data_opened([ok, Reply(550, "no"), opened])  # pipelined: close it empty
    assert not data_opened([ok, Reply(550, "no")])


def test_the_parser_reads_replies_however_the_reads_split_them() -> None:
    """Multi-line replies, split at every byte, come out whole and in order."""
    stream = b"250-first\r\n250-second line\r\n250 third\r\n354 go on\n221 2.0.0 bye\r\n"
    expected = [
        Reply(250, "first\nsecond line\nthird"),
        Reply(354, "go on"),
        Reply(221, "2.0.0 bye"),
    ]
    for cut in range(len(stream) + 1):
        parser = ReplyParser()
        first, problem = parser.feed(stream[:cut])
        rest, later = parser.feed(stream[cut:])
        assert (first + rest, problem, later) == (expected, None, None)


def test_the_parser_refuses_what_is_not_a_reply() -> None:
    replies, problem = ReplyParser().feed(b"250 ok\r\nthis is not smtp\r\n")
    assert (replies, problem) == ([Reply(250, "ok")], "malformed reply")  # what came before stays
    assert ReplyParser().feed(b"25x ok\r\n") == ([], "malformed reply")
    assert ReplyParser().feed(b"250_ok\r\n") == ([], "malformed reply")
    endless = b"250-" + b"x" * MAX_REPLY_OCTETS  # no line end: never buffered past the limit
    assert ReplyParser().feed(endless) == ([], "reply too long")
    many = b"250-more\r\n" * (MAX_REPLY_LINES + 1)
    assert ReplyParser().feed(many) == ([], "reply too long")


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(script: Script, heard: list[bytes]) -> AsyncIterator[SMTP]:
    """An aiosmtplib connection to a loopback server that greets, runs ``script``, then
    answers what aiosmtplib sends (NOOP 250, QUIT 221); ``heard`` gets every line read."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 wire.test ready\r\n")
        try:
            await script(reader, writer)
            while line := await reader.readline():
                heard.append(line)
                writer.write(b"221 2.0.0 bye\r\n" if line == b"QUIT\r\n" else b"250 2.0.0 here\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    smtp = SMTP(hostname="127.0.0.1", port=port, use_tls=False, start_tls=False, timeout=5)
    try:
        await smtp.connect()
        yield smtp
    finally:
        smtp.close()
        server.close()
        await server.wait_closed()


async def pause(writer: asyncio.StreamWriter) -> None:
    await writer.drain()
    await asyncio.sleep(0.05)  # the client reads what was written so far on its own


async def test_the_reader_takes_split_replies_then_gives_the_connection_back() -> None:
    """Multi-line and split replies off a real socket; after the transaction the
    aiosmtplib session is whole again: a command of its own, then QUIT."""
    heard: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.readline())
        heard.append(await reader.readline())
        writer.write(b"250-first\r\n250-sec")
        await pause(writer)
        writer.write(b"ond\r\n250 third\r\n2")
        await pause(writer)
        writer.write(b"51 2.1.5 ok\r\n")

    async with scripted(script, heard) as smtp:
        wire = Reader.borrow(smtp)
        wire.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
        assert await wire.reply(5) == Reply(250, "first\nsecond\nthird")
        assert await wire.reply(5) == Reply(251, "2.1.5 ok")
        wire.give_back()
        assert wire.error is None and smtp.is_connected
        noop = await smtp.execute_command(b"NOOP")  # aiosmtplib's own protocol again
        assert (noop.code, noop.message) == (250, "2.0.0 here")
        assert (await smtp.quit()).code == 221
    assert heard == [
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<b@example.com>\r\n",
        b"NOOP\r\n",
        b"QUIT\r\n",
    ]


async def test_the_reader_fails_on_garbage_and_a_reply_too_long() -> None:
    """A malformed or endless reply is an error (code -1) after the good replies before it."""
    for garbage, problem in [
        (b"this is not smtp\r\n", "malformed reply"),
        (b"250-" + b"x" * (MAX_REPLY_OCTETS + 10), "reply too long"),
    ]:

        async def script(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, garbage: bytes = garbage
        ) -> None:
            await reader.readline()
            writer.write(b"250 ok\r\n" + garbage)
            await pause(writer)

        async with scripted(script, []) as smtp:
            wire = Reader.borrow(smtp)
            wire.write(b"MAIL FROM:<>\r\n")
            assert await wire.reply(5) == Reply(250, "ok")
            with pytest.raises(SMTPResponseException) as refused:
                await wire.reply(5)
            assert (refused.value.code, refused.value.message) == (-1, problem)
            with pytest.raises(SMTPResponseException):
                wire.write(b"RCPT TO:<b@example.com>\r\n")  # nothing more goes out
            wire.give_back()


async def test_the_reader_sees_the_connection_end_mid_transaction() -> None:
    """EOF after MAIL's reply: the next reply and any write raise; the session is done."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"250 ok\r\n")
        await writer.drain()
        writer.close()

    async with scripted(script, []) as smtp:
        wire = Reader.borrow(smtp)
        wire.write(b"MAIL FROM:<>\r\n")
        assert await wire.reply(5) == Reply(250, "ok")
        with pytest.raises(SMTPServerDisconnected):
            await wire.reply(5)
        with pytest.raises(SMTPServerDisconnected):
            wire.write(b"RCPT TO:<b@example.com>\r\n")
        wire.give_back()
        assert wire.error is not None and not smtp.is_connected
        with pytest.raises(SMTPServerDisconnected):
            Reader.borrow(smtp)  # nothing left to borrow


async def test_the_reader_times_out_on_a_silent_server() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # and never answers

    async with scripted(script, []) as smtp:
        wire = Reader.borrow(smtp)
        wire.write(b"MAIL FROM:<>\r\n")
        with pytest.raises(TimeoutError):
            await wire.reply(0.2)
        wire.give_back()


def test_the_installed_aiosmtplib_is_a_version_the_wire_was_checked_against() -> None:
    installed = importlib.metadata.version("aiosmtplib")
    assert installed in AIOSMTPLIB_CHECKED, (
        f"aiosmtplib {installed}: read Reader.borrow against it, then add it to AIOSMTPLIB_CHECKED"
    )
