"""Settling: each attempt's outcome written down in the spool, outside its connection slot.

``delivered``; ``deferred`` with backoff for a transient failure; ``failed``, with a
delivery status notification to the sender, for a permanent one or once the
lifetime is over. An upstream that refuses the relay's credentials pauses all
delivery instead of burning retries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from relay.config import Config
from relay.core.model import Credentials, Outcome, Stage, Status
from relay.core.policy import Backoff
from relay.custody.spool import CopyState, Job, Spool
from relay.delivery.notify import notification_for
from relay.ops.logs import AddressTokens
from relay.ops.metrics import Metrics

log = logging.getLogger("relay.delivery")

# Failing at these stages with no reply means the upstream itself could not be reached.
_UNREACHABLE = frozenset({Stage.CONNECT, Stage.TLS, Stage.AUTH})
# Writing down a delivered copy is retried (outside its connection slot) after 0.25 s,
# then doubling to 5 s, for as long as the process lives: a full disk that gets some
# room back sees the record within seconds, and no slot waits for it meanwhile.
RECORD_RETRY = Backoff(initial=0.25, maximum=5.0)
REPLY_TEXT_CHARS = 500  # of an upstream reply logged (the spool keeps as much)


class Settler:
    """Writes outcomes down, and keeps what they say about the upstream (pause, reachability)."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        metrics: Metrics,
        tokens: AddressTokens,
        *,
        clock: Callable[[], float],
        rand: Callable[[], float],
        wake: Callable[[], None],
        dsn_credentials: Credentials | None,
    ) -> None:
        self._config = config
        self._policy = config.delivery
        self._spool = spool
        self._metrics = metrics
        self._tokens = tokens
        self._clock = clock
        self._rand = rand
        self._wake = wake
        self._dsn_credentials = dsn_credentials
        self._retry = Backoff(
            self._policy.retry_initial, self._policy.retry_max, self._policy.retry_jitter
        )
        # Outcomes being written down, by copy: each its own task, so a slow or failing
        # spool never holds a connection slot. A copy here is ``delivering`` in the spool
        # and nothing releases it, so it is never claimed (or sent) again meanwhile.
        self.settling: dict[int, asyncio.Task[None]] = {}
        self.unrecorded = 0  # delivered copies whose record failed at least once, not yet written
        # Copies not sent whose release back to ``queued`` failed: retried by ``run``,
        # else they would stay ``delivering`` until the next start.
        self.unreleased: set[int] = set()
        self.paused_until = 0.0
        # After a pause for refused credentials: one copy at a time (one login) until an
        # attempt gets past AUTH, instead of ``concurrency`` logins at once (issue 14.8).
        self.probing = False
        # The last copy's verdict on the upstream itself (for /readyz): reached or not.
        self.upstream_reachable = True

    def __repr__(self) -> str:
        return f"<Settler settling={len(self.settling)} paused_until={self.paused_until:.0f}>"

    def start(self, job: Job, outcome: Outcome, latency: float) -> None:
        """Write ``outcome`` down in a task of its own (not cancelled with the delivery)."""
        task = asyncio.create_task(self._record(job, outcome, latency))
        self.settling[job.copy_id] = task
        task.add_done_callback(lambda _: self.settling.pop(job.copy_id, None))

    def note_reachability(self, outcome: Outcome) -> None:
        self.upstream_reachable = outcome.stage not in _UNREACHABLE or outcome.code >= 200

    async def _record(self, job: Job, outcome: Outcome, latency: float) -> None:
        """Write down one outcome; a delivered copy's record is retried until it holds."""
        self._metrics.copy_outcome(outcome, latency)
        self.note_reachability(outcome)
        if not job.auth_user and outcome.auth_failed:
            self.probing = True  # when the pause ends, one copy tries the credentials first
        elif not job.auth_user and outcome.stage not in _UNREACHABLE:
            self.probing = False  # past AUTH: the credentials work again
        retries = 0  # of this record, after a failure
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
            retries += 1
            try:
                await asyncio.sleep(RECORD_RETRY.delay(retries))
            except asyncio.CancelledError:
                self.unrecorded -= 1
                raise
        # Not sent, its outcome unwritten: queued again, but not due before the first
        # retry delay, so a refusal whose record fails is not resent at once in a loop.
        now = self._clock()
        try:
            await self._spool.release([job.copy_id], now, next_try=now + self._policy.retry_initial)
        except Exception:  # the spool is in trouble: the loop tries again (``run``)
            self.unreleased.add(job.copy_id)

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
            await self._delivered(job, outcome, now, fields)
            return
        # The upstream's own words on every failure and deferral, addresses as tokens.
        fields["reply"] = self._tokens.redact(outcome.text[:REPLY_TEXT_CHARS])
        if outcome.auth_failed and now < job.expires:
            await self._paused(job, outcome, now, fields)
            return
        permanent = outcome.status is Status.PERMANENT and not self._policy.soft_bounce
        if not permanent:
            delay = self._retry.delay(job.attempts + 1, self._rand())
            if now < job.expires:
                await self._deferred(job, outcome, now, fields, delay)
                return
        await self._failed(job, outcome, now, fields, expired=not permanent)

    async def _delivered(
        self, job: Job, outcome: Outcome, now: float, fields: dict[str, object]
    ) -> None:
        await self._spool.record_delivered(
            job.copy_id, now=now, attempts=job.attempts + 1, outcome=outcome
        )
        if job.is_dsn:  # counted once the upstream took it, not when it was queued
            self._metrics.dsn_sent()
        log.info("copy delivered", extra={"fields": fields})

    async def _paused(
        self, job: Job, outcome: Outcome, now: float, fields: dict[str, object]
    ) -> None:
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

    async def _deferred(
        self, job: Job, outcome: Outcome, now: float, fields: dict[str, object], delay: float
    ) -> None:
        attempts = job.attempts + 1
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

    async def _failed(
        self, job: Job, outcome: Outcome, now: float, fields: dict[str, object], *, expired: bool
    ) -> None:
        dsn = notification_for(self._config, job, outcome, now, expired=expired)
        recorded = await self._spool.record(
            job.copy_id,
            CopyState.FAILED,
            now=now,
            attempts=job.attempts + 1,
            also_store=dsn,
            outcome=outcome,
        )
        if not recorded:  # the copy left the spool meanwhile (deleted, quarantined): no DSN
            dsn = None
        if dsn is not None:
            self._wake()
        log.warning(
            "copy failed",
            extra={"fields": {**fields, "expired": expired, "dsn": dsn.id if dsn else None}},
        )
