"""One upstream's limits counted by this relay alone, and what every limiter offers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from relay.core.policy import RateLimiter
from relay.limits.reset import DailyReset


class Limiter(Protocol):
    """How many copies may go to one upstream now; after each ``take``, why not more."""

    wait: float  # seconds until the rate lets one more copy go
    spent_until: float  # unix time of the reset, while the daily quota is used up; else 0
    left_today: int | None  # copies the day still allows (None: no quota)
    degraded: bool  # a shared limiter on its local share: the store is away

    async def take(self, want: int) -> int: ...
    async def give_back(self, count: int) -> None: ...
    async def release_stale(self) -> None: ...
    async def tick(self) -> None: ...
    async def aclose(self) -> None: ...


class LocalLimiter:
    """``RateLimiter`` with the provider's day (its reset time and zone)."""

    degraded = False

    def __init__(
        self,
        per_second: float,
        per_day: int,
        reset: DailyReset,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._reset = reset
        self._limiter = RateLimiter(per_second, per_day, day=reset.period)
        self._clock = clock
        self.wait = 0.0
        self.spent_until = 0.0
        self.left_today = per_day or None

    async def take(self, want: int) -> int:
        now = self._clock()
        allowed = self._limiter.take(now, want)
        self._note(now, allowed < want)
        return allowed

    async def give_back(self, count: int) -> None:
        self._limiter.give_back(count)
        self._note(self._clock(), False)

    async def release_stale(self) -> None:
        return None  # nothing is leased

    async def tick(self) -> None:
        return None  # nothing to keep up

    async def aclose(self) -> None:
        return None

    def _note(self, now: float, short: bool) -> None:
        self.left_today = self._limiter.left_today(now)
        spent = short and self.left_today is not None and self.left_today <= 0
        self.spent_until = self._reset.next_reset(now) if spent else 0.0
        self.wait = self._limiter.wait(now) if short and not spent else 0.0
