"""End to end: real clients as the application, the relay, a recording upstream on loopback.

Each test asserts the exact bytes every recipient's copy carried to the upstream.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import shutil
import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path

import pytest
import trustme

from relay.config import LogConfig, LogFormat
from relay.ops.logs import setup_logging
from tests.relay_harness import TEST_KEY, RawClient, running_relay, until
from tests.upstream_server import DISCONNECT, PASSWORD, USER, Transaction, UpstreamServer

RECEIVED = re.compile(
    rb"Received: from (\S+) \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby relay\.example\.test \(solo-relay\) with (\w+) id ([0-9A-F]+)\r\n"
    rb"\tfor <([^>]+)>; [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \+0000\r\n"
)


def split_copy(content: bytes) -> tuple[re.Match[bytes], bytes]:
    """The relay's Received line (parsed) and everything after it."""
    match = RECEIVED.match(content)
    assert match is not None, content[:300]
    return match, content[match.end() :]


def by_recipient(transactions: list[Transaction]) -> dict[str, Transaction]:
    result = {}
    for t in transactions:
        assert len(t.rcpt_tos) == 1, "one recipient per upstream transaction"
        result[t.rcpt_tos[0]] = t
    return result


def clean_wire(server: UpstreamServer) -> bytes:
    wire = b"".join(bytes(c.wire) for c in server.connections)
    assert b"\x00" not in wire
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    return wire


def send_with_smtplib(port: int, message: EmailMessage) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.send_message(message)


def campaign() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Example News <news@example.org>"
    message["To"] = "Alice <alice@example.com>, bob@example.com"
    message["Cc"] = "carol@example.net"
    message["Bcc"] = "dave@example.net"
    message["Subject"] = "November update"
    message["Message-ID"] = "<20261121.1@mail.example.org>"
    message.set_content("Hello!\n.leading dot stays\n")
    return message


async def test_smtplib_send_message_with_to_cc_bcc(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """smtplib's send_message: four recipients, four isolated copies, exact bytes."""
    async with running_relay(tmp_path, plain_server.url()) as relay:
        refused = await asyncio.to_thread(send_with_smtplib, relay.smtp_port, campaign())
    assert refused == {}
    copies = by_recipient(plain_server.transactions)
    assert sorted(copies) == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.net",
        "dave@example.net",
    ]
    body_tail = (
        b'Content-Type: text/plain; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: 7bit\r\n"
        b"MIME-Version: 1.0\r\n"
        b"\r\n"
        b"Hello!\r\n"
        b".leading dot stays\r\n"
    )
    for rcpt, transaction in copies.items():
        received, rest = split_copy(transaction.content)
        assert received.group(4).decode() == rcpt
        assert received.group(2) == b"ESMTP"
        to = "Alice <alice@example.com>" if rcpt == "alice@example.com" else rcpt
        assert rest == (
            b"From: Example News <news@example.org>\r\n"
            + f"To: {to}\r\n".encode()
            + b"Subject: November update\r\n"
            b"Message-ID: <20261121.1@mail.example.org>\r\n" + body_tail
        )
        assert transaction.mail_from == "news@example.org"
        assert b"\r\n..leading dot stays\r\n" in transaction.wire  # stuffed again on the wire
    clean_wire(plain_server)


@pytest.mark.skipif(
    shutil.which("swaks") is None and not os.environ.get("CI"), reason="installed by .ci/run"
)
async def test_swaks_as_the_application(tmp_path: Path, plain_server: UpstreamServer) -> None:
    """swaks with two --to recipients: two copies, each naming only its recipient."""
    async with running_relay(tmp_path, plain_server.url()) as relay:
        process = await asyncio.create_subprocess_exec(
            "swaks",
            "--server",
            f"127.0.0.1:{relay.smtp_port}",
            "--from",
            "news@example.org",
            "--to",
            "alice@example.com,bob@example.com",
            "--header",
            "Subject: from swaks",
            "--body",
            "Hi from swaks",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    copies = by_recipient(plain_server.transactions)
    assert sorted(copies) == ["alice@example.com", "bob@example.com"]
    for rcpt, transaction in copies.items():
        _, rest = split_copy(transaction.content)
        to_lines = [line for line in rest.split(b"\r\n") if line.lower().startswith(b"to:")]
        assert to_lines == [f"To: {rcpt}".encode()]
        assert b"Subject: from swaks\r\n" in rest
        assert rest.split(b"\r\n\r\n", 1)[1].startswith(b"Hi from swaks\r\n")


@pytest.mark.skipif(
    shutil.which("curl") is None and not os.environ.get("CI"), reason="installed by .ci/run"
)
async def test_curl_mail_rcpt(tmp_path: Path, plain_server: UpstreamServer) -> None:
    """curl --mail-rcpt twice: two copies with the file's headers, To rebuilt for each."""
    mail = tmp_path / "mail.txt"
    mail.write_bytes(
        b"From: news@example.org\r\nTo: alice@example.com, bob@example.com\r\n"
        b"Subject: from curl\r\n\r\nHi from curl\r\n"
    )
    async with running_relay(tmp_path, plain_server.url()) as relay:
        process = await asyncio.create_subprocess_exec(
            "curl",
            "-sS",
            f"smtp://127.0.0.1:{relay.smtp_port}",
            "--mail-from",
            "news@example.org",
            "--mail-rcpt",
            "alice@example.com",
            "--mail-rcpt",
            "bob@example.com",
            "--upload-file",
            str(mail),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    for rcpt, transaction in by_recipient(plain_server.transactions).items():
        _, rest = split_copy(transaction.content)
        assert rest == (
            b"From: news@example.org\r\n"
            + f"To: {rcpt}\r\n".encode()
            + b"Subject: from curl\r\n\r\nHi from curl\r\n"
        )


async def test_starttls_upstream_with_auth(
    tmp_path: Path, upstream_server: UpstreamServer, ca_file: str
) -> None:
    """smtp:// upstream: STARTTLS verified with the test CA, then AUTH, then each copy."""
    env = {"RELAY_UPSTREAM_PASSWORD": PASSWORD, "RELAY_UPSTREAM_CA_FILE": ca_file}
    async with running_relay(tmp_path, upstream_server.url("smtp", USER), env) as relay:
        await asyncio.to_thread(send_with_smtplib, relay.smtp_port, campaign())
    assert len(upstream_server.transactions) == 4
    assert all(t.tls and t.login == USER for t in upstream_server.transactions)
    clear = upstream_server.clear_bytes()
    assert b"AUTH" not in clear and b"MAIL FROM" not in clear and PASSWORD.encode() not in clear


async def test_implicit_tls_upstream(
    tmp_path: Path, implicit_tls_server: UpstreamServer, ca_file: str
) -> None:
    """smtps:// upstream: TLS from the first byte, AUTH, copies delivered."""
    env = {"RELAY_UPSTREAM_PASSWORD": PASSWORD, "RELAY_UPSTREAM_CA_FILE": ca_file}
    async with running_relay(tmp_path, implicit_tls_server.url("smtps", USER), env) as relay:
        await asyncio.to_thread(send_with_smtplib, relay.smtp_port, campaign())
    assert sorted(by_recipient(implicit_tls_server.transactions)) == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.net",
        "dave@example.net",
    ]


async def test_passthrough_auth_uses_the_applications_credentials(
    tmp_path: Path, server_tls: ssl.SSLContext, ca_file: str
) -> None:
    """AUTH passthrough: the login the application gives the relay is the one used upstream."""
    env = {"RELAY_SMTP_AUTH": "passthrough", "RELAY_UPSTREAM_CA_FILE": ca_file}
    secret = "app-provider-secret"

    def send(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.login(USER, secret)
            client.sendmail("news@example.org", ["alice@example.com"], b"Subject: x\r\n\r\nhi\r\n")

    upstream = UpstreamServer(tls_context=server_tls, users={USER: secret})
    async with upstream, running_relay(tmp_path, upstream.url("smtp"), env) as relay:
        await asyncio.to_thread(send, relay.smtp_port)
    assert [t.login for t in upstream.transactions] == [USER]
    assert [(user, password) for _, user, password in upstream.auths] == [(USER, secret)]


async def raw_send(port: int, rcpts: list[str], data: bytes = b"Subject: t\r\n\r\nhi\r\n") -> str:
    client = await RawClient.connect(port)
    try:
        await client.command("EHLO app.example.org")
        await client.command("MAIL FROM:<news@example.org>")
        for rcpt in rcpts:
            await client.command(f"RCPT TO:<{rcpt}>")
        await client.command("DATA")
        await client.send(data + b".\r\n")
        return await client.reply()
    finally:
        await client.close()


async def test_upstream_421_at_greeting_gives_451(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """The upstream greets with 421: nothing delivered, the application gets 451 to retry."""
    plain_server.script("GREETING", [421] * 10)
    async with running_relay(tmp_path, plain_server.url()) as relay:
        reply = await raw_send(relay.smtp_port, ["alice@example.com"])
    assert reply.startswith("451 4.4.0")
    assert plain_server.transactions == []


async def test_one_recipient_refused_permanently_still_gives_250(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """One copy 550 at RCPT, the other delivered: 250 (no resend); the refused one fails, and
    its sender gets a DSN instead of a second try."""
    plain_server.script("RCPT", [550])
    env = {"RELAY_UPSTREAM_POOL_SIZE": "1"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        reply = await raw_send(relay.smtp_port, ["alice@example.com", "bob@example.com"])
        assert reply.startswith("250 2.0.0") and "1 refused" in reply
        await until(lambda: len(plain_server.transactions) == 2, "both copies at the upstream")
    rcpts = {t.rcpt_tos[0] for t in plain_server.transactions}  # either copy may be the one
    assert "news@example.org" in rcpts and rcpts & {"alice@example.com", "bob@example.com"}


@pytest.mark.parametrize(
    ("stage", "code", "expected"),
    [
        ("RCPT", 550, "550 5.0.0"),
        ("DOT", 451, "451 4.0.0"),
        ("MAIL", 452, "452 4.0.0"),
        ("DATA", 554, "554 5.0.0"),
    ],
)
async def test_every_copy_failing_gives_the_upstreams_class(
    tmp_path: Path, plain_server: UpstreamServer, stage: str, code: int, expected: str
) -> None:
    """All copies refused alike: the application gets the upstream's own code and class."""
    plain_server.script(stage, [code] * 4)
    async with running_relay(tmp_path, plain_server.url()) as relay:
        reply = await raw_send(relay.smtp_port, ["alice@example.com", "bob@example.com"])
    assert reply.startswith(expected)


async def test_disconnect_after_the_dot_is_spooled_not_refused(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """No reply after the final dot: the copy may have arrived, so 250 and the queue retries."""
    plain_server.script("DOT", [DISCONNECT])
    async with running_relay(tmp_path, plain_server.url()) as relay:
        reply = await raw_send(relay.smtp_port, ["alice@example.com"])
        assert reply.startswith("250 2.0.0") and "queued for retry" in reply
        assert relay.spool is not None and relay.spool.live == 1


async def test_missing_starttls_upstream_never_sends_credentials_in_clear(
    tmp_path: Path, upstream_server: UpstreamServer, ca_file: str
) -> None:
    """An smtp:// upstream that stops offering STARTTLS gets no AUTH and no mail: 451."""
    upstream_server.edit_ehlo(remove=["STARTTLS"])
    env = {"RELAY_UPSTREAM_PASSWORD": PASSWORD, "RELAY_UPSTREAM_CA_FILE": ca_file}
    async with running_relay(tmp_path, upstream_server.url("smtp", USER), env) as relay:
        reply = await raw_send(relay.smtp_port, ["alice@example.com"])
    assert reply.startswith("451 4.4.0")
    clear = upstream_server.clear_bytes()
    assert b"AUTH" not in clear and b"MAIL" not in clear and PASSWORD.encode() not in clear


async def test_bad_certificate_upstream_is_refused(
    tmp_path: Path, upstream_server: UpstreamServer
) -> None:
    """An upstream certificate from an unknown CA: TLS fails closed, 451, nothing sent."""
    env = {"RELAY_UPSTREAM_PASSWORD": PASSWORD}
    async with running_relay(tmp_path, upstream_server.url("smtp", USER), env) as relay:
        reply = await raw_send(relay.smtp_port, ["alice@example.com"])
    assert reply.startswith("451 4.4.0")
    assert upstream_server.transactions == [] and upstream_server.auths == []


def series(text: str) -> set[str]:
    """Sample names with their label names and values, minus the numbers."""
    return {
        line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")
    }


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


async def test_metrics_series_do_not_grow_with_recipients_and_name_nobody(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """After 1 and after 500 distinct recipients, /metrics has the same series, and no address."""
    stream = io.StringIO()
    setup_logging(LogConfig(format=LogFormat.JSON, level="debug"), key=TEST_KEY, stream=stream)
    try:
        async with running_relay(tmp_path, plain_server.url()) as relay:
            await raw_send(relay.smtp_port, ["first@example.com"])
            _, after_one = await scrape(relay.metrics_port)
            rcpts = [f"customer{i:03d}@example.net" for i in range(500)]
            for start in range(0, 500, 100):
                reply = await raw_send(relay.smtp_port, rcpts[start : start + 100])
                assert reply.startswith("250")
            status, after_many = await scrape(relay.metrics_port)
            assert (await scrape(relay.metrics_port, "/healthz"))[0] == 200
            assert (await scrape(relay.metrics_port, "/readyz"))[0] == 200
    finally:
        logging.getLogger().handlers.clear()
    assert status == 200
    assert series(after_one) == series(after_many)
    assert 'solo_relay_copies_total{outcome="delivered"} 501.0' in after_many
    assert 'solo_relay_inbound_connections_total{result="accepted"} 6.0' in after_many
    assert 'solo_relay_messages_received_total{result="accepted"} 6.0' in after_many
    logs = stream.getvalue()
    assert "message received" in logs and "copy" in logs
    for text in (after_many, logs):
        assert "@" not in text.replace("relay.example.test", "")
        assert "customer" not in text and "example.net" not in text


async def test_readyz_turns_503_when_the_upstream_cannot_be_reached(tmp_path: Path) -> None:
    """/readyz: 200 at start, 503 once a copy could not reach the upstream; /healthz stays 200."""
    async with running_relay(tmp_path, "smtp+plain://127.0.0.1:9") as relay:
        assert (await scrape(relay.metrics_port, "/readyz"))[0] == 200
        reply = await raw_send(relay.smtp_port, ["alice@example.com"])
        assert reply.startswith("451 4.4.0")
        status, text = await scrape(relay.metrics_port, "/readyz")
        assert status == 503 and "upstream unreachable" in text
        assert (await scrape(relay.metrics_port, "/healthz"))[0] == 200


async def test_starttls_with_a_given_certificate_and_users_auth(
    tmp_path: Path, plain_server: UpstreamServer, tls_ca: trustme.CA
) -> None:
    """smtp.starttls = certificate and auth = users: smtplib verifies the relay, logs in, sends."""
    cert = tls_ca.issue_cert("localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tls_ca.cert_pem.write_to_path(str(ca_file))
    users = tmp_path / "users"
    users.write_text("app:app-secret\n")
    env = {
        "RELAY_SMTP_STARTTLS": "certificate",
        "RELAY_SMTP_TLS_CERT_FILE": str(cert_file),
        "RELAY_SMTP_TLS_KEY_FILE": str(key_file),
        "RELAY_SMTP_AUTH": "users",
        "RELAY_SMTP_USERS_FILE": str(users),
    }

    def send(port: int) -> None:
        context = ssl.create_default_context(cafile=str(ca_file))
        with smtplib.SMTP("localhost", port, timeout=30) as client:
            client.starttls(context=context)
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("app", "wrong")
            client.login("app", "app-secret")
            client.sendmail("news@example.org", ["alice@example.com"], b"Subject: x\r\n\r\nhi\r\n")

    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        await asyncio.to_thread(send, relay.smtp_port)
    (transaction,) = plain_server.transactions
    received, _ = split_copy(transaction.content)
    assert received.group(2) == b"ESMTPSA"


async def test_client_outside_the_allowed_networks_is_refused(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Listening on 0.0.0.0 for 10.0.0.0/8 only: a loopback client gets 550 5.7.1 at MAIL."""
    env = {"RELAY_LISTEN": "0.0.0.0:0", "RELAY_SMTP_ALLOW_NETWORKS": "10.0.0.0/8"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        client = await RawClient.connect(relay.smtp_port)
        try:
            await client.command("EHLO app.example.org")
            reply = await client.command("MAIL FROM:<news@example.org>")
        finally:
            await client.close()
        _, metrics = await scrape(relay.metrics_port)
    assert reply.startswith("550 5.7.1")
    assert 'solo_relay_inbound_connections_total{result="refused_network"} 1.0' in metrics
    assert plain_server.transactions == []


async def test_long_body_lines_pass_through_unchanged(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """A 5,000-octet HTML line in the body reaches the upstream byte for byte."""
    line = b"<p>" + b"x" * 4994 + b"</p>"
    data = (
        b"From: news@example.org\r\nTo: alice@example.com\r\nSubject: long\r\n\r\n" + line + b"\r\n"
    )
    async with running_relay(tmp_path, plain_server.url()) as relay:
        reply = await raw_send(relay.smtp_port, ["alice@example.com"], data)
    assert reply.startswith("250 2.0.0")
    _, rest = split_copy(plain_server.transactions[0].content)
    assert rest.endswith(b"\r\n\r\n" + line + b"\r\n")
