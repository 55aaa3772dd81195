"""Delivery: the queue's workers, and the notifications they and direct mode send (SPEC 5).

Queue workers (``Deliverer``): copies due now are claimed from the spool
(``delivering``, durably), sent through the upstream pool, and their outcome
recorded durably: ``delivered``; ``deferred`` with backoff for a transient
failure; ``failed``, with a delivery status notification to the sender, for
a permanent one or once the lifetime is over. An upstream that refuses the
relay's credentials pauses all delivery instead of burning retries. Time and
randomness are injected, so the schedule is tested without sleeping.

Direct mode's reply and its copies' fates are ``relay.direct``.

The upstream is whatever ``Upstream`` the server opened; nothing here imports
a network library.
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
from datetime import UTC, datetime

from relay.config import Config
from relay.core.addresses import Address, parse_address
from relay.core.dsn import Failure, build_dsn, dsn_from_address, dsn_recipient_ok
from relay.core.errors import BadAddress
from relay.core.model import Copy, Credentials, Outcome, Stage, Status
from relay.core.policy import RateLimiter, backoff
from relay.custody.bodycache import BodyCache
from relay.custody.spool import (
    CopyState,
    Job,
    NewCopy,
    NewMessage,
    Spool,
    SpoolError,
    jobs_for,
    new_queue_id,
)
from relay.ops.eventloop import finish_within
from relay.ops.logs import AddressTokens
from relay.ops.metrics import Metrics, SpoolState
from relay.upstream.smtp import Upstream
from relay.upstream.target import dsn_credentials

log = logging.getLogger("relay.delivery")

# Failing at these stages with no reply means the upstream itself could not be reached.
_UNREACHABLE = frozenset({Stage.CONNECT, Stage.TLS, Stage.AUTH})
POLL_SECONDS = 1.0  # the longest the workers sleep without a wake-up (queue CLI retries)
# Writing down a delivered copy is retried (outside its connection slot) this soon, then
# doubling to RECORD_RETRY_MAX, for as long as the process lives: a full disk that gets
# some room back sees the record within seconds, and no slot waits for it meanwhile.
RECORD_RETRY_FIRST = 0.25
RECORD_RETRY_MAX = 5.0
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
REPLY_TEXT_CHARS = 500  # of an upstream reply logged (the spool keeps as much)


def notification(
    config: Config,
    *,
    message_id: str,
    sender: str,
    rcpt: str,
    headers: bytes,
    received: float,
    auth_user: str,
    outcome: Outcome,
    now: float,
    expired: bool,
) -> NewMessage | None:
    """The RFC 3464 report for one failed copy, ready to store, or None (off, or to <>).

    The report is a message of its own from ``<>`` to ``sender``. It is sent like any
    copy: queued, retried, with the credentials of the message it reports on
    (``auth_user``, the passthrough login) unless ``delivery.dsn_user`` names its own.
    Its ``From:`` follows ``dsn_from_address`` (``delivery.dsn_from``).
    """
    policy = config.delivery
    if not policy.dsn or not dsn_recipient_ok(sender):
        return None
    status = outcome.enhanced or ("4.4.7" if expired else "5.0.0")
    if expired and not status.startswith("4."):
        status = "4.4.7"
    diagnostic = f"{outcome.code} {outcome.enhanced} {outcome.text}".strip() if outcome.code else ""
    queue_id = new_queue_id()
    hostname = config.smtp.hostname
    try:
        author = dsn_from_address(policy.dsn_from, hostname, sender)
        data = build_dsn(
            Failure(
                queue_id=message_id,
                sender=sender,
                recipient=rcpt,
                status=status,
                diagnostic=diagnostic,
                remote_mta="",
                arrival_date=datetime.fromtimestamp(received, UTC),
                last_attempt=datetime.fromtimestamp(now, UTC),
                expired=expired,
                original_headers=headers,
            ),
            reporting_mta=hostname,
            now=datetime.fromtimestamp(now, UTC),
            message_id=f"{queue_id}@{author.rpartition('@')[2]}",
            from_address=author,
        )
    except ValueError:
        # build_dsn refuses what it cannot write safely (a sender over 254 octets):
        # the copy still fails and is counted; only the notification is lost.
        log.exception("no DSN possible", extra={"fields": {"queue_id": message_id}})
        return None
    split = data.index(b"\r\n\r\n") + 4
    return NewMessage(
        id=queue_id,
        sender="",
        smtputf8=not sender.isascii(),
        received=now,
        expires=now + policy.lifetime,
        body=data[split:],
        copies=(NewCopy(rcpt=sender, headers=data[:split], next_try=now),),
        auth_user=auth_user,
        is_dsn=True,
    )


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
        self._config = config
        # False for a spool left by a larger worker count: the gauges are the main spool's.
        self.reports_gauges = reports_gauges
        self._policy = config.delivery
        self._spool = spool
        self._upstream = upstream
        self._metrics = metrics
        self._tokens = tokens
        self._clock = clock
        self._rand = rand
        self._limiter = RateLimiter(self._policy.rate_per_second, self._policy.rate_per_day)
        self._concurrency = self._policy.concurrency or config.upstream.pool_size
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        # Outcomes being written down, by copy: each its own task, so a slow or failing
        # spool never holds a connection slot. A copy here is ``delivering`` in the spool
        # and nothing releases it, so it is never claimed (or sent) again meanwhile.
        self._settling: dict[int, asyncio.Task[None]] = {}
        self.unrecorded = 0  # delivered copies whose record failed at least once, not yet written
        self._wake = asyncio.Event()
        self._stopping = False
        self._stats_at = 0.0
        self._limited = False
        # Bodies by message: one object per message, so the upstream's per-body
        # preparation (scan, stuffing) happens once, not per copy; loads in progress.
        self._bodies = BodyCache()
        self._loading: dict[str, asyncio.Future[memoryview | None]] = {}
        # Copies stored ``delivering`` by intake and handed over in memory (no claim).
        self._ready: collections.deque[Job] = collections.deque()
        # Copies not sent whose release back to ``queued`` failed: retried by ``run``,
        # else they would stay ``delivering`` until the next start.
        self._unreleased: set[int] = set()
        self._claim_after = 0.0
        self._quarantined_seen = 0
        self.paused_until = 0.0
        # After a pause for refused credentials: one copy at a time (one login) until an
        # attempt gets past AUTH, instead of ``concurrency`` logins at once (issue 14.8).
        self.probing = False
        # The last copy's verdict on the upstream itself (for /readyz): reached or not.
        self.upstream_reachable = True
        # Passthrough: the application's credentials, by user, as last seen at AUTH (memory only).
        self.credentials: dict[str, Credentials] = {}
        # ``delivery.dsn_user``: the login for notifications, instead of their message's.
        self._dsn_credentials = dsn_credentials(config.delivery)

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
        """One copy's attempt, holding a slot; its outcome is written by ``_record``, without."""
        started = self._clock()
        try:
            outcome = await self._attempt(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the copy: it stays for a retry
            log.exception("delivery error", extra={"fields": {"queue_id": job.message_id}})
            outcome = Outcome(Status.TRANSIENT, Stage.CONNECT, text=type(exc).__name__)
        # From here the slot is free (this task ends now); the record is a task of its own,
        # not cancelled by a drain's cut of deliveries in progress.
        task = asyncio.create_task(self._record(job, outcome, self._clock() - started))
        self._settling[job.copy_id] = task
        task.add_done_callback(lambda _: self._settling.pop(job.copy_id, None))

    async def _record(self, job: Job, outcome: Outcome, latency: float) -> None:
        """Write down one outcome; a delivered copy's record is retried until it holds."""
        self._metrics.copy_outcome(outcome, latency)
        self.note_reachability(outcome)
        if not job.auth_user and outcome.auth_failed:
            self.probing = True  # when the pause ends, one copy tries the credentials first
        elif not job.auth_user and outcome.stage not in _UNREACHABLE:
            self.probing = False  # past AUTH: the credentials work again
        delay = RECORD_RETRY_FIRST
        failed = False
        while True:
            try:
                await self._settle(job, outcome)
                if failed:
                    self.unrecorded -= 1
                return
            except asyncio.CancelledError:
                if failed:
                    self.unrecorded -= 1
                raise
            except Exception as exc:
                log.error(
                    "recording a delivery failed",
                    extra={"fields": {"queue_id": job.message_id, "error": str(exc)}},
                )
            if outcome.status is not Status.DELIVERED:
                break  # not sent: back to the queue is safe
            # Sent: putting it back would send it again. It stays ``delivering`` (never
            # claimed) and the record is tried again; at a stop, the next start has it.
            if not failed:
                failed = True
                self.unrecorded += 1
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.unrecorded -= 1
                raise
            delay = min(delay * 2, RECORD_RETRY_MAX)
        # Not sent, its outcome unwritten: queued again, but not due before the first
        # retry delay, so a refusal whose record fails is not resent at once in a loop.
        now = self._clock()
        try:
            await self._spool.release([job.copy_id], now, next_try=now + self._policy.retry_initial)
        except Exception:  # the spool is in trouble: the loop tries again (``run``)
            self._unreleased.add(job.copy_id)

    async def _body(self, message_id: str) -> memoryview | None:
        """The message body as one shared view: the upstream prepares it once per message.

        Copies of one message are claimed together and start together: the first
        one loads the body, and the others wait for that load instead of repeating it.
        """
        view = self._bodies.get(message_id)
        if view is not None:
            return view
        loading = self._loading.get(message_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load_body(message_id))
            self._loading[message_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(message_id, None))
        return await asyncio.shield(loading)

    async def _load_body(self, message_id: str) -> memoryview | None:
        body = await self._spool.body(message_id)
        if body is None:
            return None
        view = memoryview(body)
        self._bodies.put(message_id, view)
        return view

    async def _attempt(self, job: Job) -> Outcome:
        body = await self._body(job.message_id)
        if body is None:
            return Outcome(Status.PERMANENT, Stage.WRITE, 0, "", "message body lost (quarantined)")
        try:
            rcpt = job.address or parse_address(job.rcpt, smtputf8=True, single_label=True)
        except BadAddress:
            rcpt = None
        if rcpt is None:
            return Outcome(Status.PERMANENT, Stage.RCPT, 553, "5.1.3", "stored recipient invalid")
        credentials = None
        if job.is_dsn and self._dsn_credentials is not None:
            credentials = self._dsn_credentials
        elif job.auth_user:
            credentials = self.credentials.get(job.auth_user)
            if credentials is None:
                return Outcome(
                    Status.TRANSIENT,
                    Stage.AUTH,
                    0,
                    "",
                    "waiting for the application to log in again",
                )
        copy = Copy(rcpt, job.headers, body, ())
        return await self._upstream.send(
            job.sender, copy, smtputf8=job.smtputf8, credentials=credentials
        )

    def note_reachability(self, outcome: Outcome) -> None:
        self.upstream_reachable = outcome.stage not in _UNREACHABLE or outcome.code >= 200

    async def _settle(self, job: Job, outcome: Outcome) -> None:
        """Write ``outcome`` down (``_record`` retries it: nothing here counts it twice)."""
        now = self._clock()
        fields: dict[str, object] = {
            "queue_id": job.message_id,
            "rcpt": self._tokens(job.rcpt),
            "stage": outcome.stage.value,
            "code": outcome.code,
            "enhanced": outcome.enhanced,
            "attempts": job.attempts + 1,
            "ambiguous": outcome.ambiguous,
        }
        if outcome.status is Status.DELIVERED:
            await self._spool.record_delivered(
                job.copy_id, now=now, attempts=job.attempts + 1, outcome=outcome
            )
            if job.is_dsn:  # counted once the upstream took it, not when it was queued
                self._metrics.dsn_sent()
            log.info("copy delivered", extra={"fields": fields})
            return
        # The upstream's own words on every failure and deferral, addresses as tokens.
        fields["reply"] = self._tokens.redact(outcome.text[:REPLY_TEXT_CHARS])
        if outcome.auth_failed and now < job.expires:
            # SPEC 5: the relay's own credentials refused: pause everything, no attempt
            # spent. An application's passthrough login refused: only its mail waits.
            resume = now + self._policy.auth_pause
            if not job.auth_user and not (job.is_dsn and self._dsn_credentials):
                self.paused_until = resume
                self._metrics.upstream_auth_paused(True)
            await self._spool.record(
                job.copy_id,
                CopyState.QUEUED,
                now=now,
                next_try=min(resume, job.expires),
                outcome=outcome,
            )
            log.error(
                "upstream refused the relay's credentials: delivery paused",
                extra={"fields": fields},
            )
            return
        permanent = outcome.status is Status.PERMANENT and not self._policy.soft_bounce
        attempts = job.attempts + 1
        if not permanent:
            delay = backoff(
                attempts,
                initial=self._policy.retry_initial,
                maximum=self._policy.retry_max,
                jitter=self._policy.retry_jitter,
                rand=self._rand(),
            )
            if now < job.expires:
                # SPEC 1: retried until the lifetime ends, so the last try is at its end.
                next_try = min(now + delay, job.expires)
                self._metrics.retry_scheduled()
                await self._spool.record(
                    job.copy_id,
                    CopyState.DEFERRED,
                    now=now,
                    next_try=next_try,
                    attempts=attempts,
                    outcome=outcome,
                )
                log.info(
                    "copy deferred",
                    extra={"fields": {**fields, "retry_in": round(next_try - now, 1)}},
                )
                return
        expired = not permanent
        dsn = self._notification(job, outcome, now, expired=expired)
        recorded = await self._spool.record(
            job.copy_id,
            CopyState.FAILED,
            now=now,
            attempts=attempts,
            also_store=dsn,
            outcome=outcome,
        )
        if not recorded:  # the copy left the spool meanwhile (deleted, quarantined): no DSN
            dsn = None
        if dsn is not None:
            self.wake()
        log.warning(
            "copy failed",
            extra={"fields": {**fields, "expired": expired, "dsn": dsn.id if dsn else None}},
        )

    def _notification(
        self, job: Job, outcome: Outcome, now: float, *, expired: bool
    ) -> NewMessage | None:
        """The RFC 3464 report for this copy, or None (off, a DSN itself, or the sender is <>)."""
        if job.is_dsn:
            return None
        return notification(
            self._config,
            message_id=job.message_id,
            sender=job.sender,
            rcpt=job.rcpt,
            headers=job.headers,
            received=job.received,
            auth_user=job.auth_user,
            outcome=outcome,
            now=now,
            expired=expired,
        )
