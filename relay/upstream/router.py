"""Several upstreams behind one ``Upstream``: failover, overflow, and each one's limits.

Rule 1: each copy goes where ``relay.core.routing.route`` says: the first
upstream that serves it (its sender domain, its login), is up and has quota,
in the configured order and by role. A refusal that is the upstream's fault
(``routing.blame``) sends the copy on to the next upstream at once; a refusal
about the copy itself is its outcome, never tried elsewhere.
Rule 2: each upstream's rate and daily quota are its limiter's: this relay's
own count, or the fleet's on the shared store (``relay.limits``). A rate
waits its turn (the copy holds its delivery slot meanwhile); a spent quota
makes the upstream ``spent`` until the provider's reset, and copies overflow.
A copy that was not accepted gives its token back: providers count what they
accept.
Rule 3: with a single upstream nothing is ever marked down (there is nowhere
else to go: each copy tries it, as without a router).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay.config import Config, RouteConfig
from relay.core.model import Copy, Credentials, Outcome, Stage, Status
from relay.core.policy import Backoff
from relay.core.routing import Blame, Candidate, Health, blame, route
from relay.limits.local import Limiter, LocalLimiter
from relay.limits.reset import DailyReset
from relay.limits.shared import Quota, SharedLimiter
from relay.limits.store import open_store
from relay.ops.health import write_upstreams
from relay.ops.metrics import Metrics
from relay.upstream.outbox import CheckStep
from relay.upstream.smtp import Upstream, open_upstream
from relay.upstream.target import parse_upstream_url

log = logging.getLogger("relay.upstream")

DOWN_AFTER = 5  # copy deferrals (4xx) in a row that mark an upstream down
DOWN_RETRY = Backoff(initial=10.0, maximum=300.0)  # a down upstream is tried again after
RATE_WAIT_MAX = 1.0  # seconds one sleep for a rate token lasts at most (then look again)


class State(enum.Enum):
    """An upstream's state, as metrics and ``queue stats`` show it."""

    UP = "up"
    DOWN = "down"
    SPENT = "spent"


@dataclass(slots=True)
class Route:
    """One configured upstream with its connection pool, its limiter and its health."""

    config: RouteConfig
    upstream: Upstream
    limiter: Limiter
    health: Health = field(default_factory=Health)
    sent: int = 0
    failovers: int = 0  # copies it passed on to the next upstream

    @property
    def name(self) -> str:
        return self.config.name

    def state(self, now: float) -> State:
        if self.limiter.spent_until > now:
            return State.SPENT
        return State.UP if self.health.up(now) else State.DOWN


class Router:
    """The ``Upstream`` of a relay with several upstreams (or one, on shared limits)."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        on_close: Callable[[], object] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.routes = tuple(routes)
        self._by_name = {r.name: r for r in self.routes}
        self._on_close = on_close
        self._metrics = metrics
        self._clock = clock
        self._shared = on_close is not None  # the shared store's client is closed with it
        if metrics is not None:
            quotas = {r.name: r.config.rate_per_day for r in self.routes if r.config.rate_per_day}
            metrics.upstreams([r.name for r in self.routes], quotas=quotas)

    def __repr__(self) -> str:
        return f"<Router {', '.join(r.name for r in self.routes)}>"

    async def send(
        self, mail_from: str, copy: Copy, *, smtputf8: bool, credentials: Credentials | None = None
    ) -> Outcome:
        domain = mail_from.rpartition("@")[2].lower()
        tried: set[str] = set()
        last: Outcome | None = None
        while True:
            now = self._clock()
            choice = route(self._candidates(now, domain, credentials), tried=frozenset(tried))
            if choice.name is None:
                return last or _nowhere(choice.reason)
            chosen = self._by_name[choice.name]
            if not await self._token(chosen):
                continue  # its quota is spent now: routing sees it and overflows
            outcome = await chosen.upstream.send(
                mail_from, copy, smtputf8=smtputf8, credentials=credentials
            )
            await self._count(chosen, outcome)
            if blame(outcome) is not Blame.UPSTREAM:
                return outcome
            tried.add(chosen.name)
            last = outcome
            if len(tried) < len(self.routes):
                chosen.failovers += 1
                if self._metrics is not None:
                    self._metrics.failover(chosen.name)
                log.info(
                    "copy passed to the next upstream",
                    extra={"fields": {"upstream": chosen.name, "stage": outcome.stage.value}},
                )

    def _candidates(
        self, now: float, domain: str, credentials: Credentials | None
    ) -> list[Candidate]:
        alone = len(self.routes) == 1  # Rule 3
        if self._metrics is not None:
            for r in self.routes:
                self._metrics.upstream_state(r.name, r.state(now).value)
        return [
            Candidate(
                r.name,
                r.config.role,
                up=alone or r.health.up(now),
                spent=r.limiter.spent_until > now,
                serves=_serves(r.config, domain, credentials),
            )
            for r in self.routes
        ]

    async def _token(self, chosen: Route) -> bool:
        """Rule 2: wait for a rate token; False when the daily quota is spent."""
        waited = False
        while not await chosen.limiter.take(1):
            if chosen.limiter.spent_until:
                log.warning("upstream quota spent", extra={"fields": {"upstream": chosen.name}})
                if self._metrics is not None:
                    self._metrics.upstream_state(chosen.name, State.SPENT.value)
                return False
            if not waited and self._metrics is not None:
                self._metrics.limiter_waited(chosen.name)
            waited = True
            await asyncio.sleep(min(max(chosen.limiter.wait, 0.001), RATE_WAIT_MAX))
        return True

    async def _count(self, chosen: Route, outcome: Outcome) -> None:
        before = chosen.health.up(self._clock())
        chosen.health = chosen.health.after(
            outcome, self._clock(), down_after=DOWN_AFTER, retry=DOWN_RETRY
        )
        if outcome.status is Status.DELIVERED or outcome.ambiguous:
            chosen.sent += 1
            if self._metrics is not None:
                self._metrics.upstream_sent(chosen.name, chosen.limiter.left_today)
        else:
            await chosen.limiter.give_back(1)  # not accepted: not counted by the provider
        if before and not chosen.health.up(self._clock()) and len(self.routes) > 1:
            log.warning(
                "upstream down",
                extra={"fields": {"upstream": chosen.name, "stage": outcome.stage.value}},
            )

    def report(self, now: float) -> list[dict[str, object]]:
        """Each upstream as ``queue stats`` shows it: role, state, copies, quota."""
        return [
            {
                "name": r.name,
                "role": r.config.role.value,
                "state": r.state(now).value,
                "sent": r.sent,
                "failovers": r.failovers,
                "quota": r.config.rate_per_day or None,
                "quota_left": r.limiter.left_today,
            }
            for r in self.routes
        ]

    async def report_periodically(self, path: Path, interval: float) -> None:
        """Every ``interval``: each limiter's idle upkeep (``tick``), then ``report`` into
        ``path`` (``solo-relay queue stats`` reads it)."""
        while True:
            for r in self.routes:  # idle upkeep: leases back, an away store tried again
                await r.limiter.tick()
            with contextlib.suppress(OSError):  # a full disk: the next write may land
                write_upstreams(path, self.report(self._clock()), self.store_state)
            await asyncio.sleep(interval)

    @property
    def store_state(self) -> str:
        """``shared``, ``degraded`` (on the local shares), or ``local`` (no shared store)."""
        if not self._shared:
            return "local"
        return "degraded" if any(r.limiter.degraded for r in self.routes) else "shared"

    async def check(self) -> list[CheckStep]:
        """Every upstream's steps, each named ``upstream/step``."""
        steps: list[CheckStep] = []
        for r in self.routes:
            for step in await r.upstream.check():
                steps.append(CheckStep(f"{r.name}/{step.name}", step.ok, step.detail))
        return steps

    async def aclose(self) -> None:
        for r in self.routes:
            await r.upstream.aclose()
            await r.limiter.aclose()
        if self._on_close is not None:
            result = self._on_close()
            if asyncio.iscoroutine(result):
                await result


def _serves(config: RouteConfig, domain: str, credentials: Credentials | None) -> bool:
    """Whether an upstream may take a copy from ``domain`` with ``credentials`` (or none)."""
    if credentials is not None and not config.passthrough:
        return False
    return not config.sender_domains or domain in config.sender_domains


def _nowhere(reason: str) -> Outcome:
    return Outcome(Status.TRANSIENT, Stage.CONNECT, 0, "", f"no upstream can take it now: {reason}")


def open_routes(
    config: Config, *, helo_name: str | None = None, metrics: Metrics | None = None
) -> Upstream:
    """The upstream of ``config``: one as before, or a ``Router`` over ``config.routes``.

    ``[upstream]`` alone without a shared store is itself (its rate is the delivery
    loop's, ``delivery.rate_*``, as it always was); any ``[[upstreams]]`` list, even
    of one, is routed, each with its own limits. Raises ``ConfigError`` naming the
    bad key.
    """
    routes = config.routes
    if not config.upstreams and not config.fleet.store:
        return open_upstream(routes[0], helo_name=helo_name)
    client = open_store(config.fleet) if config.fleet.store else None
    built = []
    for r in routes:
        reset = DailyReset(_day_start(r.day_resets_at), r.time_zone)
        limiter: Limiter
        if client is None:
            limiter = LocalLimiter(r.rate_per_second, r.rate_per_day, reset)
        else:
            limiter = SharedLimiter(
                client,
                fleet=config.fleet.name,
                upstream=r.name,
                quota=Quota(r.rate_per_second, r.rate_per_day, reset),
                expected_replicas=config.fleet.expected_replicas,
                batch=config.fleet.batch,
                close_client=False,
                on_store=None if metrics is None else _store_observer(metrics),
            )
        built.append(Route(r, open_upstream(r, helo_name=helo_name), limiter))
    return Router(built, on_close=None if client is None else client.aclose, metrics=metrics)


def _store_observer(metrics: Metrics) -> Callable[[bool, float | None], None]:
    def observe(degraded: bool, latency: float | None) -> None:
        metrics.store(degraded=degraded, latency=latency)

    return observe


def _day_start(text: str) -> dt.time:
    hours, minutes = text.split(":")
    return dt.time(int(hours), int(minutes))


def states(upstream: Upstream | None, config: Config) -> dict[str, str]:
    """Each upstream's state now: up, down or spent (one alone, on local limits: up)."""
    if isinstance(upstream, Router):
        now = time.time()
        return {r.name: r.state(now).value for r in upstream.routes}
    return {r.name: "up" for r in config.routes}


def describe(config: Config) -> str:
    """The upstream's URL without its password; with several, ``name=URL`` each."""
    shown = [
        (r.name, parse_upstream_url(r.url, insecure=r.insecure).redacted()) for r in config.routes
    ]
    if not config.upstreams:
        return shown[0][1]
    return ", ".join(f"{name}={url}" for name, url in shown)
