"""Several upstreams end to end: failover, overflow, return, and what is never retried elsewhere.

Real relays in the test's loop, real recording upstreams on loopback; the primary
"refusing connections" is a port nobody listens on.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from relay.cli.main import main
from relay.core.policy import Backoff
from relay.server import Relay
from relay.upstream import router
from tests.redis_server import free_port
from tests.relay_harness import RawClient, running_relay, submit, until
from tests.upstream_server import PASSWORD, USER, UpstreamServer

MESSAGE = b"From: news@example.org\r\nSubject: t\r\n\r\nhello\r\n"
SENDER = "news@example.org"


def fleet_env(**urls: str) -> dict[str, str]:
    """RELAY_UPSTREAMS in keyword order; each value "URL[ role]"."""
    env = {"RELAY_UPSTREAMS": ",".join(urls)}
    for name, text in urls.items():
        url, _, role = text.partition(" ")
        prefix = f"RELAY_UPSTREAMS_{name.upper()}_"
        env[prefix + "URL"] = url
        if role:
            env[prefix + "ROLE"] = role
    return env


def sample(relay: Relay, name: str, **labels: str) -> float:
    value = relay.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def rcpts(count: int) -> list[str]:
    return [f"user{n}@example.com" for n in range(count)]


@pytest.fixture(autouse=True)
def quick_recovery(monkeypatch: pytest.MonkeyPatch) -> None:
    """A down upstream is tried again after 0.3 s instead of 10 s."""
    monkeypatch.setattr(router, "DOWN_RETRY", Backoff(initial=0.3, maximum=0.3))


async def test_a_primary_refusing_connections_sends_every_copy_via_the_failover(
    tmp_path: Path,
) -> None:
    backup = UpstreamServer(auth_require_tls=False)
    async with backup:
        env = fleet_env(
            primary=f"smtp+plain://127.0.0.1:{free_port()}",
            backup=f"{backup.url()} failover",
        )
        async with running_relay(tmp_path, "outbox:./outbox", env) as relay:
            reply = await submit(relay.smtp_port, MESSAGE, rcpts(3), sender=SENDER)
            assert reply.startswith("250"), reply
            await until(lambda: len(backup.transactions) == 3, "three copies at the failover")
            assert sample(relay, "solo_relay_upstream_failovers_total", upstream="primary") >= 1
            assert sample(relay, "solo_relay_upstream_copies_total", upstream="backup") == 3
            assert sample(relay, "solo_relay_upstream_copies_total", upstream="primary") == 0
            assert sample(relay, "solo_relay_upstream_state", upstream="primary", state="down") == 1
    assert sorted(t.rcpt_tos[0] for t in backup.transactions) == rcpts(3)


async def test_traffic_returns_to_the_primary_when_it_is_back(tmp_path: Path) -> None:
    primary = UpstreamServer(auth_require_tls=False)
    backup = UpstreamServer(auth_require_tls=False)
    async with primary, backup:
        primary.script("GREETING", ["421 4.7.0 Try again later, closing connection"])
        env = fleet_env(primary=primary.url(), backup=f"{backup.url()} failover")
        async with running_relay(tmp_path, "outbox:./outbox", env) as relay:
            assert (await submit(relay.smtp_port, MESSAGE, rcpts(1), sender=SENDER)).startswith(
                "250"
            )
            assert len(backup.transactions) == 1 and primary.transactions == []
            await until(lambda: relay.upstream_states()["primary"] == "up", "the primary back")
            assert (await submit(relay.smtp_port, MESSAGE, rcpts(2), sender=SENDER)).startswith(
                "250"
            )
    assert len(primary.transactions) == 2
    assert len(backup.transactions) == 1


async def test_a_recipients_550_is_never_retried_elsewhere(tmp_path: Path) -> None:
    primary = UpstreamServer(auth_require_tls=False)
    backup = UpstreamServer(auth_require_tls=False)
    async with primary, backup:
        primary.script(
            "RCPT", ["550 5.1.1 The email account that you tried to reach does not exist"]
        )
        env = fleet_env(primary=primary.url(), backup=f"{backup.url()} failover")
        async with running_relay(tmp_path, "outbox:./outbox", env) as relay:
            reply = await submit(relay.smtp_port, MESSAGE, rcpts(1), sender=SENDER)
    assert reply.startswith("550 5.1.1"), reply  # direct mode: the upstream's own refusal
    assert backup.transactions == [] and backup.connections == []


async def test_a_refusal_of_our_account_at_mail_goes_to_the_failover(tmp_path: Path) -> None:
    primary = UpstreamServer(auth_require_tls=False)
    backup = UpstreamServer(auth_require_tls=False)
    async with primary, backup:
        primary.script("MAIL", ["554 Message rejected: Email address is not verified"])
        env = fleet_env(primary=primary.url(), backup=f"{backup.url()} failover")
        async with running_relay(tmp_path, "outbox:./outbox", env) as relay:
            reply = await submit(relay.smtp_port, MESSAGE, rcpts(1), sender=SENDER)
    assert reply.startswith("250"), reply
    assert [t.rcpt_tos for t in backup.transactions] == [rcpts(1)[:1]]


async def test_a_spent_daily_quota_overflows_and_a_failover_is_not_used(tmp_path: Path) -> None:
    primary = UpstreamServer(auth_require_tls=False)
    backup = UpstreamServer(auth_require_tls=False)
    overflow = UpstreamServer(auth_require_tls=False)
    async with primary, backup, overflow:
        env = fleet_env(
            primary=primary.url(),
            backup=f"{backup.url()} failover",
            bulk=f"{overflow.url()} overflow",
        )
        env["RELAY_UPSTREAMS_PRIMARY_RATE_PER_DAY"] = "2"
        async with running_relay(tmp_path, "outbox:./outbox", env) as relay:
            reply = await submit(relay.smtp_port, MESSAGE, rcpts(5), sender=SENDER)
            assert reply.startswith("250"), reply
            assert relay.upstream_states() == {"primary": "spent", "backup": "up", "bulk": "up"}
            assert sample(relay, "solo_relay_upstream_quota_left", upstream="primary") == 0
            assert (
                sample(relay, "solo_relay_upstream_state", upstream="primary", state="spent") == 1
            )
    assert len(primary.transactions) == 2
    assert len(overflow.transactions) == 3
    assert backup.transactions == []


async def test_sender_domains_route_a_copy_to_its_own_upstream(tmp_path: Path) -> None:
    first = UpstreamServer(auth_require_tls=False)
    second = UpstreamServer(auth_require_tls=False)
    async with first, second:
        env = fleet_env(first=first.url(), second=second.url())
        env["RELAY_UPSTREAMS_FIRST_SENDER_DOMAINS"] = "example.net"
        async with running_relay(tmp_path, "outbox:./outbox", env) as relay:
            for sender in ("news@example.org", "news@example.net"):
                reply = await submit(relay.smtp_port, MESSAGE, rcpts(1), sender=sender)
                assert reply.startswith("250"), reply
    assert [t.mail_from for t in first.transactions] == ["news@example.net"]
    assert [t.mail_from for t in second.transactions] == ["news@example.org"]


async def test_queue_stats_shows_each_upstreams_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(router, "DOWN_RETRY", Backoff(initial=60.0, maximum=60.0))
    backup = UpstreamServer(auth_require_tls=False)
    async with backup:
        env = fleet_env(
            primary=f"smtp+plain://127.0.0.1:{free_port()}",
            backup=f"{backup.url()} failover",
        )
        env["RELAY_UPSTREAMS_BACKUP_RATE_PER_DAY"] = "50"
        async with running_relay(tmp_path, "outbox:./outbox", env) as relay:
            assert (await submit(relay.smtp_port, MESSAGE, rcpts(2), sender=SENDER)).startswith(
                "250"
            )
            status = tmp_path / "spool" / "upstreams.json"
            await until(
                lambda: status.exists() and '"sent": 2' in status.read_text(),
                "the relay's upstreams file, after the copies",
            )
            monkeypatch.setenv("RELAY_SPOOL_DIR", str(tmp_path / "spool"))
            monkeypatch.setenv("RELAY_LOG_HASH_KEY", "k" * 32)
            assert main(["queue", "stats"]) == 0
    out = capsys.readouterr().out
    assert "; limits local" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert lines["primary"][1:3] == ["primary", "down"]
    assert lines["backup"][1:3] == ["failover", "up"]
    assert "sent 2," in out and "quota left 48 of 50" in out


async def test_one_listed_upstream_keeps_its_own_daily_quota(tmp_path: Path) -> None:
    """[[upstreams]] of one: its rate_per_day holds (it is not [upstream] alone)."""
    only = UpstreamServer(auth_require_tls=False)
    async with only:
        env = fleet_env(only=only.url())
        env["RELAY_UPSTREAMS_ONLY_RATE_PER_DAY"] = "2"
        async with running_relay(tmp_path, "outbox:./outbox", env) as relay:
            reply = await submit(relay.smtp_port, MESSAGE, rcpts(3), sender=SENDER)
            assert relay.upstream_states() == {"only": "spent"}
    assert reply.startswith("250"), reply  # two sent, the third waits in the spool
    assert len(only.transactions) == 2


async def test_a_copy_sent_with_the_applications_login_goes_only_to_passthrough_upstreams(
    tmp_path: Path,
) -> None:
    """smtp.auth = passthrough: a logged-in message's copies go to the upstream that takes
    the application's login (with it); one sent without a login goes to the primary."""
    primary = UpstreamServer(auth_require_tls=False)
    own_login = UpstreamServer(auth_require_tls=False)
    async with primary, own_login:
        env = fleet_env(primary=primary.url(), login=f"{own_login.url()} failover")
        env["RELAY_UPSTREAMS_LOGIN_PASSTHROUGH"] = "true"
        env["RELAY_SMTP_AUTH"] = "passthrough"
        async with running_relay(tmp_path, "outbox:./outbox", env) as relay:
            client = await RawClient.connect(relay.smtp_port)
            try:
                assert (await client.command("EHLO app.example.test")).startswith("250")
                token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
                assert (await client.command(f"AUTH PLAIN {token}")).startswith("235")
                assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
                assert (await client.command("RCPT TO:<alice@example.com>")).startswith("250")
                assert (await client.command("DATA")).startswith("354")
                assert (await client.command(MESSAGE + b".")).startswith("250")
            finally:
                await client.close()
            reply = await submit(relay.smtp_port, MESSAGE, ["bob@example.com"], sender=SENDER)
            assert reply.startswith("250"), reply
    assert [(t.rcpt_tos, t.login) for t in own_login.transactions] == [
        (["alice@example.com"], USER)
    ]
    assert [(t.rcpt_tos, t.login) for t in primary.transactions] == [(["bob@example.com"], None)]
