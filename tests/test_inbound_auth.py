"""Inbound AUTH against password guessing and careless clients (issue 13, section 6)."""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import smtplib
import subprocess
from pathlib import Path

import bcrypt
import pytest

from relay.core.errors import ConfigError
from relay.inbound import auth
from relay.inbound.auth import FailureDelays, Users, delay
from relay.server import Relay
from tests.relay_harness import RawClient, running_relay
from tests.test_inbound_hostile import letter, quit_cleanly
from tests.test_inbound_overload import settle
from tests.upstream_server import UpstreamServer

USER = "mailer-app"
PASSWORD = b"correct horse battery staple"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sample(relay: Relay, name: str, **labels: str) -> float:
    value = relay.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def plain(password: bytes, user: bytes = USER.encode(), authzid: bytes = b"") -> str:
    """An AUTH PLAIN command with its initial response (RFC 4616)."""
    return "AUTH PLAIN " + b64(authzid + b"\0" + user + b"\0" + password)


def users_file(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "users"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def hashed(password: bytes) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds=4)).decode()


def auth_env(path: str, **extra: str) -> dict[str, str]:
    return {
        "RELAY_SMTP_AUTH": "users",
        "RELAY_SMTP_USERS_FILE": path,
        "RELAY_SMTP_AUTH_FAILURE_DELAY": "0.1",
        "RELAY_SMTP_AUTH_FAILURE_DELAY_MAX": "0.4",
        **extra,
    }


async def ehlo(relay: Relay) -> RawClient:
    client = await RawClient.connect(relay.smtp_port)
    reply = await client.command("EHLO client.example.com")
    assert "AUTH LOGIN PLAIN" in reply, reply
    return client


async def timed(client: RawClient, line: str) -> tuple[str, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await client.command(line)
    return reply, loop.time() - started


async def test_password_guessing_is_delayed_capped_logged_and_counted(
    plain_server: UpstreamServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong passwords: delays growing per client, 421 after 3 a session, a line and a count each.

    Before, a connection could try tens of thousands of passwords a second, with
    no delay, no cap, no log line and no metric.
    """
    caplog.set_level(logging.INFO)
    env = auth_env(users_file(tmp_path, f"{USER}:{hashed(PASSWORD)}"))
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        client = await ehlo(relay)
        waits = []
        for guess in (b"guess1", b"guess2", b"guess3"):
            reply, took = await timed(client, plain(guess))
            assert reply.startswith("535 5.7.8"), reply
            waits.append(took)
        assert waits[0] >= 0.09 and waits[1] >= 0.19 and waits[2] >= 0.38, waits
        assert (await client.reply()).startswith("421 4.7.0")
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()
        await settle(relay)
        # The next session from the same client starts at the longest delay...
        client = await ehlo(relay)
        reply, took = await timed(client, plain(b"x"))
        assert reply.startswith("535 5.7.8") and took >= 0.38, (reply, took)
        # ...and the right password works at once, and starts the count again.
        reply = await client.command(plain(PASSWORD))
        assert reply.startswith("235 2.7.0"), reply
        await quit_cleanly(client)
        client = await ehlo(relay)
        reply, took = await timed(client, plain(b"y"))
        assert took < 0.3, took
        await quit_cleanly(client)
        assert sample(relay, "solo_relay_inbound_auth_failures_total", reason="credentials") == 5
        assert sample(relay, "solo_relay_inbound_sessions_closed_total", reason="auth_limit") == 1
    failures = [r for r in caplog.records if r.getMessage() == "AUTH failed"]
    assert len(failures) == 5
    fields = [getattr(r, "fields", {}) for r in failures]
    assert all(f["reason"] == "credentials" and f["user"].startswith("a_") for f in fields)
    assert len({f["user"] for f in fields}) == 1  # one user, one token
    assert not any(USER in str(getattr(r, "fields", "")) + r.getMessage() for r in caplog.records)


async def test_plain_with_another_authorization_identity_is_refused(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """AUTH PLAIN whose authzid is not the authcid gets 535 5.7.8, even with the right password.

    Before, the authorization identity was accepted and ignored.
    """
    env = auth_env(
        users_file(tmp_path, f"{USER}:{hashed(PASSWORD)}"), RELAY_SMTP_AUTH_FAILURE_DELAY="0.01"
    )
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        client = await ehlo(relay)
        reply = await client.command(plain(PASSWORD, authzid=b"admin"))
        assert reply.startswith("535 5.7.8"), reply
        assert (await client.command(f"MAIL FROM:<{USER}@example.org>")).startswith("250")
        await client.command("RSET")
        reply = await client.command(plain(PASSWORD, authzid=USER.encode()))
        assert reply.startswith("235 2.7.0"), reply
        await quit_cleanly(client)
        assert sample(relay, "solo_relay_inbound_auth_failures_total", reason="authzid") == 1


LONG = b"u" * 10_000


@pytest.mark.parametrize(
    "exchange",
    [
        [f"AUTH LOGIN {b64(LONG)}"],
        ["AUTH LOGIN", b64(LONG)],
        ["AUTH LOGIN", b64(USER.encode()), b64(LONG)],
        [plain(b"pw", user=LONG)],
        ["AUTH PLAIN", b64(b"\0" + LONG + b"\0pw")],
        ["AUTH LOGIN", "x" * 600],
        [f"AUTH PLAIN {'x' * 600}"],
    ],
    ids=[
        "login-initial",
        "login-user",
        "login-password",
        "plain-initial",
        "plain-response",
        "login-600",
        "plain-600",
    ],
)
async def test_overlong_auth_lines_get_one_reply(
    plain_server: UpstreamServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    exchange: list[str],
) -> None:
    """Any AUTH line over 512 octets gets 500 5.5.6 (RFC 4954 4): no traceback, session goes on.

    Before, a 10 KB AUTH LOGIN user name answered 451 with a traceback in the log,
    where AUTH PLAIN answered 500.
    """
    caplog.set_level(logging.INFO)
    env = auth_env(
        users_file(tmp_path, f"{USER}:{hashed(PASSWORD)}"), RELAY_SMTP_AUTH_FAILURE_DELAY="0.01"
    )
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        client = await ehlo(relay)
        for line in exchange[:-1]:
            assert (await client.command(line)).startswith("334 "), line[:40]
        reply = await client.command(exchange[-1])
        assert reply == "500 5.5.6 Authentication exchange line is too long", reply
        # The session is still in step: the next command gets its own reply.
        assert (await client.command("NOOP")).startswith("250")
        assert (await client.command(plain(PASSWORD))).startswith("235 2.7.0")
        await quit_cleanly(client)
        assert sample(relay, "solo_relay_inbound_auth_failures_total", reason="too_long") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_abort_and_bad_base64_count_as_failures(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """ "*" answers 501 5.7.0, bad base64 501 5.5.2; both count toward the session's cap."""
    env = auth_env(
        users_file(tmp_path, f"{USER}:{hashed(PASSWORD)}"), RELAY_SMTP_AUTH_FAILURE_DELAY="0.01"
    )
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        client = await ehlo(relay)
        assert (await client.command("AUTH LOGIN")).startswith("334 ")
        assert (await client.command("*")).startswith("501 5.7.0")
        assert (await client.command("AUTH PLAIN !!notbase64")).startswith("501 5.5.2")
        assert (await client.command("AUTH LOGIN")).startswith("334 ")
        assert (await client.command("@@@")).startswith("501 5.5.2")
        assert (await client.reply()).startswith("421 4.7.0")
        await client.close()
        assert sample(relay, "solo_relay_inbound_auth_failures_total", reason="aborted") == 1
        assert sample(relay, "solo_relay_inbound_auth_failures_total", reason="malformed") == 2


def smtplib_send(port: int, user: str, password: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.example.com")
        smtp.login(user, password)
        smtp.sendmail(f"{user}@example.org", ["alice@example.com"], letter())


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_bcrypt_users_log_in_with_smtplib(
    plain_server: UpstreamServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, mechanism: str
) -> None:
    """A bcrypt entry in the users file lets smtplib log in and send; no plain-text warning."""
    caplog.set_level(logging.INFO)
    env = auth_env(users_file(tmp_path, "# the app", f"{USER}:{hashed(PASSWORD)}"))
    async with running_relay(tmp_path, plain_server.url(), env) as relay:

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as smtp:
                smtp.ehlo("client.example.com")
                smtp.user, smtp.password = USER, PASSWORD.decode()
                code, _ = smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))
                assert code == 235
                smtp.sendmail(f"{USER}@example.org", ["alice@example.com"], letter())

        await asyncio.to_thread(send)
    assert len(plain_server.transactions) == 1
    assert not [r for r in caplog.records if "plain-text" in r.getMessage()]


async def test_plain_text_entries_are_warned_about_at_start(
    plain_server: UpstreamServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain-text passwords still work, and start-up warns once, counting them, naming none."""
    caplog.set_level(logging.INFO)
    path = users_file(tmp_path, f"{USER}:{PASSWORD.decode()}", f"other:{hashed(b'x')}", "third:pw")
    async with running_relay(tmp_path, plain_server.url(), auth_env(path)) as relay:
        await asyncio.to_thread(smtplib_send, relay.smtp_port, USER, PASSWORD.decode())
    [warning] = [r for r in caplog.records if "plain-text" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert getattr(warning, "fields", {})["entries"] == 2
    assert PASSWORD.decode() not in str(getattr(warning, "fields", {}))
    assert len(plain_server.transactions) == 1


def test_users_file_errors_name_the_line(tmp_path: Path) -> None:
    """A line without a colon or a cut bcrypt hash is a ConfigError naming file and line."""
    for line in ("no-colon-here", f"{USER}:$2b$04$short"):
        path = users_file(tmp_path, "# comment", line)
        with pytest.raises(ConfigError) as info:
            Users.load(path)
        assert info.value.key == "smtp.users_file"
        assert "line 2" in str(info.value)
    with pytest.raises(ConfigError):
        Users.load(str(tmp_path / "missing"))


def test_failure_delay_doubles_to_its_cap_and_is_forgotten() -> None:
    """delay(n) doubles from initial to the cap; a quiet client, or a success, starts again."""
    assert [delay(n, 1.0, 30.0) for n in range(7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert delay(10_000, 1.0, 30.0) == 30.0
    now = [0.0]
    delays = FailureDelays(1.0, 8.0, clock=lambda: now[0], memory=60.0, capacity=2)
    assert [delays.failed("192.0.2.1") for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert delays.failed("192.0.2.2") == 1.0  # per client
    now[0] = 61.0
    assert delays.failed("192.0.2.1") == 1.0  # forgotten after a quiet minute
    delays.failed("192.0.2.1")
    delays.succeeded("192.0.2.1")
    assert delays.failed("192.0.2.1") == 1.0
    delays.failed("192.0.2.3")
    delays.failed("192.0.2.4")
    assert len(delays._clients) == 2  # bounded, whatever a scanner does


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_starttls_then_auth_with_a_bcrypt_user(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """swaks off loopback: STARTTLS (intermediate profile), AUTH LOGIN as a bcrypt user, mail."""
    env = auth_env(
        users_file(tmp_path, f"{USER}:{hashed(PASSWORD)}"),
        RELAY_LISTEN="0.0.0.0:0",
        RELAY_SMTP_ALLOW_NETWORKS="10.99.0.0/16",  # not the test client: AUTH is needed
        RELAY_SMTP_STARTTLS="self-signed",
    )
    async with running_relay(tmp_path, plain_server.url(), env) as relay:

        def swaks(password: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    "swaks", "--server", f"127.0.0.1:{relay.smtp_port}", "--tls",
                    "--auth", "LOGIN", "--auth-user", USER, "--auth-password", password,
                    "--from", f"{USER}@example.org", "--to", "alice@example.com",
                    "--helo", "client.example.com", "--timeout", "20",
                ],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        good = await asyncio.to_thread(swaks, PASSWORD.decode())
        assert good.returncode == 0, good.stdout + good.stderr
        assert "235 2.7.0" in good.stdout
        bad = await asyncio.to_thread(swaks, "wrong")
        assert bad.returncode != 0
        assert "535 5.7.8" in bad.stdout
    [t] = plain_server.transactions
    assert t.rcpt_tos == ["alice@example.com"]


async def test_unknown_user_costs_a_bcrypt_check_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown user name is checked against a real hash, so names cannot be found by timing."""
    calls: list[bytes] = []
    real = auth._checkpw

    def spy(password: bytes, hashed_value: bytes) -> bool:
        calls.append(password)
        return real(password, hashed_value)

    monkeypatch.setattr(auth, "_checkpw", spy)
    users = Users.load(users_file(tmp_path, f"{USER}:{hashed(PASSWORD)}"))
    assert await users.verify(USER, PASSWORD)
    assert not await users.verify("nobody", PASSWORD)
    assert not await users.verify(USER, b"wrong")
    assert calls == [PASSWORD, PASSWORD, b"wrong"]
