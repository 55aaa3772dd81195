"""Many pods, one quota: four relay processes share one upstream's limits on a real Redis.

Each relay is a real ``solo-relay serve`` process fed by its own client; the
recording upstream counts every copy (Message-ID x recipient).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.faults.harness import RestartableUpstream, send
from tests.redis_server import RedisServer, redis_server
from tests.relay_harness import until
from tests.test_cli_serve import run_cli
from tests.test_crash import RelayProcess, relay_env, relays, start_relay
from tests.upstream_server import UpstreamServer

__all__ = ["redis_server", "relays"]  # the fixtures

RELAYS = 4


async def fleet(
    relays: list[RelayProcess],
    tmp_path: Path,
    upstream: UpstreamServer,
    store: RedisServer,
    **limits: str,
) -> list[RelayProcess]:
    """Four relays with one upstream ("provider") and its ``limits``, sharing ``store``."""
    started = []
    for index in range(RELAYS):
        env = relay_env(
            tmp_path / f"spool-{index}",
            upstream.port,
            RELAY_FLEET_STORE=store.url,
            RELAY_FLEET_NAME="test",
            RELAY_FLEET_EXPECTED_REPLICAS=str(RELAYS),
            RELAY_FLEET_TIMEOUT="0.2",
            RELAY_UPSTREAMS="provider",
            RELAY_UPSTREAMS_PROVIDER_URL=upstream.url(),
            **{f"RELAY_UPSTREAMS_PROVIDER_{key.upper()}": value for key, value in limits.items()},
        )
        del env["RELAY_UPSTREAM"]  # [[upstreams]] instead
        started.append(await start_relay(relays, tmp_path, f"relay-{index}", env))
    return started


async def feed(relay: RelayProcess, index: int, count: int) -> None:
    """``count`` messages of one recipient each, to one relay, over its own connections."""
    for number in range(count):
        name = f"m{index}-{number}@app.example.org"
        reply = await send(relay.smtp_port, name, (f"user{index}-{number}@example.com",))
        assert reply.startswith("250"), reply


def events(relay: RelayProcess, name: str) -> list[dict[str, object]]:
    found = []
    for line in relay.log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found


async def test_four_relays_never_pass_one_daily_quota_and_use_it_all(
    tmp_path: Path, relays: list[RelayProcess], redis_server: RedisServer
) -> None:
    quota = 100
    upstream = RestartableUpstream(auth_require_tls=False)
    async with upstream:
        procs = await fleet(relays, tmp_path, upstream, redis_server, rate_per_day=str(quota))
        await asyncio.gather(*(feed(relay, i, 40) for i, relay in enumerate(procs)))
        await until(lambda: len(upstream.transactions) >= 0.95 * quota, "the fleet's quota used")
        await asyncio.sleep(2.0)  # an observation window: a copy over the quota would show now
        accepted = len(upstream.transactions)
    assert 0.95 * quota <= accepted <= quota, accepted
    assert set(upstream.counts().values()) == {1}  # no copy twice
    spent = "no upstream can take it now: spent"
    assert all(  # every relay kept the rest, deferred for the next day
        any(e.get("reply") == spent for e in events(relay, "copy deferred")) for relay in procs
    )


async def test_redis_lost_mid_run_mail_keeps_flowing_and_nothing_is_lost(
    tmp_path: Path, relays: list[RelayProcess], redis_server: RedisServer
) -> None:
    upstream = RestartableUpstream(auth_require_tls=False)
    async with upstream:
        procs = await fleet(relays, tmp_path, upstream, redis_server, rate_per_second="200")
        await asyncio.gather(*(feed(relay, i, 10) for i, relay in enumerate(procs)))
        await until(lambda: len(upstream.transactions) >= 40, "the first copies, shared limits")
        redis_server.stop()
        await asyncio.gather(*(feed(relay, i + RELAYS, 10) for i, relay in enumerate(procs)))
        await until(lambda: len(upstream.transactions) >= 80, "copies at the local shares")
        assert all(
            events(relay, "shared limits unreachable: sending at the local share")
            for relay in procs
        )
        redis_server.start()
        fed, rounds = 2 * RELAYS, 0
        while not all(events(relay, "shared limits back") for relay in procs):
            assert rounds < 10, "a relay never went back to the shared limits"
            await asyncio.gather(*(feed(relay, fed + i, 5) for i, relay in enumerate(procs)))
            fed, rounds = fed + RELAYS, rounds + 1
        total = 80 + 20 * rounds
        await until(lambda: len(upstream.transactions) >= total, "every copy")
    counts = upstream.counts()
    assert len(counts) == total and set(counts.values()) == {1}  # none lost, none twice


def test_check_upstream_checks_every_upstream_and_the_store(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """`solo-relay check --upstream`: each listed upstream's steps, then the store's PING."""
    env = {
        "RELAY_UPSTREAMS": "first,second",
        "RELAY_UPSTREAMS_FIRST_URL": f"outbox:{tmp_path / 'first'}",
        "RELAY_UPSTREAMS_SECOND_URL": "smtp+plain://127.0.0.1:9",  # nobody listens
        "RELAY_UPSTREAMS_SECOND_ROLE": "failover",
        "RELAY_FLEET_STORE": redis_server.url,
        "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
    }
    result = run_cli("check", "--upstream", env=env)
    lines = [line.split() for line in result.stdout.splitlines()]
    steps = {words[1]: words[0] for words in lines if words and words[0] in ("ok", "FAIL")}
    assert steps["first/outbox"] == "ok", result.stdout
    assert steps["second/connect"] == "FAIL", result.stdout
    assert steps["store"] == "ok", result.stdout
    assert result.returncode == 1  # one upstream fails its check
    assert ["upstream", "first", f"outbox:{tmp_path / 'first'}"] in lines
