"""DKIM through the running relay: signatures made with dkimpy, copies verified with dkim.verify."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest

from relay.core.dkim import SIGNED_HEADERS
from tests.conftest import dkim_keypair
from tests.relay_harness import RawClient, running_relay
from tests.upstream_server import Transaction, UpstreamServer

RCPTS = ["alice@example.com", "bob@example.com", "carol@example.net"]
MESSAGE = (
    b"From: News <news@example.org>\r\n"
    b"To: alice@example.com, bob@example.com\r\n"
    b"Cc: carol@example.net\r\n"
    b"Subject: November\r\n"
    b"Message-ID: <dkim.1@example.org>\r\n"
    b"\r\n"
    b"Body that must verify.\r\n"
    b"..a line that was dot-stuffed on the wire\r\n"
)


APP_KEY = dkim_keypair()
RELAY_KEY = dkim_keypair()


def dns(records: dict[bytes, bytes]) -> Callable[..., bytes]:
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        return records[name]

    return lookup


DNS = dns(
    {
        b"app._domainkey.example.org.": APP_KEY[1],
        b"relay._domainkey.example.org.": RELAY_KEY[1],
    }
)


def app_signed(headers: list[bytes], data: bytes = MESSAGE) -> bytes:
    signature = dkim.sign(data, b"app", b"example.org", APP_KEY[0], include_headers=headers)
    return signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + data


async def relay_copies(
    tmp_path: Path, server: UpstreamServer, data: bytes, env: dict[str, str] | None = None
) -> tuple[str, list[Transaction]]:
    async with running_relay(tmp_path, server.url(), env) as relay:
        client = await RawClient.connect(relay.smtp_port)
        try:
            await client.command("EHLO app.example.org")
            await client.command("MAIL FROM:<news@example.org>")
            for rcpt in RCPTS:
                await client.command(f"RCPT TO:<{rcpt}>")
            await client.command("DATA")
            stuffed = data.replace(b"\r\n.", b"\r\n..")
            await client.send(stuffed + b".\r\n")
            reply = await client.reply()
        finally:
            await client.close()
    return reply, server.transactions


def relay_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    key_file = tmp_path / "relay-dkim.pem"
    key_file.write_bytes(RELAY_KEY[0])
    return {
        "RELAY_DKIM_DOMAIN": "example.org",
        "RELAY_DKIM_SELECTOR": "relay",
        "RELAY_DKIM_KEY_FILE": str(key_file),
        **extra,
    }


async def test_strip_leaves_no_broken_signature(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """An app signature over to:cc is removed from every copy: nothing arrives failing DKIM."""
    reply, copies = await relay_copies(tmp_path, plain_server, app_signed([b"from", b"to", b"cc"]))
    assert reply.startswith("250")
    assert len(copies) == 3
    for t in copies:
        assert b"DKIM-Signature" not in t.content


async def test_signature_over_unchanged_headers_still_verifies(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """h=from:subject:message-id survives the wire and isolation: body and kept fields untouched."""
    reply, copies = await relay_copies(
        tmp_path, plain_server, app_signed([b"from", b"subject", b"message-id"])
    )
    assert reply.startswith("250") and len(copies) == 3
    for t in copies:
        assert dkim.verify(t.content, dnsfunc=DNS)


async def test_oversigned_absent_cc_is_kept_and_verifies(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """h=from:subject:cc:cc over a message with no Cc: the copies have none either: verifies."""
    data = MESSAGE.replace(b"Cc: carol@example.net\r\n", b"")
    reply, copies = await relay_copies(
        tmp_path, plain_server, app_signed([b"from", b"subject", b"cc", b"cc"], data)
    )
    assert reply.startswith("250")
    for t in copies:
        assert dkim.verify(t.content, dnsfunc=DNS)


async def test_resign_signs_each_copy_with_the_relay_key(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """dkim.action=resign: the broken app signature goes, the relay's verifies on every copy."""
    env = relay_env(tmp_path, RELAY_DKIM_ACTION="resign")
    reply, copies = await relay_copies(tmp_path, plain_server, app_signed([b"from", b"to"]), env)
    assert reply.startswith("250") and len(copies) == 3
    for t in copies:
        assert t.content.count(b"DKIM-Signature:") == 1
        assert b"s=relay" in t.content and b"s=app" not in t.content
        assert dkim.verify(t.content, dnsfunc=DNS)
        signed = (
            t.content.split(b"h=", 1)[1]
            .split(b";", 1)[0]
            .replace(b" ", b"")
            .replace(b"\r\n\t", b"")
        )
        names = [n for n in signed.replace(b"\r\n", b"").split(b":") if n]
        assert names.count(b"from") == 2 and b"bcc" not in names


async def test_reject_refuses_with_550_5_7_0(tmp_path: Path, plain_server: UpstreamServer) -> None:
    """dkim.action=reject: a signature over to is refused whole, nothing delivered."""
    reply, copies = await relay_copies(
        tmp_path, plain_server, app_signed([b"from", b"to"]), {"RELAY_DKIM_ACTION": "reject"}
    )
    assert reply.startswith("550 5.7.0")
    assert copies == []


async def test_sign_all_signs_unsigned_mail(tmp_path: Path, plain_server: UpstreamServer) -> None:
    """dkim.sign_all: an application that does not sign still gets verifiable copies."""
    env = relay_env(tmp_path, RELAY_DKIM_SIGN_ALL="true")
    reply, copies = await relay_copies(tmp_path, plain_server, MESSAGE, env)
    assert reply.startswith("250") and len(copies) == 3
    for t in copies:
        assert dkim.verify(t.content, dnsfunc=DNS)


def test_signed_header_list_oversigns_from_and_never_bcc() -> None:
    """The relay signs From twice and never Bcc or trace fields."""
    assert SIGNED_HEADERS.count("from") == 2
    assert not {"bcc", "received", "return-path"} & set(SIGNED_HEADERS)


def serve(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve"],
        env={
            **os.environ,
            "RELAY_LISTEN": "127.0.0.1:0",
            "RELAY_METRICS_LISTEN": "127.0.0.1:0",
            **env,
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"RELAY_DKIM_KEY_FILE": "/nonexistent/key.pem"}, "dkim.key_file"),
        ({"RELAY_DKIM_SELECTOR": "bad selector!"}, "dkim.selector"),
        ({"RELAY_DKIM_DOMAIN": ""}, "dkim.domain"),
        ({"BAD_KEY": "1"}, "dkim.key_file"),
    ],
)
def test_bad_key_or_selector_stops_the_start(
    tmp_path: Path, override: dict[str, str], key: str
) -> None:
    """A bad key file, selector or domain: exit 2 with one line naming the key."""
    env = relay_env(tmp_path, RELAY_DKIM_ACTION="resign")
    if override.pop("BAD_KEY", None):
        Path(env["RELAY_DKIM_KEY_FILE"]).write_text("not a key\n")
    env.update(override)
    result = serve(env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert key in result.stderr and "Traceback" not in result.stderr


def test_preview_shows_what_happens_to_each_signature(tmp_path: Path) -> None:
    """preview --dkim resign --config: the app signature stripped, the relay's added, per copy."""
    env = relay_env(tmp_path)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[dkim]\ndomain = "{env["RELAY_DKIM_DOMAIN"]}"\nselector = "relay"\n'
        f'key_file = "{env["RELAY_DKIM_KEY_FILE"]}"\naction = "resign"\n'
    )
    message = tmp_path / "signed.eml"
    message.write_bytes(app_signed([b"from", b"to"]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "preview",
            str(message),
            "--config",
            str(config),
            "--rcpt",
            "alice@example.com",
            "--rcpt",
            "bob@example.com",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("dkim-stripped") == 2
    assert result.stdout.count("dkim-signed") == 2
    assert "d=example.org s=app: h= covers changed to" in result.stdout
