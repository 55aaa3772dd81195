"""The worker loop: copies due now claimed from the spool, or handed over, and sent.

Copies due now are claimed from the spool (``delivering``, durably) or handed over
by intake, and sent through the upstream pool, at most ``concurrency`` at once and
within the rate limits; each outcome is then written down by the ``Settler``
(``relay.delivery.settle``), outside its connection slot. Time and randomness are
injected, so the schedule is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Sequence

from relay.config import Config
from relay.core.addresses import Address
from relay.core.model import Credentials, Outcome, Stage, Status
from relay.core.policy import RateLimiter
from relay.custody.bodycache import BodyCache
from relay.custody.spool import Job, NewMessage, Spool, SpoolError, jobs_for
from relay.delivery.attempt import Attempts
from relay.delivery.bodies import SharedBodies
from relay.delivery.settle import Settler
from relay.ops.eventloop import finish_within
from relay.ops.logs import AddressTokens
from relay.ops.metrics import Metrics, SpoolState
from relay.upstream.smtp import Upstream
from relay.upstream.target import dsn_credentials

log = logging.getLogger("relay.delivery")

POLL_SECONDS = 1.0  # the longest the workers sleep without a wake-up (queue CLI retries)
# At a stop, outcomes still being written get at least this long even when the drain's
# grace is spent: a delivered copy not written down is sent again after the restart.
RECORD_GRACE = 2.0
# Bodies of handed-over copies held in memory at most; past this, new mail waits in the
# spool as ``queued`` and its body is read back when its copies are claimed.
HANDOVER_BYTES = 64 * 1024 * 1024
# Copies handed over by intake and waiting for a free slot (each holds its header section;
# their bodies are in the body cache). Past this, new mail waits in the spool as ``queued``.
READY_COPIES = 5000
# While handed-over copies wait, the spool is asked for its own due copies at most this
# often when its last answer was short (a backlog of retries gets the larger half of the
# slots, at least one).
CLAIM_SECONDS = 0.1
STATS_SECONDS = 5.0  # how often the spool gauges are refreshed


class Deliverer:
    """The queue's workers: claim due copies, send them, record what happened."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        upstream: Upstream,
        metrics: Metrics,
        tokens: AddressTokens,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        reports_gauges: bool = True,
    ) -> None:
        # False for a spool left by a larger worker count: the gauges are the main spool's.
        self.reports_gauges = reports_gauges
        self._policy = config.delivery
        self._spool = spool
        self._metrics = metrics
        self._clock = clock
        self._limiter = RateLimiter(self._policy.rate_per_second, self._policy.rate_per_day)
        self._concurrency = self._policy.concurrency or config.upstream.pool_size
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._stats_at = 0.0
        self._limited = False
        self._bodies = BodyCache()  # one body object per message (``SharedBodies`` loads them)
        # Copies stored ``delivering`` by intake and handed over in memory (no claim).
        self._ready: collections.deque[Job] = collections.deque()
        self._claim_after = 0.0
        self._quarantined_seen = 0
        # Passthrough: the application's credentials, by user, as last seen at AUTH (memory only).
        self.credentials: dict[str, Credentials] = {}
        # ``delivery.dsn_user``: the login for notifications, instead of their message's.
        logins = dsn_credentials(config.delivery)
        shared = SharedBodies(spool, self._bodies)
        self._attempts = Attempts(upstream, shared, self.credentials, logins)
        self._settler = Settler(
            config,
            spool,
            metrics,
            tokens,
            clock=clock,
            rand=rand,
            wake=self.wake,
            dsn_credentials=logins,
        )
        self._settling = self._settler.settling
        self._unreleased = self._settler.unreleased

    @property
    def paused_until(self) -> float:
        return self._settler.paused_until

    @property
    def probing(self) -> bool:
        return self._settler.probing

    @property
    def unrecorded(self) -> int:
        return self._settler.unrecorded

    @property
    def upstream_reachable(self) -> bool:
        return self._settler.upstream_reachable

    def note_reachability(self, outcome: Outcome) -> None:
        self._settler.note_reachability(outcome)

    def __repr__(self) -> str:
        return (
            f"<Deliverer in_flight={len(self._in_flight)} settling={len(self._settling)}"
            f" paused_until={self.paused_until:.0f}>"
        )

    def wake(self) -> None:
        self._wake.set()

    def can_take(self, copies: int, size: int) -> bool:
        """Whether a message (``copies``, ``size`` body bytes) may be handed over.

        Not while stopping, paused, held back by a rate limit, or with enough copies
        or body bytes waiting in memory already.
        """
        return (
            not self._stopping
            and not self._limited
            and self.paused_until <= self._clock()
            and len(self._ready) + copies <= READY_COPIES
            and self._bodies.bytes + size <= HANDOVER_BYTES
        )

    def hand_over(
        self, message: NewMessage, copy_ids: Sequence[int], addresses: Sequence[Address]
    ) -> bool:
        """Take ``message``'s copies, stored ``delivering``, straight into the ready line.

        Saves the claim and the body read a spooled copy costs. False when delivery is
        stopping: the caller must ``release`` the copies (back to ``queued``).
        """
        if self._stopping:
            return False
        self._bodies.expect(message.id, len(copy_ids))
        self._bodies.put(message.id, memoryview(message.body))
        self._ready.extend(jobs_for(message, copy_ids, addresses))
        self._wake.set()
        return True

    async def run(self) -> None:
        """Deliver until ``drain``: claim what is due, then sleep until woken or due."""
        while not self._stopping:
            now = self._clock()
            self._wake.clear()
            try:
                if self._unreleased:  # copies not sent whose way back to the queue failed
                    retry = sorted(self._unreleased)
                    await self._spool.release(retry, now)
                    self._unreleased.difference_update(retry)
                started = await self.step(now)
                if self.reports_gauges and now - self._stats_at >= STATS_SECONDS:
                    await self.refresh_gauges(now)
                next_due = None if started else await self._spool.next_due()
            except SpoolError as exc:  # a full disk, a busy lock: one line, not a traceback
                log.error(
                    "delivery loop: spool unavailable; retrying",
                    extra={"fields": {"error": str(exc)}},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=POLL_SECONDS)
                continue
            except Exception:
                # A damaged row, a bug: the workers must outlive them all.
                log.exception("delivery loop error; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=POLL_SECONDS)
                continue
            if started:
                await asyncio.sleep(0)
                continue
            delay = POLL_SECONDS
            if self.paused_until > now:
                delay = min(delay, self.paused_until - now)
            if next_due is not None:
                delay = min(delay, max(next_due - now, 0.0))
            if len(self._in_flight) >= self._concurrency or self._limited:
                delay = POLL_SECONDS  # woken when a delivery ends; rate limits wait their turn
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 0.01))

    async def step(self, now: float) -> int:
        """Start deliveries for the copies due at ``now``; return how many started."""
        if self.paused_until > now or self._stopping:
            return 0
        free = self._concurrency - len(self._in_flight)
        if self.probing:  # one probe copy, one login, until the credentials work again
            # Its outcome is written (and a refusal pauses) after its slot is free: no
            # other copy starts until that record is done either.
            free = min(free, 1 - len(self._in_flight) - len(self._settling))
        allowed = self._limiter.take(now, free) if free > 0 else 0
        self._limited = free > 0 and allowed <= 0
        if allowed <= 0:
            return 0
        try:
            jobs = await self._take(now, allowed)
        except BaseException:
            self._limiter.give_back(allowed)  # nothing started
            raise
        if self._stopping:  # ``drain`` began during the claim: it cannot see these
            self._limiter.give_back(allowed)
            for job in jobs:
                self._bodies.done(job.message_id)
            await self._spool.release([job.copy_id for job in jobs], now)
            return 0
        self._limiter.give_back(allowed - len(jobs))
        self._start(jobs)
        return len(jobs)

    async def _take(self, now: float, allowed: int) -> list[Job]:
        """Up to ``allowed`` jobs: handed-over ones, and copies due in the spool.

        With copies waiting in memory, the spool is still asked (at most every
        ``CLAIM_SECONDS`` while it has nothing due) and gets the larger half of the
        slots, at least one, so a stream of new mail never starves retries.
        """
        claim = not self._ready or now >= self._claim_after
        share = allowed // 2 if claim else allowed  # the spool gets the larger half, at least 1
        jobs = [self._ready.popleft() for _ in range(min(share, len(self._ready)))]
        if claim and allowed > len(jobs):
            try:
                claimed = await self._spool.claim_due(now, allowed - len(jobs))
            except BaseException:
                self._ready.extendleft(reversed(jobs))  # not started: they wait their turn
                raise
            if len(claimed) < allowed - len(jobs):
                self._claim_after = now + CLAIM_SECONDS
            for job in claimed:
                self._bodies.expect(job.message_id)
            jobs += claimed
        while self._ready and len(jobs) < allowed:
            jobs.append(self._ready.popleft())
        return jobs

    def _start(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            task = asyncio.create_task(self._deliver(job))
            self._in_flight[job.copy_id] = task
            task.add_done_callback(functools.partial(self._finished, job))

    def _finished(self, job: Job, _: object) -> None:
        self._in_flight.pop(job.copy_id, None)
        self._bodies.done(job.message_id)
        self._wake.set()

    async def run_once(self, now: float) -> int:
        """Claim what is due at ``now`` and wait for every delivery (for tests and tools)."""
        started = await self.step(now)
        while self._in_flight or self._settling:
            await asyncio.gather(*self._in_flight.values(), *self._settling.values())
        return started

    async def drain(self, grace: float) -> None:
        """Stop claiming; let deliveries finish until ``grace``; put the rest back in the queue.

        A spool that cannot be written (a full disk) leaves copies ``delivering``, which
        the next start puts back in the queue; the drain itself never raises for it.
        """
        self._stopping = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        waiting = [job.copy_id for job in self._ready] + sorted(self._unreleased)
        self._unreleased.clear()
        for job in self._ready:
            self._bodies.done(job.message_id)
        self._ready.clear()
        await self._release_quietly(waiting)
        in_flight = dict(self._in_flight)
        if in_flight:
            pending = await finish_within(in_flight.values(), grace)
            # Taken from the snapshot: a finished task's callback has left ``_in_flight``.
            leftover = [copy_id for copy_id, task in in_flight.items() if task in pending]
            await self._release_quietly(leftover)
        settling = dict(self._settling)
        if settling:
            pending = await finish_within(
                settling.values(), max(deadline - loop.time(), RECORD_GRACE)
            )
            if pending:
                log.error(
                    "delivered copies not yet recorded at stop: left 'delivering' for the"
                    " next start, which sends them again",
                    extra={"fields": {"copies": len(pending)}},
                )
        await self._release_quietly(sorted(self._unreleased))
        self._unreleased.clear()

    async def _release_quietly(self, copy_ids: Sequence[int]) -> None:
        if not copy_ids:
            return
        try:
            await self._spool.release(copy_ids, self._clock())
        except Exception as exc:
            log.error(
                "cannot put copies back in the queue; the next start does",
                extra={"fields": {"copies": len(copy_ids), "error": str(exc)}},
            )

    async def refresh_gauges(self, now: float) -> None:
        self._stats_at = now
        counts, oldest = await self._spool.stats()
        self._metrics.spool_copies({SpoolState(state.value): n for state, n in counts.items()})
        self._metrics.oldest_queued_age(0.0 if oldest is None else max(now - oldest, 0.0))
        self._metrics.upstream_auth_paused(self.paused_until > now)
        # Records quarantined since the last look (at open, or found while running).
        self._metrics.quarantined(self._spool.quarantined - self._quarantined_seen)
        self._quarantined_seen = self._spool.quarantined
        self._metrics.quarantine_present(await self._spool.quarantine_present())

    async def _deliver(self, job: Job) -> None:
        """One copy's attempt, holding a slot; the ``Settler`` writes its outcome, without."""
        started = self._clock()
        try:
            outcome = await self._attempts.attempt(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the copy: it stays for a retry
            log.exception("delivery error", extra={"fields": {"queue_id": job.message_id}})
            outcome = Outcome(Status.TRANSIENT, Stage.CONNECT, text=type(exc).__name__)
        # From here the slot is free (this task ends now); the record is a task of its own,
        # not cancelled by a drain's cut of deliveries in progress.
        self._settler.start(job, outcome, self._clock() - started)
