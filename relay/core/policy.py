"""Pure delivery policy (SPEC 5): reply classification, retry backoff, rate limits.

Rule 1: 4xx, no reply, any failure before MAIL, and ``552`` at RCPT (RFC 5321
4.5.3.1.10) are transient; other 5xx are permanent.
Rule 2: an AUTH refusal is transient, and a 5xx one (``535``) sets
``auth_failed``: bad credentials pause delivery instead of bouncing mail.
So does ``530`` (RFC 4954 6: authentication required) at any later stage:
the credentials are missing, which is no fault of the copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from relay.core.model import Outcome, Stage, Status

DAY = 86_400.0
AUTH_REQUIRED = 530  # RFC 4954 6

_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?= |$)")  # RFC 3463


def split_enhanced(code: int, text: str) -> tuple[str, str]:
    """The RFC 3463 code leading the reply text (only if its class matches), and the rest."""
    lines = text.split("\n")
    match = _ENHANCED.match(lines[0])
    if match is None or int(match[1]) != code // 100:
        return "", " ".join(lines)
    enhanced = match[0]
    rest = [ln[len(enhanced) :].lstrip() if ln.startswith(enhanced) else ln for ln in lines]
    return enhanced, " ".join(rest)


def classify_reply(stage: Stage, code: int, text: str) -> Outcome:
    """A refusal (any reply but the one expected) at ``stage``, as an outcome."""
    enhanced, text = split_enhanced(code, text)
    if stage is Stage.AUTH:  # bad credentials: pause and alert, never bounce (SPEC 5)
        return Outcome(Status.TRANSIENT, stage, code, enhanced, text, auth_failed=code >= 500)
    if code == AUTH_REQUIRED and stage not in (Stage.CONNECT, Stage.TLS):
        return Outcome(Status.TRANSIENT, stage, code, enhanced, text, auth_failed=True)
    permanent = (
        500 <= code < 600
        and stage not in (Stage.CONNECT, Stage.TLS)  # about the connection, not this copy
        and not (stage is Stage.RCPT and code == 552)  # RFC 5321 4.5.3.1.10
    )
    return Outcome(Status.PERMANENT if permanent else Status.TRANSIENT, stage, code, enhanced, text)


def backoff(attempt: int, *, initial: float, maximum: float, jitter: float, rand: float) -> float:
    """Seconds before retry number ``attempt`` (1 = the first retry).

    ``initial`` doubling up to ``maximum``, then spread by +/- ``jitter`` with
    ``rand`` in [0, 1) (stamina's shape), so copies that failed together do not
    come back together.
    """
    # The exponent stops at 1000 (2.0 ** 1024 overflows): a record retried every 5 s
    # passes attempt 1024 within 90 minutes, long after ``maximum`` was reached.
    base = min(initial * 2.0 ** min(max(attempt - 1, 0), 1000), maximum)
    return float(base * (1 - jitter + 2 * jitter * rand))


@dataclass(frozen=True, slots=True)
class Backoff:
    """One retry schedule, as a value: ``backoff`` with its parameters fixed.

    The queue's retries (``delivery.retry_*``, jittered) and a delivered copy's
    record being written again (no jitter) are both this; the callers only sleep
    for (or schedule) what ``delay`` decides.
    """

    initial: float
    maximum: float
    jitter: float = 0.0

    def delay(self, attempt: int, rand: float = 0.5) -> float:
        """Seconds before retry number ``attempt`` (1 = the first retry); see ``backoff``."""
        return backoff(
            attempt, initial=self.initial, maximum=self.maximum, jitter=self.jitter, rand=rand
        )


def _utc_day(now: float) -> int:
    return int(now // DAY)


class RateLimiter:
    """Copies per second (a token bucket holding one second) and per UTC day; 0 is no limit."""

    def __init__(
        self, per_second: float, per_day: int, *, day: Callable[[float], object] = _utc_day
    ) -> None:
        self._per_second = per_second
        self._per_day = per_day
        self._day_of = day  # the day holding a moment: a UTC day, or a provider's (its reset)
        self._tokens = max(per_second, 1.0)
        self._stamp = 0.0
        self._day: object = None
        self._today = 0

    def take(self, now: float, wanted: int) -> int:
        """How many of ``wanted`` copies may start at ``now`` (they are counted as sent)."""
        allowed = wanted
        if self._per_second:
            capacity = max(self._per_second, 1.0)
            elapsed = max(now - self._stamp, 0.0)  # a wall clock set back refills nothing
            self._tokens = min(capacity, self._tokens + elapsed * self._per_second)
            self._stamp = now
            allowed = min(allowed, int(self._tokens))
        if self._per_day:
            day = self._day_of(now)
            if day != self._day:
                self._day, self._today = day, 0
            allowed = min(allowed, self._per_day - self._today)
        allowed = max(allowed, 0)
        if self._per_second:
            self._tokens -= allowed
        self._today += allowed
        return allowed

    def give_back(self, count: int) -> None:
        """Return tokens for copies taken but not started."""
        if self._per_second:
            self._tokens += count
        self._today -= count

    def left_today(self, now: float) -> int | None:
        """Copies the daily quota still allows (``None``: no quota)."""
        if not self._per_day:
            return None
        return self._per_day if self._day_of(now) != self._day else self._per_day - self._today

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until the rate lets one more copy go (0: it does now)."""
        if not self._per_second:
            return 0.0
        tokens = self._tokens + max(now - self._stamp, 0.0) * self._per_second
        return max(1.0 - tokens, 0.0) / self._per_second
