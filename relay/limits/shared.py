"""One upstream's rate and daily quota, shared by every relay of a fleet on Redis (or Valkey).

Rule 1: each grant is one Lua script, atomic on the server: GCRA for the rate
(the theoretical arrival time, as redis-cell and KumoMTA's throttles keep it)
and a counter for the day, read and raised together, on the server's clock
(``TIME``), so the fleet's sum never passes the quota whatever the pods' clocks
say. Keys are ``solo-relay:{fleet}:{upstream}:rate`` and ``...:day:{period}``;
a day's counter expires at the provider's reset.
Rule 2: tokens are taken in batches (one round trip for several copies) and
held for at most ``LEASE_SECONDS``; what is not used by then goes back.
Rule 3: Redis unreachable or slower than its timeout: the relay goes on at its
local share (the quota over ``expected_replicas``), tries Redis again with a
backoff, and on its return adds the copies it sent meanwhile to the day's
counter. The limiter only says how many copies may start now: it never holds,
loses or repeats a copy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.core.policy import Backoff, RateLimiter
from relay.limits.reset import DailyReset

log = logging.getLogger("relay.limits")

LEASE_SECONDS = 1.0  # tokens held unused longer than this go back to the fleet
# The tries of an unreachable store, made when a copy asks for a token: a try costs at
# most fleet.timeout, so the fleet is back on the shared budget within seconds.
RECONNECT = Backoff(initial=0.2, maximum=5.0)

# KEYS: rate, day. ARGV: want, microseconds per copy (0: no rate), burst in copies,
# copies per day (0: no quota), the day counter's expiry (unix ms). Returns
# {granted, microseconds until one more copy may go, copies counted today}.
GRANT = """
local want = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local quota = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local grant = want
local tat = now
if interval > 0 then
  tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
  grant = math.min(grant, math.max(math.floor((burst * interval - (tat - now)) / interval), 0))
end
local used = 0
if quota > 0 then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
  grant = math.min(grant, math.max(quota - used, 0))
end
if grant > 0 then
  if interval > 0 then
    tat = tat + grant * interval
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
               math.floor((tat - now) / 1000) + 1000)
  end
  if quota > 0 then
    used = redis.call('INCRBY', KEYS[2], grant)
    redis.call('PEXPIREAT', KEYS[2], ARGV[5])
  end
end
local wait = 0
if grant < want and interval > 0 then
  wait = math.max(tat + interval - burst * interval - now, 0)
end
return {grant, wait, used}
"""

# KEYS: rate, day. ARGV: copies given back, microseconds per copy, the day's expiry
# (unix ms), copies to add to the day without a rate (those sent while degraded),
# copies per day (0: no day counter).
GIVE_BACK = """
local back = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
if back > 0 and interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if tat > now then
    tat = math.max(tat - back * interval, now)
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
               math.floor((tat - now) / 1000) + 1000)
  end
end
local change = tonumber(ARGV[4]) - back
local counted = change > 0 or (change < 0 and redis.call('EXISTS', KEYS[2]) == 1)
if tonumber(ARGV[5]) > 0 and counted then
  if redis.call('INCRBY', KEYS[2], change) < 0 then
    redis.call('SET', KEYS[2], 0)
  end
  redis.call('PEXPIREAT', KEYS[2], ARGV[3])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Quota:
    """One upstream's limits: copies per second (burst: one second's worth) and per day."""

    per_second: float = 0.0
    per_day: int = 0
    reset: DailyReset = field(default_factory=DailyReset)


class SharedLimiter:
    """The fleet's budget for one upstream, with the local share as a fallback (Rule 3)."""

    def __init__(
        self,
        client: Redis,
        *,
        fleet: str,
        upstream: str,
        quota: Quota,
        expected_replicas: int,
        batch: int = 8,
        close_client: bool = True,
        on_store: Callable[[bool, float | None], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Told after each round trip: (degraded, its seconds), or (True, None) when it failed.
        self._on_store = on_store or (lambda degraded, latency: None)
        self._client = client
        self._close_client = close_client  # False: the client is shared, its owner closes it
        self._prefix = f"solo-relay:{fleet}:{upstream}"
        self._quota = quota
        self._interval = round(1_000_000 / quota.per_second) if quota.per_second else 0
        self._burst = max(int(quota.per_second), 1)
        self._batch = max(batch, 1)
        self._clock = clock
        self._grant = client.register_script(GRANT)
        self._give_back = client.register_script(GIVE_BACK)
        share = max(expected_replicas, 1)
        self._local = RateLimiter(
            quota.per_second / share, quota.per_day // share, day=quota.reset.period
        )
        self._held = 0  # granted by the fleet, not yet used
        self._held_since = 0.0
        self._unsynced = 0  # sent at the local share while the store was away
        self.degraded = False
        self._failures = 0
        self._retry_at = 0.0
        self.latency = 0.0  # seconds of the last round trip to the store
        self.wait = 0.0  # seconds until the fleet's rate lets one more copy go
        self.spent_until = 0.0  # the fleet's daily quota is used up until this reset
        self.left_today: int | None = quota.per_day or None

    async def take(self, want: int) -> int:
        """How many of ``want`` copies may start now (0 to ``want``)."""
        if want <= 0:
            return 0
        now = self._clock()
        await self.release_stale()  # an old lease goes back before a new one
        if self._held and self._quota.reset.period(self._held_since) != self._quota.reset.period(
            now
        ):
            await self.give_back(0)  # a lease of yesterday's quota is not today's to spend
        if self._held >= want:
            self._held -= want
            return want
        if self.degraded and now < self._retry_at:
            return self._take_local(now, want)
        ask = max(want - self._held, self._batch)
        try:
            granted = await self._call_grant(ask, now)
        except (RedisError, OSError, TimeoutError) as exc:
            self._degrade(now, exc)
            return self._take_local(now, want)
        if self.degraded:
            await self._recovered()
        if granted and not self._held:
            self._held_since = now
        self._held += granted
        allowed = min(self._held, want)
        self._held -= allowed
        return allowed

    async def tick(self) -> None:
        """Upkeep while idle (the router calls it every second): an unused lease goes back
        to the fleet, and a store that was away is tried again once its backoff is over."""
        await self.release_stale()
        now = self._clock()
        if not self.degraded or now < self._retry_at:
            return
        try:
            await self._call_grant(0, now)  # a grant of nothing: the store answers, or not
        except (RedisError, OSError, TimeoutError) as exc:
            self._degrade(now, exc)
            return
        await self._recovered()

    async def release_stale(self) -> None:
        """Give back a lease held unused for more than ``LEASE_SECONDS`` (call it when idle)."""
        if self._held and self._clock() - self._held_since > LEASE_SECONDS:
            await self.give_back(0)

    async def give_back(self, count: int) -> None:
        """Return ``count`` copies taken but not started, and any unused lease."""
        if self.degraded:
            self._local.give_back(count)
            self._unsynced = max(self._unsynced - count, 0)
            return
        at = self._held_since if self._held else self._clock()  # the day the lease was taken
        back = count + self._held
        self._held = 0
        if back <= 0:
            return
        try:
            await self._call_give_back(back, 0, at=at)
        except (RedisError, OSError, TimeoutError) as exc:
            self._degrade(self._clock(), exc)

    async def aclose(self) -> None:
        """Hand back what is held, then close the connection to the store."""
        try:
            await self.give_back(0)
        finally:
            if self._close_client:
                await self._client.aclose()

    # -- the store -------------------------------------------------------------------

    def _keys(self, now: float) -> list[str]:
        return [f"{self._prefix}:rate", f"{self._prefix}:day:{self._quota.reset.period(now)}"]

    def _expiry_ms(self, now: float) -> int:
        return int(self._quota.reset.next_reset(now) * 1000)

    async def _call_grant(self, ask: int, now: float) -> int:
        started = time.monotonic()
        args = [ask, self._interval, self._burst, self._quota.per_day, self._expiry_ms(now)]
        granted, wait, used = await self._grant(keys=self._keys(now), args=args)
        self.latency = time.monotonic() - started
        self._on_store(False, self.latency)
        self.wait = int(wait) / 1_000_000
        if self._quota.per_day:
            self.left_today = max(self._quota.per_day - int(used), 0)
            spent = int(granted) < ask and self.left_today == 0
            self.spent_until = self._quota.reset.next_reset(now) if spent else 0.0
        return int(granted)

    async def _call_give_back(self, back: int, add: int, *, at: float | None = None) -> None:
        """``back`` tokens to the day holding ``at`` (default: now), ``add`` copies sent."""
        day = self._clock() if at is None else at
        args = [back, self._interval, self._expiry_ms(day), add, self._quota.per_day]
        await self._give_back(keys=self._keys(day), args=args)

    # -- degraded: the local share (Rule 3) -------------------------------------------

    def _take_local(self, now: float, want: int) -> int:
        allowed = self._local.take(now, want)
        self._unsynced += allowed
        self.left_today = self._local.left_today(now)
        spent = allowed < want and self.left_today is not None and self.left_today <= 0
        self.spent_until = self._quota.reset.next_reset(now) if spent else 0.0
        self.wait = self._local.wait(now) if allowed < want and not spent else 0.0
        return allowed

    def _degrade(self, now: float, exc: BaseException) -> None:
        self._failures += 1
        self._retry_at = now + RECONNECT.delay(self._failures)
        self._held = 0  # a lease the store may have lost: counted there already, never reused
        self._on_store(True, None)
        if not self.degraded:
            self.degraded = True
            log.warning(
                "shared limits unreachable: sending at the local share",
                extra={"fields": {"limits": self._prefix, "error": type(exc).__name__}},
            )

    async def _recovered(self) -> None:
        self.degraded = False
        self._failures = 0
        log.info("shared limits back", extra={"fields": {"limits": self._prefix}})
        unsynced, self._unsynced = self._unsynced, 0
        if unsynced:  # the day's count learns what was sent meanwhile (no rate cost)
            try:
                await self._call_give_back(0, unsynced)
            except (RedisError, OSError, TimeoutError) as exc:
                self._unsynced = unsynced
                self._degrade(self._clock(), exc)
