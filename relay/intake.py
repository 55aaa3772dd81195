"""From a received message to the reply: isolate, guard, take custody, record.

Rule 1: the isolation core decides every copy; a refusal becomes its reply
code, a metric and one log line, and nothing is stored or sent.
Rule 2: ``250`` only once the relay owns the message: in ``queue`` mode after
the spool write is durable; in ``direct`` mode after every copy was
delivered, or some were and the rest are durably spooled. A spool failure
is ``451 4.3.0``, never ``250``.
Rule 3: one log line per message and one per copy, tied by the queue id;
addresses appear only as keyed tokens.

Between the inbound shell and delivery; it holds no socket of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from relay.config import Config, Mode
from relay.delivery import REPLY_TEXT_CHARS, Deliverer, deliver_direct
from relay.errors import (
    BadAddress,
    BadData,
    DkimRejected,
    HeaderDefect,
    LeakDetected,
    Rejected,
    Reply,
    TooBig,
    TooManyHops,
)
from relay.inbound import Submission
from relay.isolation import isolate
from relay.logs import AddressTokens
from relay.metrics import MessageResult, Metrics
from relay.model import (
    Copy,
    Envelope,
    IsolationOptions,
    Outcome,
    Plan,
    Status,
    Trace,
    new_queue_id,
)
from relay.spool import CopyState, NewCopy, NewMessage, Spool, SpoolError
from relay.upstream import Upstream

log = logging.getLogger("relay.intake")

# Isolate big messages, and big fan-outs, in a thread so the loop keeps serving.
OFFLOAD_OCTETS = 1 << 20
OFFLOAD_RECIPIENTS = 100

_RESULTS: dict[type[Rejected], MessageResult] = {
    LeakDetected: MessageResult.REJECTED_LEAK,
    HeaderDefect: MessageResult.REJECTED_HEADER,
    TooManyHops: MessageResult.REJECTED_HEADER,
    BadData: MessageResult.REJECTED_DATA,
    BadAddress: MessageResult.REJECTED_ADDRESS,
    TooBig: MessageResult.REJECTED_SIZE,
    DkimRejected: MessageResult.REJECTED_POLICY,
}


class Intake:
    """Takes submissions into the isolation core and into custody."""

    def __init__(
        self,
        config: Config,
        *,
        upstream: Upstream,
        metrics: Metrics,
        tokens: AddressTokens,
        spool: Spool,
        deliverer: Deliverer,
        options: IsolationOptions,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._options = options
        self._upstream = upstream
        self._metrics = metrics
        self._tokens = tokens
        self._spool = spool
        self._deliverer = deliverer
        self._now = now

    async def accept(self, submission: Submission) -> Reply:
        queue_id = new_queue_id()
        now = self._now()
        envelope = Envelope(submission.sender, submission.recipients, submission.smtputf8)
        trace = Trace(
            by_host=self._config.smtp.hostname,
            helo=submission.helo,
            client_ip=submission.client_ip,
            protocol=submission.protocol,
            queue_id=queue_id,
            date=email.utils.format_datetime(datetime.fromtimestamp(now, UTC)),
        )
        size = len(submission.data)
        try:
            heavy = size > OFFLOAD_OCTETS or len(submission.recipients) > OFFLOAD_RECIPIENTS
            if heavy or self._options.signer is not None:  # signing hashes the body per copy
                plan = await asyncio.to_thread(
                    isolate, envelope, submission.data, self._options, trace
                )
            else:
                plan = isolate(envelope, submission.data, self._options, trace)
        except Rejected as exc:
            return self._refused(queue_id, submission, exc)
        if plan.kept_recipients:  # SPEC 3's opt-out, from configuration: each use is seen
            self._metrics.recipient_list_kept()
            log.warning(
                "recipient list kept",
                extra={
                    "fields": {
                        "queue_id": queue_id,
                        "sender": self._tokens(submission.sender.text if submission.sender else ""),
                        "copies": len(plan.copies),
                        "setting": "senders.keep_recipients",
                    }
                },
            )
        for warning in plan.warnings:
            self._metrics.body_warning()
            log.warning("body check", extra={"fields": {"queue_id": queue_id, "warning": warning}})
        sender = submission.sender.text if submission.sender else ""
        if submission.credentials is not None:
            self._deliverer.credentials[submission.credentials.username] = submission.credentials
        if self._config.mode is Mode.QUEUE:
            reply = await self._queue(queue_id, sender, submission, plan, now)
        else:
            reply = await self._direct(queue_id, sender, submission, plan, now)
        accepted = reply.code == 250
        if accepted:
            result = MessageResult.ACCEPTED
        else:
            result = MessageResult.DEFERRED if reply.code < 500 else MessageResult.REJECTED_POLICY
        self._metrics.message_received(result, size, len(plan.copies))
        if accepted:
            for copy in plan.copies:
                self._metrics.header_changes(copy.changes)
        log.info(
            "message received",
            extra={
                "fields": {
                    "queue_id": queue_id,
                    "sender": self._tokens(sender),
                    # SPEC 3: who sent it, as a token too (``solo-relay token USER``).
                    **(
                        {"auth_user": self._tokens(submission.auth_user)}
                        if submission.auth_user
                        else {}
                    ),
                    "size": size,
                    "copies": len(plan.copies),
                    "merged_duplicates": plan.merged_duplicates,
                    "mode": self._config.mode.value,
                    "reply": str(reply),
                }
            },
        )
        return reply

    def _refused(self, queue_id: str, submission: Submission, exc: Rejected) -> Reply:
        size = len(submission.data)
        refusal = _RESULTS.get(type(exc), MessageResult.REJECTED_POLICY)
        self._metrics.message_received(refusal, size, len(submission.recipients))
        if isinstance(exc, LeakDetected):
            self._metrics.leak_rejected()
        log.warning(
            "message rejected",
            extra={
                "fields": {
                    "queue_id": queue_id,
                    "reply": str(exc.reply),
                    "reason": exc.reason,
                    "size": size,
                    "recipients": len(submission.recipients),
                }
            },
        )
        return exc.reply

    def _message(
        self,
        queue_id: str,
        copies: Sequence[NewCopy],
        *,
        sender: str,
        submission: Submission,
        plan: Plan,
        now: float,
    ) -> NewMessage:
        credentials = submission.credentials
        return NewMessage(
            id=queue_id,
            sender=sender,
            smtputf8=submission.smtputf8,
            received=now,
            expires=now + self._config.delivery.lifetime,
            body=plan.copies[0].body,
            copies=tuple(copies),
            auth_user=credentials.username if credentials else "",
        )

    async def _queue(
        self, queue_id: str, sender: str, submission: Submission, plan: Plan, now: float
    ) -> Reply:
        # When the workers have room, the copies are stored ``delivering`` and handed to
        # them in memory with the body: no claim, no body read. Otherwise ``queued``.
        handover = self._deliverer.can_take(len(plan.copies), len(plan.copies[0].body))
        state = CopyState.DELIVERING if handover else CopyState.QUEUED
        copies = [NewCopy(c.recipient.text, c.headers, state, next_try=now) for c in plan.copies]
        message = self._message(
            queue_id, copies, sender=sender, submission=submission, plan=plan, now=now
        )
        addresses = [c.recipient for c in plan.copies]

        async def custody() -> None:
            ids = await self._spool.store(message)
            if not handover:
                self._deliverer.wake()
            elif not self._deliverer.hand_over(message, ids, addresses):
                # Delivery stopped meanwhile: back to ``queued`` (or, if even that write
                # fails, ``delivering``, which the next start puts back in the queue).
                with contextlib.suppress(SpoolError):
                    await self._spool.release(ids, now)

        # Shielded: a session cancelled mid-write (the client hung up, a timeout) must not
        # separate a store of ``delivering`` copies from their hand-over, or they would
        # wait for the next start. The write goes on; only the reply is lost.
        try:
            await asyncio.shield(asyncio.ensure_future(custody()))
        except SpoolError as exc:
            log.error("spool write failed", extra={"fields": {"queue_id": queue_id}})
            return exc.reply
        return Reply(250, "2.0.0", f"OK: queued as {queue_id}")

    async def _direct(
        self, queue_id: str, sender: str, submission: Submission, plan: Plan, now: float
    ) -> Reply:
        # Custody first, as in queue mode: the copies are spooled (``delivering``, so the
        # workers leave them alone) before any is sent. A crash mid-fan-out then loses
        # nothing, and a spool failure is a 451 before anything went out.
        held = [
            NewCopy(c.recipient.text, c.headers, state=CopyState.DELIVERING, next_try=now)
            for c in plan.copies
        ]
        message = self._message(
            queue_id, held, sender=sender, submission=submission, plan=plan, now=now
        )
        try:
            ids = await self._spool.store(message)
        except SpoolError as exc:
            log.error("spool write failed", extra={"fields": {"queue_id": queue_id}})
            return exc.reply
        result = await deliver_direct(
            self._upstream,
            sender,
            plan.copies,
            smtputf8=submission.smtputf8,
            credentials=submission.credentials,
            deadline=self._config.delivery.direct_deadline,
            queue_id=queue_id,
            on_outcome=lambda copy, outcome, latency: self._record(
                queue_id, copy, outcome, latency
            ),
        )
        if result.reply.code != 250:
            # Nothing delivered, and nothing that might have been: the application
            # keeps the message (451 or 554), so the relay lets go of it.
            await self._spool.discard(queue_id)
            return result.reply
        left = 0
        retry = now + self._config.delivery.retry_initial
        for copy_id, outcome in zip(ids, result.outcomes, strict=True):
            if outcome.status is Status.DELIVERED:
                state, next_try = CopyState.DELIVERED, 0.0
            elif outcome.status is Status.TRANSIENT:
                state, next_try = CopyState.DEFERRED, retry
            else:  # tried once more from the queue, which then sends the notification
                state, next_try = CopyState.QUEUED, now
            left += state is not CopyState.DELIVERED
            try:
                await self._spool.record(
                    copy_id, state, now=now, next_try=next_try, attempts=1, outcome=outcome
                )
            except SpoolError:
                # The copy stays ``delivering``: the next start puts it back in the queue.
                log.error("spool record failed", extra={"fields": {"queue_id": queue_id}})
        if not left:
            return result.reply
        self._deliverer.wake()
        return Reply(250, "2.0.0", f"OK: queued as {queue_id}, {left} copies queued for retry")

    def _record(self, queue_id: str, copy: Copy, outcome: Outcome, latency: float) -> None:
        self._metrics.copy_outcome(outcome, latency)
        self._deliverer.note_reachability(outcome)
        log.info(
            "copy",
            extra={
                "fields": {
                    "queue_id": queue_id,
                    "rcpt": self._tokens(copy.recipient.text),
                    "outcome": outcome.status.value,
                    "stage": outcome.stage.value,
                    "code": outcome.code,
                    "enhanced": outcome.enhanced,
                    "ambiguous": outcome.ambiguous,
                    "latency": round(latency, 4),
                    **(
                        {}
                        if outcome.status is Status.DELIVERED
                        else {"reply": self._tokens.redact(outcome.text[:REPLY_TEXT_CHARS])}
                    ),
                }
            },
        )
