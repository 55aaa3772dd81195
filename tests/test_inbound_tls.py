"""Inbound STARTTLS against hostile and careless clients: real relay, real TLS sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from relay.config import TlsProfile
from relay.inbound import tls as tlsconf
from relay.server import Relay
from tests.relay_harness import RawClient, running_relay, until
from tests.test_inbound_hostile import client_tls, envelope, letter, quit_cleanly, send_data, stuff
from tests.test_inbound_overload import settle
from tests.upstream_server import UpstreamServer

SELF_SIGNED = {"RELAY_SMTP_STARTTLS": "self-signed"}


def sample(relay: Relay, name: str, **labels: str) -> float:
    value = relay.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@asynccontextmanager
async def tls_relay(
    tmp_path: Path, server: UpstreamServer, env: dict[str, str] | None = None
) -> AsyncIterator[Relay]:
    async with running_relay(tmp_path, server.url(), {**SELF_SIGNED, **(env or {})}) as relay:
        yield relay


async def starttls_ready(relay: Relay) -> RawClient:
    """A client that sent EHLO and STARTTLS and got 220: the next bytes are the handshake."""
    client = await RawClient.connect(relay.smtp_port)
    assert (await client.command("EHLO client.example.com")).startswith("250")
    assert (await client.command("STARTTLS")).startswith("220")
    return client


async def wait_closed(client: RawClient, timeout: float = 5) -> None:
    with suppress(ConnectionError, OSError):
        await asyncio.wait_for(client.reader.read(), timeout)
    await client.close()


async def garbage(client: RawClient) -> None:
    """Bytes that are no TLS record at all."""
    await client.send(b"\x16\x03\x01\xff\xff" + b"GET / HTTP/1.0\r\n" * 20)
    await wait_closed(client)


async def close_at_once(client: RawClient) -> None:
    await client.close()


async def reset_at_once(client: RawClient) -> None:
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()


async def cbc_only(client: RawClient) -> None:
    """A real TLS 1.2 client that offers only CBC suites (the relay takes AEAD only)."""
    context = tls12("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA256")
    with suppress(ssl.SSLError, ConnectionError, OSError):
        await client.writer.start_tls(context)
    await client.close()


@pytest.mark.parametrize(
    "attack",
    [garbage, close_at_once, reset_at_once, cbc_only],
    ids=lambda f: f.__name__,
)
async def test_failed_handshakes_log_one_line_each(
    plain_server: UpstreamServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    attack: Callable[[RawClient], Any],
) -> None:
    """30 failed handshakes: one INFO line and one count each, no traceback, no slot kept.

    Before, each wrote about 1 KB of error-level tracebacks (aiosmtpd's
    TLSSetupException through handle_exception, then asyncio's own).
    """
    caplog.set_level(logging.DEBUG)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, c: errors.append(c))
    rounds = 30
    async with tls_relay(tmp_path, plain_server) as relay:
        caplog.clear()
        for _ in range(rounds):
            await attack(await starttls_ready(relay))
        await until(
            lambda: (
                sample(relay, "solo_relay_inbound_tls_failures_total", reason="handshake")
                + sample(relay, "solo_relay_inbound_tls_failures_total", reason="aborted")
                >= rounds
                and not relay.open_sessions
            ),
            "every failed handshake counted and its session closed",
            timeout=5,
        )
        records = [r for r in caplog.records if not r.name.startswith("mail.log")]
        failures = sum(
            sample(relay, "solo_relay_inbound_tls_failures_total", reason=r)
            for r in ("handshake", "aborted", "timeout")
        )
        assert failures == rounds
        assert relay.open_sessions == 0
        await settle(relay)  # and no session task is left waiting
        # The relay still serves TLS after all that.
        client = await starttls_ready(relay)
        await client.writer.start_tls(client_tls())
        assert (await client.command("EHLO client.example.com")).startswith("250")
        await quit_cleanly(client)
    lines = [r for r in records if r.getMessage() == "TLS handshake failed"]
    assert len(lines) == rounds
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in records), [
        (r.name, r.getMessage()) for r in records if r.levelno > logging.INFO or r.exc_info
    ]
    assert sum(len(r.getMessage()) for r in records) < rounds * 120  # bounded log growth
    assert errors == []


async def test_stalled_handshake_times_out_quietly(
    plain_server: UpstreamServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """STARTTLS then silence: after the idle timeout, one line, counted, and the slot is free."""
    caplog.set_level(logging.INFO)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, c: errors.append(c))
    async with tls_relay(tmp_path, plain_server, {"RELAY_SMTP_IDLE_TIMEOUT": "0.3"}) as relay:
        client = await starttls_ready(relay)
        await wait_closed(client)
        await until(lambda: relay.open_sessions == 0, "the idle session closed", timeout=5)
        await settle(relay)
        assert sample(relay, "solo_relay_inbound_tls_failures_total", reason="timeout") == 1
    ours = [r for r in caplog.records if r.name == "relay.inbound"]
    assert [(r.getMessage(), r.levelno) for r in ours] == [("TLS handshake failed", logging.INFO)]
    assert not any(r.exc_info for r in caplog.records)
    assert errors == []


async def test_second_starttls_is_refused_and_no_longer_listed(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """Once TLS is active, STARTTLS gets 554 5.5.1 (RFC 3207 4.2); EHLO and HELP omit it."""
    async with tls_relay(tmp_path, plain_server) as relay:
        client = await RawClient.connect(relay.smtp_port)
        assert "250-STARTTLS" in await client.command("EHLO client.example.com")
        assert "STARTTLS" in await client.command("HELP")
        assert (await client.command("STARTTLS")).startswith("220")
        await client.writer.start_tls(client_tls())
        ehlo = await client.command("EHLO client.example.com")
        assert ehlo.startswith("250-") and "STARTTLS" not in ehlo, ehlo
        help_reply = await client.command("HELP")
        assert help_reply.startswith("250") and "STARTTLS" not in help_reply, help_reply
        for _ in range(3):
            reply = await client.command("STARTTLS")
            assert reply.startswith("554 5.5.1"), reply
        # The session is still the one TLS layer, and mail goes through it.
        await envelope(client)
        assert (await send_data(client, stuff(letter()))).startswith("250 2.0.0")
        await quit_cleanly(client)
    assert len(plain_server.transactions) == 1


def handshake(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    """EHLO, STARTTLS and a handshake with ``context``, from a blocking client: (version, cipher).

    Raises ``ssl.SSLError`` when the relay refuses the client's offer.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        stream = sock.makefile("rb")
        stream.readline()
        sock.sendall(b"EHLO client.example.com\r\n")
        while stream.readline()[3:4] == b"-":
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert stream.readline().startswith(b"220")
        with context.wrap_socket(sock) as tls:
            version, cipher = tls.version(), tls.cipher()
            assert version is not None and cipher is not None
            return version, cipher[0]


def tls12(ciphers: str | None = None) -> ssl.SSLContext:
    context = client_tls()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def tls13_group(curve: str) -> ssl.SSLContext:
    """A TLS 1.3 client offering one key-exchange group (in 1.3 it is apart from the cert)."""
    context = client_tls()
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_ecdh_curve(curve)
    return context


async def test_intermediate_profile_refuses_cbc_and_weak_groups(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """Mozilla "intermediate" by default: TLS 1.2 ECDHE+AEAD and 1.3; CBC-only, P-521, X448 refused.

    Before, Python's defaults offered CBC suites and the X448 and P-521 groups.
    """
    async with tls_relay(tmp_path, plain_server) as relay:
        port = relay.smtp_port
        version, cipher = await asyncio.to_thread(handshake, port, client_tls())
        assert version == "TLSv1.3"
        version, cipher = await asyncio.to_thread(handshake, port, tls12())
        assert version == "TLSv1.2"
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
        for refused in (
            tls12("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256"),
            tls12("AES128-GCM-SHA256:AES256-GCM-SHA384"),  # AEAD, but no forward secrecy
            tls13_group("secp521r1"),
            tls13_group("X448"),
        ):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.to_thread(handshake, port, refused)
        for curve in ("X25519", "prime256v1", "secp384r1"):
            version, _ = await asyncio.to_thread(handshake, port, tls13_group(curve))
            assert version == "TLSv1.3"


async def test_modern_profile_is_tls13_only(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """smtp.tls_profile = "modern": TLS 1.3 only, a TLS 1.2 client is refused."""
    async with tls_relay(tmp_path, plain_server, {"RELAY_SMTP_TLS_PROFILE": "modern"}) as relay:
        port = relay.smtp_port
        version, _ = await asyncio.to_thread(handshake, port, client_tls())
        assert version == "TLSv1.3"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(handshake, port, tls12())


async def test_shutdown_with_a_handshake_in_progress_is_quiet(
    plain_server: UpstreamServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping the relay while a client sits in the TLS handshake: no error, no slot, no task."""
    caplog.set_level(logging.INFO)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, c: errors.append(c))
    # Queue mode: its shutdown grace is the harness's 1 s (direct mode waits for deliveries).
    async with tls_relay(tmp_path, plain_server, {"RELAY_MODE": "queue"}) as relay:
        client = await starttls_ready(relay)
        await client.send(b"\x16\x03\x01")  # the start of a record, never finished
        await asyncio.sleep(0.1)
    await wait_closed(client)
    await settle(relay)
    assert relay.open_sessions == 0
    assert errors == [], [str(e.get("exception") or e.get("message")) for e in errors]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_scanner_grows_the_real_log_by_one_short_line_per_handshake(tmp_path: Path) -> None:
    """`solo-relay serve` (JSON logs) under 50 garbage handshakes: 50 short lines, no traceback."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
        "RELAY_LISTEN": "127.0.0.1:0",
        "RELAY_METRICS_LISTEN": "127.0.0.1:0",
        "RELAY_SMTP_STARTTLS": "self-signed",
        "RELAY_LOG_FORMAT": "json",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    try:
        listening = json.loads(process.stderr.readline())
        port = int(str(listening["smtp"]).rsplit(":", 1)[1])
        rounds = 50
        for _ in range(rounds):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                stream = sock.makefile("rb")
                stream.readline()
                sock.sendall(b"EHLO scanner.example.net\r\nSTARTTLS\r\n")
                while not stream.readline().startswith(b"220 "):
                    pass
                sock.sendall(b"\x16\x03\x01\xff\xffnot tls at all\r\n" * 4)
                with suppress(OSError):
                    stream.read()
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
    assert process.returncode == 0, rest
    lines = rest.splitlines()
    failures = [json.loads(line) for line in lines if "TLS handshake failed" in line]
    assert len(failures) == rounds
    assert all(len(line) < 400 for line in lines if "TLS handshake failed" in line)
    assert "Traceback" not in rest
    assert len(rest) < rounds * 400 + 2000, len(rest)  # the rest: stopping, stopped


def test_without_the_groups_list_the_profile_falls_back_to_p256(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where OpenSSL's groups list cannot be reached, one curve every client has: P-256, warned."""
    monkeypatch.setattr(tlsconf, "_set_groups", lambda context, groups: False)
    caplog.set_level(logging.WARNING, logger="relay.tlsconf")
    context = tlsconf.profile_context(TlsProfile.INTERMEDIATE)
    assert [r.getMessage() for r in caplog.records] == [
        "cannot set the TLS groups list; offering P-256 only"
    ]
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    names = {c["name"] for c in context.get_ciphers()}
    assert not any("CBC" in n or n.endswith("-SHA") for n in names), names
    modern = tlsconf.profile_context(TlsProfile.MODERN)
    assert modern.minimum_version is ssl.TLSVersion.TLSv1_3
