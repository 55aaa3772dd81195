"""SPEC 9's hostile inputs against the inbound side: a real relay, raw bytes, a recording upstream.

Every case asserts the reply the client sees (SPEC 8) and what the upstream
received: never a transaction for a smuggled recipient, and never a bare CR,
bare LF or NUL in any byte the upstream was sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import pytest

from relay.inbound.smtp import with_enhanced_code
from relay.intake import Intake
from relay.server import Relay
from tests.conftest import message
from tests.relay_harness import RawClient, running_relay, until
from tests.upstream_server import UpstreamServer

SENDER = "app@example.org"
RCPT = "alice@example.com"
OTHER = "bob@example.com"
VICTIM = "victim@example.net"
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")
CRLF = b"\r\n"
END = b"\r\n.\r\n"
SMUGGLED = (
    b"MAIL FROM:<attacker@example.org>\r\n"
    b"RCPT TO:<victim@example.net>\r\n"
    b"DATA\r\n"
    b"From: attacker@example.org\r\n"
    b"To: victim@example.net\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"smuggled\r\n"
)
FAKE_ENDS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
]
NORMALIZE = {"RELAY_ISOLATION_NORMALIZE_LINE_ENDINGS": "true"}


def letter(*extra: str, body: bytes = b"Hello.\r\n", to: str = RCPT) -> bytes:
    """A well-formed message for ``to`` (unstuffed); ``extra`` header lines go after Subject."""
    return message(f"From: App <{SENDER}>", f"To: {to}", "Subject: hostile", *extra, body=body)


def stuff(data: bytes) -> bytes:
    """``data`` dot-stuffed and terminated, as a client puts it after DATA."""
    return re.sub(rb"(?m)^\.", b"..", data) + b".\r\n"


def upstream_bytes(server: UpstreamServer) -> bytes:
    return b"".join(bytes(c.wire) for c in server.connections)


def assert_upstream_clean(server: UpstreamServer, *absent: bytes) -> None:
    """No bare CR, bare LF or NUL upstream; no victim; none of ``absent`` anywhere."""
    wire = upstream_bytes(server)
    assert BARE.search(wire) is None, BARE.search(wire)
    for t in server.transactions:
        assert VICTIM not in [r.lower() for r in t.rcpt_tos]
    for needle in absent:
        assert needle not in wire


def without_received(content: bytes) -> bytes:
    """The copy minus the relay's leading ``Received:`` field (and its folded lines)."""
    assert content.startswith(b"Received: ")
    at = 0
    while True:
        at = content.index(CRLF, at) + 2
        if content[at : at + 1] not in (b" ", b"\t"):
            return content[at:]


@contextlib.asynccontextmanager
async def relay_for(
    tmp_path: Path, server: UpstreamServer, env: Mapping[str, str] | None = None
) -> AsyncIterator[Relay]:
    async with running_relay(tmp_path, server.url(), env) as relay:
        yield relay


async def ehlo(relay: Relay, name: str = "client.example.com") -> RawClient:
    client = await RawClient.connect(relay.smtp_port)
    reply = await client.command(f"EHLO {name}")
    assert reply.startswith("250"), reply
    return client


async def quit_cleanly(client: RawClient) -> None:
    """QUIT; the relay's only remaining output is one 221 (no reply to anything smuggled)."""
    await client.send(b"QUIT\r\n")
    data = await asyncio.wait_for(client.reader.read(), 5)
    await client.close()
    assert re.fullmatch(rb"221 [^\r\n]*\r\n", data), data


async def envelope(client: RawClient, rcpts: Iterable[str] = (RCPT,), sender: str = SENDER) -> None:
    reply = await client.command(f"MAIL FROM:<{sender}>")
    assert reply.startswith("250 2.1.0"), reply
    for rcpt in rcpts:
        reply = await client.command(f"RCPT TO:<{rcpt}>")
        assert reply.startswith("250 2.1.5"), reply


async def send_data(client: RawClient, raw: bytes) -> str:
    """DATA, then ``raw`` exactly (already stuffed and terminated); the final reply."""
    reply = await client.command("DATA")
    assert reply.startswith("354"), reply
    await client.send(raw)
    return await client.reply()


async def segments(client: RawClient, raw: bytes, sizes: Iterable[int]) -> None:
    """Send ``raw`` in separate TCP segments of the given sizes (cycled), pausing between."""
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sizes = list(sizes)
    at, i = 0, 0
    while at < len(raw):
        size = sizes[i % len(sizes)]
        await client.send(raw[at : at + size])
        await asyncio.sleep(0.002)
        at += size
        i += 1


# -- fake ends of data (SMTP smuggling) -------------------------------------------


def smuggling_data(fake: bytes) -> bytes:
    """A message whose body holds ``fake`` then a whole smuggled transaction, then the real end."""
    return letter(body=b"Body line" + fake + SMUGGLED)[:-2] + END


@pytest.mark.parametrize("fake", FAKE_ENDS, ids=repr)
async def test_fake_end_of_data_is_refused_after_real_end(
    plain_server: UpstreamServer, tmp_path: Path, fake: bytes
) -> None:
    """A fake end of data is content: 550 5.5.2 after the real end, nothing smuggled runs."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        await envelope(client)
        reply = await send_data(client, smuggling_data(fake))
        assert reply.startswith("550 5.5.2"), reply
        await quit_cleanly(client)
    assert plain_server.transactions == []
    assert_upstream_clean(plain_server, b"victim", b"attacker")


@pytest.mark.parametrize("fake", FAKE_ENDS, ids=repr)
async def test_fake_end_of_data_in_tiny_segments(
    plain_server: UpstreamServer, tmp_path: Path, fake: bytes
) -> None:
    """Sent in 1-3 byte TCP segments, a fake end of data is still content: 550 5.5.2."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        await envelope(client)
        assert (await client.command("DATA")).startswith("354")
        data = smuggling_data(fake)
        start = data.index(b"Body line")
        await client.send(data[:start])
        await segments(client, data[start:], (1, 2, 3))
        reply = await client.reply()
        assert reply.startswith("550 5.5.2"), reply
        await quit_cleanly(client)
    assert plain_server.transactions == []
    assert_upstream_clean(plain_server, b"victim", b"attacker")


@pytest.mark.parametrize("fake", FAKE_ENDS, ids=repr)
async def test_fake_end_of_data_with_normalize(
    plain_server: UpstreamServer, tmp_path: Path, fake: bytes
) -> None:
    """With normalize, the smuggled text is body content, dot-stuffed upstream (NUL: 550 5.5.2)."""
    async with relay_for(tmp_path, plain_server, NORMALIZE) as relay:
        client = await ehlo(relay)
        await envelope(client)
        reply = await send_data(client, smuggling_data(fake))
        if b"\x00" in fake:
            assert reply.startswith("550 5.5.2"), reply
            assert plain_server.transactions == []
        else:
            assert reply.startswith("250 2.0.0"), reply
            [t] = plain_server.transactions
            assert (t.mail_from, t.rcpt_tos) == (SENDER, [RCPT])
            assert b"RCPT TO:<victim@example.net>\r\n" in t.content
            assert t.wire == stuff(t.content)
            assert t.wire.index(END) == len(t.wire) - len(END)  # the only end is the real one
        await quit_cleanly(client)
    assert_upstream_clean(plain_server)


@pytest.mark.parametrize("split", [1, 2, 3, 4])
async def test_end_of_data_split_across_segments(
    plain_server: UpstreamServer, tmp_path: Path, split: int
) -> None:
    """CRLF.CRLF split over two segments (e.g. "\\r\\n." then "\\r\\n") still ends the data."""
    data = letter(body=b"split end\r\n")
    raw = stuff(data)
    cut = len(raw) - len(END) + split
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        await envelope(client)
        assert (await client.command("DATA")).startswith("354")
        await segments(client, raw[:cut], [len(raw)])
        await segments(client, raw[cut:], [len(raw)])
        reply = await client.reply()
        assert reply.startswith("250 2.0.0"), reply
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert without_received(t.content) == data
    assert_upstream_clean(plain_server)


async def test_dot_stuffed_lines_arrive_stuffed_again(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """ "..leading dot" and ".." are unstuffed in content and stuffed again exactly upstream."""
    body = b".leading dot\r\n.\r\nmiddle\r\n..two\r\n.\r\n"
    data = letter(body=body)
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        await envelope(client)
        raw = stuff(data)
        assert b"\r\n..leading dot\r\n..\r\nmiddle\r\n...two\r\n..\r\n.\r\n" in raw
        reply = await send_data(client, raw)
        assert reply.startswith("250 2.0.0"), reply
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert t.content.endswith(b"\r\n\r\n" + body)
    assert without_received(t.content) == data
    assert t.wire == stuff(t.content)
    assert t.wire.endswith(b"\r\n..leading dot\r\n..\r\nmiddle\r\n...two\r\n..\r\n.\r\n")
    assert_upstream_clean(plain_server)


# -- session-level abuse -------------------------------------------------------------


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def test_commands_pipelined_behind_starttls_are_discarded(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """Commands sent in clear in the STARTTLS packet are discarded (RFC 3207 4.2), never run."""
    async with relay_for(tmp_path, plain_server, {"RELAY_SMTP_STARTTLS": "self-signed"}) as relay:
        client = await ehlo(relay)
        smuggled = (
            b"STARTTLS\r\nMAIL FROM:<attacker@example.org>\r\nRCPT TO:<victim@example.net>\r\n"
            b"DATA\r\n" + stuff(letter(to=VICTIM)) + b"QUIT\r\n"
        )
        assert len(smuggled) < 1000  # one segment, all in the relay's buffer at STARTTLS
        await client.send(smuggled)
        assert (await client.reply()).startswith("220")
        await client.writer.start_tls(client_tls())
        # The first reply inside TLS answers the first command sent inside TLS.
        reply = await client.command("EHLO client.example.com")
        assert reply.startswith("250-"), reply
        assert "STARTTLS" not in reply
        reply = await client.command(f"RCPT TO:<{RCPT}>")
        assert reply.startswith("503"), reply  # the clear MAIL never happened
        await envelope(client)
        reply = await send_data(client, stuff(letter()))
        assert reply.startswith("250 2.0.0"), reply
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert t.rcpt_tos == [RCPT]
    assert_upstream_clean(plain_server, b"victim", b"attacker")


async def test_auth_before_tls_off_loopback_needs_tls(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """On a non-loopback listener, AUTH in clear gets 538 5.7.11 and is not offered."""
    users = tmp_path / "users"
    users.write_text("app:s3cret\n", encoding="utf-8")
    env = {
        "RELAY_LISTEN": "0.0.0.0:0",
        "RELAY_SMTP_ALLOW_NETWORKS": "127.0.0.0/8",
        "RELAY_SMTP_AUTH": "users",
        "RELAY_SMTP_USERS_FILE": str(users),
        "RELAY_SMTP_STARTTLS": "self-signed",
    }
    async with relay_for(tmp_path, plain_server, env) as relay:
        client = await RawClient.connect(relay.smtp_port)
        reply = await client.command("EHLO client.example.com")
        assert "AUTH" not in reply
        plain = base64.b64encode(b"\x00app\x00s3cret").decode()
        for command in (f"AUTH PLAIN {plain}", "AUTH LOGIN"):
            reply = await client.command(command)
            assert reply.startswith("538 5.7.11"), reply
        await quit_cleanly(client)
    assert plain_server.connections == []


@pytest.mark.parametrize(
    ("mail", "rcpt"),
    [
        (f"MAIL FROM:<{SENDER}> RET=FULL ENVID=x", None),
        (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPT}> NOTIFY=NEVER"),
        (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPT}> ORCPT=rfc822;{RCPT}"),
    ],
    ids=["mail-ret-envid", "rcpt-notify", "rcpt-orcpt"],
)
async def test_dsn_parameters_are_refused(
    plain_server: UpstreamServer, tmp_path: Path, mail: str, rcpt: str | None
) -> None:
    """DSN parameters (RFC 3461) are refused with 5xx; DATA then has no recipient."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        reply = await client.command(mail)
        if rcpt is None:
            assert reply.startswith("555"), reply
            reply = await client.command(f"RCPT TO:<{RCPT}>")
            assert reply.startswith("503"), reply
        else:
            assert reply.startswith("250 2.1.0"), reply
            reply = await client.command(rcpt)
            assert reply.startswith("555"), reply
        assert (await client.command("DATA")).startswith("503 5.5.1")
        await quit_cleanly(client)
    assert plain_server.connections == []


async def test_size_parameter_too_big(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """MAIL with SIZE= over the limit gets 552 5.3.4; a fitting SIZE= then works."""
    async with relay_for(tmp_path, plain_server, {"RELAY_SMTP_MAX_MESSAGE_SIZE": "2000"}) as relay:
        client = await ehlo(relay)
        assert "250-SIZE 2000" in await client.command("EHLO client.example.com")
        reply = await client.command(f"MAIL FROM:<{SENDER}> SIZE=2001")
        assert reply.startswith("552 5.3.4"), reply
        reply = await client.command(f"RCPT TO:<{RCPT}>")
        assert reply.startswith("503"), reply
        reply = await client.command(f"MAIL FROM:<{SENDER}> SIZE=100")
        assert reply.startswith("250 2.1.0"), reply
        await quit_cleanly(client)
    assert plain_server.connections == []


async def test_data_over_size_limit(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """DATA over the size limit: 552 5.3.4 after the data, nothing sent, session still usable."""
    async with relay_for(tmp_path, plain_server, {"RELAY_SMTP_MAX_MESSAGE_SIZE": "2000"}) as relay:
        client = await ehlo(relay)
        await envelope(client)
        big = letter(body=b"x" * 70 + b"\r\n" + (b"y" * 78 + b"\r\n") * 100)
        reply = await send_data(client, stuff(big))
        assert reply.startswith("552 5.3.4"), reply
        await envelope(client)
        small = letter(body=b"fits\r\n")
        reply = await send_data(client, stuff(small))
        assert reply.startswith("250 2.0.0"), reply
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert without_received(t.content) == small
    assert_upstream_clean(plain_server, b"yyyy")


async def test_ten_thousand_recipients(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """10,000 pipelined RCPTs: 1000 kept, the rest 452 4.5.3; exactly 1000 copies delivered."""
    rcpts = [f"user{i}@example.com" for i in range(10_000)]
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250 2.1.0")
        replies: list[str] = []
        for at in range(0, len(rcpts), 500):
            batch = rcpts[at : at + 500]
            await client.send(b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in batch))
            replies.extend([await client.reply() for _ in batch])
        assert all(r.startswith("250 2.1.5") for r in replies[:1000])
        assert all(r.startswith("452 4.5.3") for r in replies[1000:])
        reply = await send_data(client, stuff(letter(to="Customers: ;")))
        assert reply.startswith("250 2.0.0"), reply
        await quit_cleanly(client)
    delivered = [r for t in plain_server.transactions for r in t.rcpt_tos]
    assert sorted(delivered) == sorted(rcpts[:1000])
    assert all(len(t.rcpt_tos) == 1 for t in plain_server.transactions)
    assert_upstream_clean(plain_server, b"user1000@")


async def test_thousand_noops_cut_the_session(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """NOOPs past the per-session limit (100) end the session with 421 4.7.0."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        await client.send(b"NOOP\r\n" * 100)
        replies = [await client.reply() for _ in range(100)]
        assert all(r.startswith("250") for r in replies)
        reply = await client.command("NOOP")
        assert reply.startswith("421 4.7.0"), reply
        with contextlib.suppress(ConnectionError):
            await client.send(b"NOOP\r\n" * 899)
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()
    assert plain_server.connections == []


@pytest.mark.parametrize(("ehlos", "length"), [(1, 600), (10, 600), (1, 5000)])
async def test_600_byte_mail_command(
    plain_server: UpstreamServer, tmp_path: Path, ehlos: int, length: int
) -> None:
    """A 600-byte (or longer) MAIL line gets 500, however many EHLOs came before; nothing kept."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await RawClient.connect(relay.smtp_port)
        for _ in range(ehlos):
            assert (await client.command("EHLO client.example.com")).startswith("250")
        line = f"MAIL FROM:<{SENDER}> SMTPUTF8 SIZE=100"
        line += " " * (length - len(line))
        reply = await client.command(line)
        assert reply.startswith("500"), reply
        assert "too long" in reply
        reply = await client.command(f"RCPT TO:<{RCPT}>")
        assert reply.startswith("503"), reply
        assert (await client.command("DATA")).startswith("503 5.5.1")
        await quit_cleanly(client)
    assert plain_server.connections == []


async def test_data_before_rcpt(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """DATA with no recipient (before or after MAIL) gets 503 5.5.1; the data is not read."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        assert (await client.command("DATA")).startswith("503 5.5.1")
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250 2.1.0")
        assert (await client.command("DATA")).startswith("503 5.5.1")
        await quit_cleanly(client)
    assert plain_server.connections == []


async def test_idle_client_is_cut(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """An idle client gets 421 4.4.2 after the idle timeout, then the connection closes."""
    async with relay_for(tmp_path, plain_server, {"RELAY_SMTP_IDLE_TIMEOUT": "0.5"}) as relay:
        client = await ehlo(relay)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await client.reply(timeout=5)
        assert reply.startswith("421 4.4.2"), reply
        assert 0.3 < loop.time() - started < 3
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()
    assert plain_server.connections == []


async def test_client_stalling_in_data_is_cut(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """A client that stops sending mid-DATA gets 421 4.4.2; nothing of the message is sent."""
    env = {"RELAY_SMTP_IDLE_TIMEOUT": "0.5", "RELAY_SMTP_DATA_TIMEOUT": "0.5"}
    async with relay_for(tmp_path, plain_server, env) as relay:
        client = await ehlo(relay)
        await envelope(client)
        assert (await client.command("DATA")).startswith("354")
        await client.send(letter()[:40])
        reply = await client.reply(timeout=5)
        assert reply.startswith("421 4.4.2"), reply
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()
    assert plain_server.connections == []


async def test_client_trickling_one_byte_at_a_time(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """Commands and data one byte per segment work; the copy is byte-exact."""
    data = letter("X-Trickle: one byte at a time", body=b"a\r\n..b\r\nc\r\n")
    async with relay_for(tmp_path, plain_server) as relay:
        client = await RawClient.connect(relay.smtp_port)
        replies = []
        for command in (
            b"EHLO client.example.com\r\n",
            f"MAIL FROM:<{SENDER}>\r\n".encode(),
            f"RCPT TO:<{RCPT}>\r\n".encode(),
            b"DATA\r\n",
            stuff(data),
        ):
            await segments(client, command, [1])
            replies.append(await client.reply())
        assert [r[:3] for r in replies] == ["250", "250", "250", "354", "250"], replies
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert without_received(t.content) == data
    assert t.wire == stuff(t.content)
    assert_upstream_clean(plain_server)


async def _greeting(port: int, timeout: float) -> tuple[str, RawClient]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        line = b"(no greeting)"
    return line.decode().rstrip("\r\n"), RawClient(reader, writer)


async def test_500_connections_at_once(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """500 connections at once, limit 100: 400 get 421 4.7.0 promptly; closing frees the count."""
    async with relay_for(tmp_path, plain_server, {"RELAY_SMTP_MAX_CONNECTIONS": "100"}) as relay:
        opened = await asyncio.gather(*(_greeting(relay.smtp_port, 3) for _ in range(500)))
        greetings = [g for g, _ in opened]
        assert sum(g.startswith("220 ") for g in greetings) == 100, set(greetings)
        refused = [c for g, c in opened if g.startswith("421 4.7.0")]
        assert len(refused) == 400, set(greetings)
        for client in refused:  # each refused connection is closed after its 421
            assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await asyncio.gather(*(c.close() for _, c in opened))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:  # the relay counts closed sessions out as it notices them
            greeting, client = await _greeting(relay.smtp_port, 3)
            if greeting.startswith("220 ") or loop.time() > deadline:
                break
            await client.close()
            await asyncio.sleep(0.05)
        assert greeting.startswith("220 "), greeting
        assert (await client.command("EHLO client.example.com")).startswith("250")
        await envelope(client)
        assert (await send_data(client, stuff(letter()))).startswith("250 2.0.0")
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert t.rcpt_tos == [RCPT]


async def test_clients_that_close_before_the_greeting_free_their_slot(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """Connect and close at once, greeting unread (a TCP health probe): no slot stays taken.

    On uvloop, aiosmtpd left such a session half-open for ever (its handler cancelled
    at EOF while still sending the greeting), so each probe used up a connection slot
    and shutdown waited out its whole grace time.
    """
    async with relay_for(tmp_path, plain_server, {"RELAY_SMTP_MAX_CONNECTIONS": "5"}) as relay:

        def probe() -> None:  # from another thread, as a probe from another process would
            for _ in range(20):
                socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=5).close()

        await asyncio.to_thread(probe)
        await until(lambda: relay.open_sessions == 0, "every probe's session closed", timeout=5)
        client = await ehlo(relay)  # a slot is free
        await quit_cleanly(client)


# -- envelope addresses ---------------------------------------------------------------


BAD_RCPTS = [
    (b"RCPT TO:<a\rb@example.com>", "553 5.1.3"),
    (b"RCPT TO:<a\x00b@example.com>", "553 5.1.3"),
    (b"RCPT TO:<a\x7fb@example.com>", "553 5.1.3"),
    (b'RCPT TO:<"x\rBcc: y"@example.com>', "553 5.1.3"),
    (b'RCPT TO:<"a,b@evil"@example.com>', "553 5.1.3"),
    (b'RCPT TO:<"<evil@x>"@example.com>', "553 5.1.3"),
    (b'RCPT TO:<"a\\"b"@example.com>', "553 5.1.3"),
    (b"RCPT TO:<@a.example.com,@b.example.com:u@example.com>", "553 5.1.3"),
    (b"RCPT TO:<u@[192.0.2.1]>", "553 5.1.3"),
    (b"RCPT TO:<u@[IPv6:2001:db8::1]>", "553 5.1.3"),
    (b"RCPT TO:<u(c)@example.com>", "553 5.1.3"),
    (b"RCPT TO:<u@example.com(c)>", "553 5.1.3"),
    (b"RCPT TO:<" + b"l" * 65 + b"@example.com>", "553 5.1.3"),
    ("RCPT TO:<jörg@example.com>".encode(), "553 5.6.7"),
    ("RCPT TO:<u@bücher.example.com>".encode(), "553 5.6.7"),
    (b"RCPT TO:<>", "553 5.1.3"),
]


@pytest.mark.parametrize(("line", "expected"), BAD_RCPTS, ids=lambda v: repr(v)[:40])
async def test_bad_recipient_address(
    plain_server: UpstreamServer, tmp_path: Path, line: bytes, expected: str
) -> None:
    """A bad RCPT address is refused (553 5.1.3, or 5.6.7 for non-ASCII); it never goes upstream."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250 2.1.0")
        reply = await client.command(line)
        assert reply.startswith(expected), reply
        assert (await client.command(f"RCPT TO:<{RCPT}>")).startswith("250 2.1.5")
        assert (await send_data(client, stuff(letter()))).startswith("250 2.0.0")
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert t.rcpt_tos == [RCPT]
    assert_upstream_clean(plain_server, b"evil", b"Bcc", b"192.0.2.1", b"(c)", b"lllll")


BAD_SENDERS = [
    (b"MAIL FROM:<a\rb@example.org>", "553 5.1.3"),
    (b"MAIL FROM:<a\x00b@example.org>", "553 5.1.3"),
    (b'MAIL FROM:<"x\rBcc: y"@example.org>', "553 5.1.3"),
    (b'MAIL FROM:<"<evil@x>"@example.org>', "553 5.1.3"),
    (b"MAIL FROM:<@a.example.com:u@example.org>", "553 5.1.3"),
    (b"MAIL FROM:<u@[192.0.2.1]>", "553 5.1.3"),
    (b"MAIL FROM:<u(c)@example.org>", "553 5.1.3"),
    ("MAIL FROM:<jörg@example.org>".encode(), "553 5.6.7"),
]


@pytest.mark.parametrize(("line", "expected"), BAD_SENDERS, ids=lambda v: repr(v)[:40])
async def test_bad_sender_address(
    plain_server: UpstreamServer, tmp_path: Path, line: bytes, expected: str
) -> None:
    """A bad MAIL address is refused (553 5.1.3, or 5.6.7 for non-ASCII); no transaction opens."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        reply = await client.command(line)
        assert reply.startswith(expected), reply
        assert (await client.command(f"RCPT TO:<{RCPT}>")).startswith("503")
        await quit_cleanly(client)
    assert plain_server.connections == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"RCPT TO:<x\nRCPT TO:<victim@example.net>\r\n", "553 5.1.3"),
        (b"RCPT TO:<victim@example.net\n>\r\n", "553 5.1.3"),
        (b"RCPT TO:<x@example.com>\nRCPT TO:<victim@example.net>\r\n", "501"),
    ],
    ids=["inside-address", "before-bracket", "after-bracket"],
)
async def test_bare_lf_in_address_smuggles_no_command(
    plain_server: UpstreamServer, tmp_path: Path, line: bytes, expected: str
) -> None:
    """A bare LF does not end a RCPT line: the whole line is refused, no second command runs."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250 2.1.0")
        await client.send(line)
        reply = await client.reply()
        assert reply.startswith(expected), reply
        # The next reply answers the next command: nothing else was run in between.
        assert (await client.command(f"RCPT TO:<{RCPT}>")).startswith("250 2.1.5")
        assert (await send_data(client, stuff(letter()))).startswith("250 2.0.0")
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert t.rcpt_tos == [RCPT]
    assert_upstream_clean(plain_server, b"victim")


async def test_non_ascii_address_with_smtputf8(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """With SMTPUTF8, a non-ASCII sender and recipient are accepted and sent upstream as given."""
    rcpt = "jörg@bücher.example.com"
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        reply = await client.command("MAIL FROM:<grüße@example.org> SMTPUTF8")
        assert reply.startswith("250 2.1.0"), reply
        assert (await client.command(f"RCPT TO:<{rcpt}>")).startswith("250 2.1.5")
        data = message("From: grüße@example.org", f"To: {rcpt}", "Subject: utf8")
        assert (await send_data(client, stuff(data))).startswith("250 2.0.0")
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert (t.mail_from, t.rcpt_tos) == ("grüße@example.org", [rcpt])
    assert "SMTPUTF8" in t.mail_options
    assert_upstream_clean(plain_server)


@pytest.mark.parametrize(
    ("first", "second", "smtputf8"),
    [
        ("bob@example.com", "bob@EXAMPLE.COM", False),
        ("bob@Example.Com", "bob@example.com", False),
        ("bob@bücher.example.com", "bob@xn--bcher-kva.example.com", True),
        ("bob@xn--bcher-kva.example.com", "bob@BÜCHER.example.com", True),
    ],
    ids=["case", "case-first", "u-then-a-label", "a-then-u-label"],
)
async def test_duplicate_recipients_get_one_copy(
    plain_server: UpstreamServer, tmp_path: Path, first: str, second: str, smtputf8: bool
) -> None:
    """Recipients differing only in domain case or IDNA form get one copy, as first given."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        options = " SMTPUTF8" if smtputf8 else ""
        assert (await client.command(f"MAIL FROM:<{SENDER}>{options}")).startswith("250")
        for rcpt in (first, second):
            assert (await client.command(f"RCPT TO:<{rcpt}>")).startswith("250 2.1.5")
        reply = await send_data(client, stuff(letter(to="Customers: ;")))
        assert reply.startswith("250 2.0.0"), reply
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert t.rcpt_tos == [first]
    assert_upstream_clean(plain_server)


async def test_null_sender_is_accepted(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """MAIL FROM:<> (a bounce) is accepted and goes upstream as the null path."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        assert (await client.command("MAIL FROM:<>")).startswith("250 2.1.0")
        assert (await client.command(f"RCPT TO:<{RCPT}>")).startswith("250 2.1.5")
        assert (await send_data(client, stuff(letter()))).startswith("250 2.0.0")
        await quit_cleanly(client)
    [t] = plain_server.transactions
    assert t.rcpt_tos == [RCPT]
    assert b"MAIL FROM:<>" in upstream_bytes(plain_server)
    assert_upstream_clean(plain_server)


# -- header section and isolation refusals, through the wire ---------------------------


@pytest.mark.parametrize(
    ("data", "rcpts", "expected"),
    [
        (
            message(f"From: {SENDER}", f"To : {RCPT}", "Subject: space before colon"),
            [RCPT],
            "554 5.6.0",
        ),
        (
            message(f"From: {SENDER}", f"To: {RCPT}", f"Reply-To: {RCPT}, {OTHER}", "Subject: x"),
            [RCPT, OTHER],
            "550 5.7.1",
        ),
        (
            message(
                *[f"Received: from h{i}.example.net by mx.example.net; x" for i in range(51)],
                f"From: {SENDER}",
                f"To: {RCPT}",
                "Subject: loop",
            ),
            [RCPT],
            "554 5.4.0",
        ),
    ],
    ids=["to-space-colon", "reply-to-other-recipient", "51-received"],
)
async def test_header_section_refusals(
    plain_server: UpstreamServer, tmp_path: Path, data: bytes, rcpts: list[str], expected: str
) -> None:
    """Header defects and leaks are refused after the data with their code; nothing is sent."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        await envelope(client, rcpts)
        reply = await send_data(client, stuff(data))
        assert reply.startswith(expected), reply
        await quit_cleanly(client)
    assert plain_server.connections == []


# -- internal errors and dropped clients ---------------------------------------------------


async def test_internal_error_is_451_without_internal_text(
    plain_server: UpstreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in the intake answers 451 4.3.0 with no internal text; the session goes on."""

    async def broken(self: Intake, submission: object) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(Intake, "accept", broken)
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        await envelope(client)
        reply = await send_data(client, stuff(letter()))
        assert reply.startswith("451 4.3.0"), reply
        assert "secret" not in reply
        assert "RuntimeError" not in reply
        # The transaction is over: a new one starts without RSET.
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250 2.1.0")
        await quit_cleanly(client)
    assert plain_server.connections == []


@pytest.mark.parametrize("how", ["close", "abort", "half-close"])
async def test_client_gone_mid_data_sends_nothing(
    plain_server: UpstreamServer, tmp_path: Path, how: str
) -> None:
    """A client that drops or half-closes mid-DATA leaves nothing delivered; the relay goes on."""
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        await envelope(client, [RCPT, OTHER])
        assert (await client.command("DATA")).startswith("354")
        raw = stuff(letter(body=b"line\r\n" * 50))
        await client.send(raw[: len(raw) - 7])  # everything but the last line and the end
        if how == "close":
            await client.close()
        elif how == "abort":
            client.writer.transport.abort()
        else:
            client.writer.write_eof()
            assert await asyncio.wait_for(client.reader.read(), 5) == b""
            await client.close()
        await until(lambda: relay.open_sessions == 0, "the dropped session's end")
        assert plain_server.connections == []
        other = await ehlo(relay)
        await envelope(other)
        assert (await send_data(other, stuff(letter(body=b"second\r\n")))).startswith("250")
        await quit_cleanly(other)
    [t] = plain_server.transactions
    assert t.rcpt_tos == [RCPT]
    assert t.content.endswith(b"\r\n\r\nsecond\r\n")


async def test_half_close_after_final_dot_is_all_or_nothing(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """A half-close right after the final dot gives every copy or none, never some."""
    rcpts = [RCPT, OTHER, "carol@example.com"]
    async with relay_for(tmp_path, plain_server) as relay:
        client = await ehlo(relay)
        await envelope(client, rcpts)
        assert (await client.command("DATA")).startswith("354")
        client.writer.write(stuff(letter(to="Customers: ;")))
        client.writer.write_eof()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(client.reader.read(), 5)
        await client.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while len(plain_server.transactions) < len(rcpts) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await until(lambda: relay.open_sessions == 0, "the session's end")
    assert len(plain_server.transactions) in (0, len(rcpts))
    assert_upstream_clean(plain_server)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        ("500 Command line too long", "500 5.5.2 Command line too long"),
        (
            "555 MAIL FROM parameters not recognized",
            "555 5.5.4 MAIL FROM parameters not recognized",
        ),
        ("250 2.1.0 Sender OK", "250 2.1.0 Sender OK"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("220 relay.example.test ESMTP", "220 relay.example.test ESMTP"),
    ],
)
def test_aiosmtpd_replies_gain_enhanced_codes(status: str, expected: str) -> None:
    """Replies aiosmtpd writes without an RFC 3463 code get one; 220 and 354 never do."""
    assert with_enhanced_code(status) == expected


async def test_ehlo_keywords_carry_no_enhanced_codes(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """EHLO's keyword lines stay bare, while an error reply in the same session gets its code."""
    async with running_relay(tmp_path, plain_server.url()) as relay:
        client = await RawClient.connect(relay.smtp_port)
        try:
            ehlo = await client.command("EHLO app.example.org")
            assert ehlo.splitlines()[-1] == "250 HELP"
            assert "250-PIPELINING" in ehlo.splitlines()
            assert (await client.command("RCPT TO:<alice@example.com>")).startswith("503 5.5.1 ")
        finally:
            await client.close()
