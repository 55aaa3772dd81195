"""relay.limits: the fleet's rate and daily quota on a real redis-server, and the fallback."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import time
from pathlib import Path

import pytest
import trustme
from redis.asyncio import Redis

from relay.config import FleetConfig
from relay.limits.reset import DailyReset
from relay.limits.shared import LEASE_SECONDS, Quota, SharedLimiter
from relay.limits.store import check_store, open_store
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture


def limiter(
    server: RedisServer, quota: Quota, *, replicas: int = 4, batch: int = 8, **kwargs: object
) -> SharedLimiter:
    client = Redis.from_url(server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    return SharedLimiter(
        client,
        fleet="test",
        upstream="primary",
        quota=quota,
        expected_replicas=replicas,
        batch=batch,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_four_relays_share_one_daily_quota_exactly(redis_server: RedisServer) -> None:
    """However the four ask, the grants add up to the quota: never more, none wasted."""
    relays = [limiter(redis_server, Quota(per_day=1000)) for _ in range(4)]
    started = [0] * 4

    async def send(index: int) -> None:
        while True:
            allowed = await relays[index].take(3 + index)
            if allowed == 0:
                return
            started[index] += allowed

    await asyncio.gather(*(send(i) for i in range(4)))
    for relay in relays:
        await relay.aclose()
    assert sum(started) == 1000
    assert all(count > 0 for count in started)


async def test_the_rate_is_shared_and_holds_over_a_window(redis_server: RedisServer) -> None:
    relays = [limiter(redis_server, Quota(per_second=200), batch=4) for _ in range(4)]
    granted = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        for relay in relays:
            granted += await relay.take(4)
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - started
    for relay in relays:
        await relay.aclose()
    # GCRA with a one-second burst: at most rate x (window + 1 s); the fleet uses it all.
    assert granted <= 200 * (elapsed + 1.0) + 4
    assert granted >= 0.95 * 200 * elapsed


async def test_an_unused_lease_goes_back_to_the_fleet(redis_server: RedisServer) -> None:
    clock = [time.time()]
    first = limiter(redis_server, Quota(per_day=10), batch=8, clock=lambda: clock[0])
    second = limiter(redis_server, Quota(per_day=10), batch=8)
    assert await first.take(1) == 1  # 8 granted, 7 held
    assert await second.take(10) == 2  # what the first does not hold
    await first.release_stale()
    assert await second.take(10) == 0  # a fresh lease is the first's to use
    clock[0] += LEASE_SECONDS + 0.1
    await first.release_stale()  # the idle relay's lease goes back to the fleet
    assert await second.take(10) == 7
    await first.aclose()
    await second.aclose()


async def test_the_days_counter_expires_at_the_providers_reset(redis_server: RedisServer) -> None:
    reset = DailyReset(dt.time(0, 0), "America/Los_Angeles")
    relay = limiter(redis_server, Quota(per_day=5, reset=reset))
    assert await relay.take(1) == 1
    client = Redis.from_url(redis_server.url)
    now = time.time()
    [key] = await client.keys("solo-relay:test:primary:day:*")
    assert key.decode().endswith(reset.period(now))
    ttl = await client.pttl(key) / 1000
    assert abs(ttl - (reset.next_reset(now) - now)) < 5
    await client.aclose()
    await relay.aclose()


async def test_a_lost_store_falls_back_to_the_local_share_then_resyncs(
    redis_server: RedisServer,
) -> None:
    """Redis killed: the relay goes on at quota / replicas, says so, and on Redis's
    return its copies sent meanwhile are counted in the fleet's day."""
    clock = [time.time()]
    relay = limiter(redis_server, Quota(per_day=400), replicas=4, batch=1, clock=lambda: clock[0])
    assert await relay.take(10) == 10
    redis_server.stop()
    assert await relay.take(10) == 10  # the local share: 100 a day
    assert relay.degraded
    assert await relay.take(200) == 90  # no more than the share
    redis_server.start()  # an empty store again: it lost the day's count
    clock[0] += 60  # past the reconnect backoff
    assert await relay.take(5) == 5
    assert not relay.degraded
    client = Redis.from_url(redis_server.url)
    [key] = await client.keys("solo-relay:test:primary:day:*")
    assert int(await client.get(key)) == 5 + 100  # the five, and the share sent meanwhile
    await client.aclose()
    await relay.aclose()


@pytest.mark.parametrize(
    ("when", "period", "next_reset"),
    [
        ("2026-12-03T07:59:00+00:00", "2026-12-02", "2026-12-03T08:00:00+00:00"),
        ("2026-12-03T08:00:00+00:00", "2026-12-03", "2026-12-04T08:00:00+00:00"),
        # The night summer time ends: that day is 25 hours long.
        ("2026-11-01T06:59:00+00:00", "2026-10-31", "2026-11-01T07:00:00+00:00"),
        ("2026-11-01T07:00:00+00:00", "2026-11-01", "2026-11-02T08:00:00+00:00"),
    ],
)
def test_a_providers_day_in_its_own_time_zone(when: str, period: str, next_reset: str) -> None:
    reset = DailyReset(dt.time(0, 0), "America/Los_Angeles")
    now = dt.datetime.fromisoformat(when).timestamp()
    assert reset.period(now) == period
    assert reset.next_reset(now) == dt.datetime.fromisoformat(next_reset).timestamp()


async def test_a_store_slower_than_its_timeout_is_degraded_not_waited_for(
    redis_server: RedisServer,
) -> None:
    """redis-server stopped (SIGSTOP): each take answers within the timeout, at the share."""
    clock = [time.time()]
    relay = limiter(redis_server, Quota(per_day=400), replicas=4, batch=1, clock=lambda: clock[0])
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert await relay.take(10) == 10
        assert relay.degraded
        assert time.monotonic() - started < 1.0  # the 0.2 s timeout, not a hang
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    clock[0] += 60
    assert await relay.take(1) == 1
    assert not relay.degraded
    await relay.aclose()


async def test_a_store_that_requires_auth_takes_the_password_file(tmp_path: Path) -> None:
    """fleet.password_file: the store's AUTH; without it every grant fails (the local share)."""
    server = RedisServer(tmp_path, password="store-secret")
    server.start()
    try:
        secret = tmp_path / "store-password"
        secret.write_text("store-secret\n")
        fleet = FleetConfig(store=server.url, password_file=str(secret), timeout=0.5)
        relay = SharedLimiter(
            open_store(fleet),
            fleet="test",
            upstream="p",
            quota=Quota(per_day=10),
            expected_replicas=2,
        )
        assert await relay.take(3) == 3 and not relay.degraded
        await relay.aclose()
        anonymous = SharedLimiter(
            open_store(FleetConfig(store=server.url, timeout=0.5)),
            fleet="test",
            upstream="p",
            quota=Quota(per_day=10),
            expected_replicas=2,
        )
        assert await anonymous.take(3) == 3  # the local share: 10 // 2
        assert anonymous.degraded
        await anonymous.aclose()
        ok, detail = await check_store(fleet)
        assert ok, detail
        refused, detail = await check_store(FleetConfig(store=server.url, timeout=0.5))
        assert not refused and "store-secret" not in detail
    finally:
        server.stop()


async def test_a_tls_store_is_verified_against_fleet_ca_file(tmp_path: Path) -> None:
    """rediss://: the store's certificate checked against fleet.ca_file; unknown: degraded."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, authority = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(authority))
    server = RedisServer(tmp_path, tls=(cert, key))
    server.start()
    try:
        assert server.url.startswith("rediss://")
        trusted = FleetConfig(store=server.url, ca_file=str(authority), timeout=1.0)
        relay = SharedLimiter(
            open_store(trusted),
            fleet="t",
            upstream="p",
            quota=Quota(per_day=10),
            expected_replicas=2,
        )
        assert await relay.take(4) == 4 and not relay.degraded
        await relay.aclose()
        assert (await check_store(trusted))[0]
        stranger = FleetConfig(store=server.url, timeout=1.0)  # the system store only
        assert not (await check_store(stranger))[0]
    finally:
        server.stop()


async def test_a_lease_across_the_providers_reset_goes_back_to_its_own_day(
    redis_server: RedisServer,
) -> None:
    """Tokens leased before midnight are yesterday's: given back there, today's taken anew."""
    reset = DailyReset()  # midnight UTC
    midnight = reset.next_reset(time.time())
    clock = [midnight - 0.5]
    relay = limiter(redis_server, Quota(per_day=10, reset=reset), batch=8, clock=lambda: clock[0])
    assert await relay.take(1) == 1  # 8 leased from the old day, 7 held
    clock[0] = midnight + 0.1
    assert await relay.take(1) == 1
    client = Redis.from_url(redis_server.url)
    old = await client.get(f"solo-relay:test:primary:day:{reset.period(midnight - 0.5)}")
    new = await client.get(f"solo-relay:test:primary:day:{reset.period(midnight + 0.1)}")
    assert int(old) == 1  # the old day's count: the one copy sent then
    assert int(new) == 8  # today's lease
    await client.aclose()
    await relay.aclose()


async def test_an_idle_relay_gives_its_lease_back_and_rejoins_the_store_on_tick(
    redis_server: RedisServer,
) -> None:
    """tick(), with no copy asking: the lease goes back, and a returned store is rejoined."""
    clock = [time.time()]
    idle = limiter(redis_server, Quota(per_day=10), batch=8, clock=lambda: clock[0])
    other = limiter(redis_server, Quota(per_day=10), batch=8)
    assert await idle.take(1) == 1  # 7 held
    clock[0] += LEASE_SECONDS + 0.1
    await idle.tick()
    assert await other.take(10) == 9  # all but the one copy sent
    await other.aclose()
    redis_server.stop()
    await idle.give_back(1)  # the store is gone: degraded
    assert idle.degraded
    redis_server.start()
    clock[0] += 60
    await idle.tick()
    assert not idle.degraded
    await idle.aclose()
