"""A provider's day: when its daily quota resets, in its own time zone."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo


@dataclass(frozen=True, slots=True)
class DailyReset:
    """The quota's day starts at ``at`` (local time in ``zone``; midnight UTC by default).

    SendGrid and Mailgun count days in UTC; SES a rolling 24 hours (``UTC`` is the
    nearest fixed day); a provider that resets at midnight Pacific time is
    ``DailyReset(zone="America/Los_Angeles")``.
    """

    at: dt.time = dt.time(0, 0)
    zone: str = "UTC"
    _tz: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tz", ZoneInfo(self.zone))  # raises for an unknown zone

    def _start(self, now: float) -> dt.datetime:
        """The start of the provider's day holding ``now`` (unix seconds)."""
        local = dt.datetime.fromtimestamp(now, self._tz)
        start = dt.datetime.combine(local.date(), self.at, tzinfo=self._tz)
        if start > local:
            start = dt.datetime.combine(local.date() - dt.timedelta(days=1), self.at, self._tz)
        return start

    def period(self, now: float) -> str:
        """The day's name, the same on every relay of the fleet: ``2026-12-03``."""
        return self._start(now).date().isoformat()

    def next_reset(self, now: float) -> float:
        """Unix seconds of the next reset after ``now``."""
        start = self._start(now)
        following = dt.datetime.combine(start.date() + dt.timedelta(days=1), self.at, self._tz)
        return following.timestamp()
