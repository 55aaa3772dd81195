"""Overload (Postfix's stress mode) and per-client limits, with real clients on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.inbound import gate
from relay.inbound.gate import Gate, overload_at
from relay.server import Relay
from tests.relay_harness import RawClient, running_relay, until
from tests.test_inbound_hostile import envelope, letter, quit_cleanly, send_data, stuff
from tests.upstream_server import UpstreamServer


def sample(relay: Relay, name: str, **labels: str) -> float:
    value = relay.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def ehlo(relay: Relay, host: str = "127.0.0.1") -> RawClient:
    client = await RawClient.connect(relay.smtp_port, host)
    assert (await client.command("EHLO client.example.com")).startswith("250")
    return client


async def greeting(relay: Relay) -> tuple[str, RawClient]:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    client = RawClient(reader, writer)
    return await client.reply(), client


def session_tasks() -> int:
    """The relay's session tasks still running (one per live session, none left behind).

    aiosmtpd's own ``SMTP._handle_client`` (the relay does not override it); the
    recording upstream's sessions have their own name.
    """
    return sum(
        1
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") == "SMTP._handle_client"
    )


async def settle(relay: Relay) -> None:
    await until(
        lambda: session_tasks() == relay.open_sessions, "one task per open session", timeout=5
    )


async def ends_with(client: RawClient, prefix: str, timeout: float = 5) -> None:
    """The next reply starts with ``prefix`` and then the relay closes the connection."""
    reply = await client.reply(timeout)
    assert reply.startswith(prefix), reply
    assert await asyncio.wait_for(client.reader.read(), timeout) == b""
    await client.close()


async def test_idle_timeout_before_mail_shrinks_under_overload(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """Near the limit, idle sessions before MAIL are cut after overload_idle_timeout, not 300 s.

    Before, 100 idle connections (the default limit) locked the application out
    for the whole 300 s idle timeout.
    """
    env = {
        "RELAY_SMTP_MAX_CONNECTIONS": "5",
        "RELAY_SMTP_OVERLOAD_THRESHOLD": "0.8",  # 4 open sessions
        "RELAY_SMTP_OVERLOAD_IDLE_TIMEOUT": "0.4",
    }
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        loop = asyncio.get_running_loop()
        busy = await ehlo(relay)
        await envelope(busy)  # in a transaction: not idle, never cut early
        idle = [await ehlo(relay) for _ in range(2)]
        await asyncio.sleep(0.6)  # below the threshold, idling is fine
        assert (await idle[0].command("NOOP")).startswith("250")
        started = loop.time()
        fourth = await ehlo(
            relay
        )  # overload begins: the two idle ones have 0.4 s since their last command
        await asyncio.gather(*(ends_with(c, "421 4.4.2") for c in idle))
        assert loop.time() - started < 3
        await settle(relay)
        assert sample(relay, "solo_relay_inbound_sessions_closed_total", reason="idle") == 2
        # Two sessions open: overload is over, and the newest may idle again.
        assert sample(relay, "solo_relay_inbound_overload") == 0
        await asyncio.sleep(0.6)
        assert (await fourth.command("NOOP")).startswith("250")
        await quit_cleanly(fourth)
        # The session in a transaction was left alone, and its mail goes through.
        assert (await send_data(busy, stuff(letter()))).startswith("250 2.0.0")
        await quit_cleanly(busy)
    assert len(plain_server.transactions) == 1


async def test_at_the_limit_the_longest_idle_session_makes_room(
    plain_server: UpstreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the limit, a newcomer closes the session idle longest before MAIL (421 4.7.0 to it).

    Only when no session is idle (all in a transaction, or just connected) is
    the newcomer refused with 421 4.7.0. Before, newcomers were always refused.
    """
    monkeypatch.setattr(gate, "EVICT_MIN_IDLE", 0.2)
    env = {"RELAY_SMTP_MAX_CONNECTIONS": "3", "RELAY_SMTP_OVERLOAD_IDLE_TIMEOUT": "60"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        oldest = await ehlo(relay)
        newer = await ehlo(relay)
        busy = await ehlo(relay)
        await envelope(busy)
        await asyncio.sleep(0.3)
        assert (await newer.command("NOOP")).startswith("250")  # newer is not idle now
        first, app = await greeting(relay)
        assert first.startswith("220 "), first
        await ends_with(oldest, "421 4.7.0 Server busy")
        await settle(relay)  # the closed session's task ended too
        assert (await newer.command("NOOP")).startswith("250")  # still there
        refused, other = await greeting(relay)  # nobody idle long enough: refused
        assert refused.startswith("421 4.7.0 Too many connections"), refused
        assert await asyncio.wait_for(other.reader.read(), 5) == b""
        await other.close()
        assert (await app.command("EHLO app.example.com")).startswith("250")
        await envelope(app)
        assert (await send_data(app, stuff(letter()))).startswith("250 2.0.0")
        await quit_cleanly(app)
        assert sample(relay, "solo_relay_inbound_sessions_closed_total", reason="overload") == 1
        assert sample(relay, "solo_relay_inbound_connections_total", result="refused_limit") == 1
        for client in (newer, busy):
            await quit_cleanly(client)
    assert len(plain_server.transactions) == 1


async def test_per_client_limit_off_loopback(plain_server: UpstreamServer, tmp_path: Path) -> None:
    """Listening off loopback, one address gets max_connections_per_client sessions, then 421."""
    env = {
        "RELAY_LISTEN": "0.0.0.0:0",
        "RELAY_SMTP_ALLOW_NETWORKS": "127.0.0.0/8",
        "RELAY_SMTP_MAX_CONNECTIONS_PER_CLIENT": "2",
    }
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        first, second = await ehlo(relay), await ehlo(relay)
        reply, third = await greeting(relay)
        assert reply == "421 4.7.0 Too many connections from your address", reply
        assert await asyncio.wait_for(third.reader.read(), 5) == b""
        await third.close()
        await quit_cleanly(first)
        await until(lambda: relay.open_sessions <= 1, "the first session's end", timeout=5)
        again = await ehlo(relay)  # a slot of this client's is free again
        await quit_cleanly(again)
        await quit_cleanly(second)
        assert (
            sample(relay, "solo_relay_inbound_connections_total", result="refused_client_limit")
            == 1
        )


async def test_no_per_client_limit_on_loopback(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """On a loopback listener every client is the application: no per-client limit."""
    env = {"RELAY_SMTP_MAX_CONNECTIONS_PER_CLIENT": "1"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        clients = [await ehlo(relay) for _ in range(3)]
        for client in clients:
            await quit_cleanly(client)


class FakeSession:
    def __init__(self, client: str, since: float | None) -> None:
        self.client = client
        self.since = since
        self.evicted: list[str] = []
        self.shrunk: list[float] = []

    def idle_since(self) -> float | None:
        return self.since

    def shrink_idle_timer(self, timeout: float) -> None:
        self.shrunk.append(timeout)

    def evict(self, reply: object) -> None:
        self.evicted.append(str(reply))


def test_gate_rules_on_fake_sessions() -> None:
    """The gate's rules without sockets: overload from the threshold, eviction order, release."""
    assert [overload_at(100, 0.8), overload_at(5, 0.8), overload_at(1, 0.1)] == [80, 4, 1]
    g = Gate(3, ["127.0.0.0/8"], per_client=2, overload_at=2, overload_idle_timeout=7.0)
    a, b, c = (
        FakeSession("192.0.2.1", 10.0),
        FakeSession("192.0.2.2", 5.0),
        FakeSession("192.0.2.3", None),
    )
    assert g.admit(a, 20.0) is None and not g.overloaded
    assert g.admit(b, 20.0) is None and g.overloaded
    assert a.shrunk == [7.0] and b.shrunk == [7.0]
    assert g.admit(c, 20.0) is None
    d = FakeSession("192.0.2.4", 20.0)
    assert g.admit(d, 20.0) is None  # b has idled longest: b goes
    assert b.evicted and not a.evicted and g.open == 3
    e = FakeSession("192.0.2.5", 20.0)
    assert g.admit(e, 20.5) is None  # then a (d is too fresh)
    assert a.evicted
    f = FakeSession("192.0.2.5", 21.0)
    refusal = g.admit(f, 20.5)  # c is in a transaction, d and e are fresh
    assert refusal is not None and refusal.code == 421
    g.release(d)
    g.release(d)  # twice is once
    assert g.open == 2
    assert g.admit(f, 21.0) is None
    again = FakeSession("192.0.2.5", 21.0)
    refusal = g.admit(again, 21.0)
    assert refusal is not None and "your address" in refusal.text


async def test_hundred_idle_clients_do_not_lock_the_application_out(
    plain_server: UpstreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13's case: 100 idle connections (the default limit), then the application sends.

    Before, the application got 421 4.7.0 until the idle clients' 300 s ran out.
    """
    monkeypatch.setattr(gate, "EVICT_MIN_IDLE", 0.2)
    async with running_relay(tmp_path, plain_server.url()) as relay:
        assert relay.config.smtp.max_connections == 100
        idle = [await ehlo(relay) for _ in range(100)]
        await asyncio.sleep(0.3)
        apps = []
        for _ in range(3):  # each newcomer closes one idle client and is served
            app = await ehlo(relay)
            await envelope(app)
            assert (await send_data(app, stuff(letter()))).startswith("250 2.0.0")
            apps.append(app)
        for app in apps:
            await quit_cleanly(app)
        closed = 0
        for client in idle:
            try:
                data = await asyncio.wait_for(client.reader.read(), 0.05)
            except TimeoutError:
                continue
            finally:
                await client.close()
            assert data.startswith(b"421 4.7.0"), data
            closed += 1
        assert closed == 3
    assert len(plain_server.transactions) == 3


async def test_after_a_message_the_idle_timer_is_the_overload_one(
    plain_server: UpstreamServer, tmp_path: Path
) -> None:
    """A session back before MAIL after its message gets the overload idle timeout, not 300 s."""
    env = {
        "RELAY_SMTP_MAX_CONNECTIONS": "3",
        "RELAY_SMTP_OVERLOAD_THRESHOLD": "0.6",  # 2 open sessions
        "RELAY_SMTP_OVERLOAD_IDLE_TIMEOUT": "0.4",
    }
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        other = await ehlo(relay)
        app = await ehlo(relay)  # overload from here
        await envelope(app)
        assert (await send_data(app, stuff(letter()))).startswith("250 2.0.0")
        await asyncio.gather(ends_with(other, "421 4.4.2"), ends_with(app, "421 4.4.2"))
        await settle(relay)
    assert len(plain_server.transactions) == 1
