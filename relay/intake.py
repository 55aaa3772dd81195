"""From a received message to the reply: isolate, guard, take custody, record.

Rule 1: the isolation core decides every copy; a refusal becomes its reply
code, a metric and one log line, and nothing is stored or sent.
Rule 2: ``250`` only once the relay owns the message: in ``queue`` mode after
the spool write is durable; in ``direct`` mode after every copy was
delivered, or some were and the rest are durably spooled. A spool failure
before anything was sent is ``451 4.3.0``, never ``250``.
Rule 3: one log line per message and one per copy, tied by the queue id;
addresses appear only as keyed tokens.
Rule 4: once its final dot has arrived, a message is handled as one unit that
the session cannot cancel: a client that hangs up then changes nothing but who
hears the reply. Isolation, the spool write, the delivery, the state of each
copy, the log line and the metrics all happen as if it were still there.
Rule 5: in ``direct`` mode the reply says what the upstream did
(``direct.choose_reply``), whatever the spool does after: a write that fails
after the upstream's reply is retried while the process lives, and until it
lands the copies stay ``delivering``, which nothing sends while the process
lives. A copy the upstream accepted or refused for good is never sent again.

Between the inbound shell and delivery; it holds no socket of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from relay.config import Config, Mode
from relay.core.dsn import dsn_recipient_ok
from relay.core.errors import (
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
from relay.core.isolation import isolate
from relay.core.model import (
    Copy,
    Envelope,
    IsolationOptions,
    Outcome,
    Plan,
    Status,
    Trace,
)
from relay.core.policy import Backoff, backoff
from relay.custody.spool import CopyState, NewCopy, NewMessage, Spool, SpoolError, new_queue_id
from relay.delivery import REPLY_TEXT_CHARS, Deliverer, notification
from relay.direct import Fate, Result, deliver_direct
from relay.inbound.smtp import Submission
from relay.ops.eventloop import finish_within
from relay.ops.logs import AddressTokens
from relay.ops.metrics import MessageResult, Metrics
from relay.upstream.smtp import Upstream

log = logging.getLogger("relay.intake")

# The tries of a spool write that failed after the upstream's reply (direct mode):
# 0.5 s doubling to 30 s, then every 30 s while the process lives, or every 0.5 s
# once the relay is stopping (the stop waits a little for them: ``drain``).
SETTLE_RETRY = Backoff(initial=0.5, maximum=30.0)
# Seconds a message being taken may take at a stop beyond its own delivery time
# (direct mode: ``delivery.direct_deadline``): isolation, the spool writes, the reply.
TAKE_GRACE = 5.0

Write = Callable[[], Awaitable[object]]  # one spool write, ready to try (again)

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
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._config = config
        self._options = options
        self._upstream = upstream
        self._metrics = metrics
        self._spool = spool
        self._deliverer = deliverer
        self._now = now
        self._rand = rand
        # Messages being taken, and spool writes being retried (Rules 4 and 5); for each
        # take, the loop time by which it will have ended (its own budget at a stop).
        self._tasks: set[asyncio.Task[object]] = set()
        self._ends: dict[asyncio.Task[object], float] = {}
        self._stopping = asyncio.Event()  # retries go at their shortest delay from now on
        self._report = Report(config, metrics=metrics, tokens=tokens)
        self._settlement = Settlement(
            config,
            spool=spool,
            metrics=metrics,
            deliverer=deliverer,
            rand=rand,
            tasks=self._tasks,
            stopping=self._stopping,
        )

    async def accept(self, submission: Submission) -> Reply:
        """The reply to a message whose final dot has arrived.

        Rule 4: the work is one task the session cannot cancel; a session cancelled
        meanwhile (the client hung up) only loses the reply.
        """
        task = asyncio.ensure_future(self._handle(submission))
        self._tasks.add(task)
        budget = TAKE_GRACE
        if self._config.mode is Mode.DIRECT:
            budget += self._config.delivery.direct_deadline
        self._ends[task] = asyncio.get_running_loop().time() + budget
        task.add_done_callback(self._taken)
        return await asyncio.shield(task)

    async def _handle(self, submission: Submission) -> Reply:
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
            return self._report.refused(queue_id, submission, exc)
        return await self._take(queue_id, submission, plan, now)

    def _taken(self, task: asyncio.Task[Reply]) -> None:
        self._tasks.discard(task)
        self._ends.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("taking a message failed", exc_info=task.exception())

    async def drain(self, grace: float) -> None:
        """Let every message being taken end in its own time (``TAKE_GRACE``, plus a
        direct-mode delivery's deadline, which bounds it), and the spool writes still
        being retried try again at once and go on until ``grace`` is up; then cancel
        what is left: those copies stay ``delivering``, and the next start puts them
        back in the queue (Rule 5 holds while the process lives, not beyond it)."""
        loop = asyncio.get_running_loop()
        self._stopping.set()
        started = loop.time()
        deadline = started + grace
        # Sessions can begin no new transaction now (421 at MAIL): a take that starts
        # meanwhile had its DATA under way; none gets longer than the first could.
        latest = started + TAKE_GRACE
        if self._config.mode is Mode.DIRECT:
            latest += self._config.delivery.direct_deadline
        while self._tasks:  # a take may start a retry, or a late DATA a take, meanwhile
            end = max([deadline, *(self._ends.get(t, 0.0) for t in self._tasks)])
            end = min(end, max(latest, deadline))
            if loop.time() >= end:
                break
            await asyncio.wait(
                set(self._tasks), timeout=end - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
        left = await finish_within(set(self._tasks), 0.0)
        if left:
            log.error(
                "stopping with messages or spool writes unfinished: their copies stay"
                " 'delivering' until the next start",
                extra={"fields": {"unfinished": len(left)}},
            )

    async def _take(self, queue_id: str, submission: Submission, plan: Plan, now: float) -> Reply:
        self._report.planned(queue_id, submission, plan)
        sender = submission.sender.text if submission.sender else ""
        if submission.credentials is not None:
            self._deliverer.credentials[submission.credentials.username] = submission.credentials
        if self._config.mode is Mode.QUEUE:
            reply = await self._queue(queue_id, sender, submission, plan, now)
        else:
            reply = await self._direct(queue_id, sender, submission, plan, now)
        self._report.received(queue_id, submission, plan, sender, reply)
        return reply

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
        try:
            ids = await self._spool.store(message)
        except SpoolError as exc:
            log.error("spool write failed", extra={"fields": {"queue_id": queue_id}})
            return exc.reply
        if not handover:
            self._deliverer.wake()
        elif not self._deliverer.hand_over(message, ids, addresses):
            # Delivery stopped meanwhile: back to ``queued`` (or, if even that write
            # fails, ``delivering``, which the next start puts back in the queue).
            with contextlib.suppress(SpoolError):
                await self._spool.release(ids, now)
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
            soft_bounce=self._config.delivery.soft_bounce,
            notifies=self._config.delivery.dsn and dsn_recipient_ok(sender),
        )
        await self._settlement.settle(message, ids, plan.copies, result, now)
        return result.reply

    def _record(self, queue_id: str, copy: Copy, outcome: Outcome, latency: float) -> None:
        self._metrics.copy_outcome(outcome, latency)
        self._deliverer.note_reachability(outcome)
        self._report.copy(queue_id, copy, outcome, latency)


class Report:
    """Rule 3: the log lines of one message and of each copy, tied by the queue id, and
    the message's metrics; addresses appear only as keyed tokens."""

    def __init__(self, config: Config, *, metrics: Metrics, tokens: AddressTokens) -> None:
        self._config = config
        self._metrics = metrics
        self._tokens = tokens

    def planned(self, queue_id: str, submission: Submission, plan: Plan) -> None:
        """What the isolation core's plan says an operator must see: the opt-out, warnings."""
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

    def received(
        self, queue_id: str, submission: Submission, plan: Plan, sender: str, reply: Reply
    ) -> None:
        """The message's line and metrics, once its reply is known."""
        size = len(submission.data)
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

    def refused(self, queue_id: str, submission: Submission, exc: Rejected) -> Reply:
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

    def copy(self, queue_id: str, copy: Copy, outcome: Outcome, latency: float) -> None:
        """One copy's line (direct mode: each outcome as the upstream gave it)."""
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


class Settlement:
    """Direct mode's write-down of each copy's fate (Rule 5), retried until it lands.

    A write that fails after the upstream's reply is retried in the background
    (``SETTLE_RETRY``); its task joins ``tasks``, which ``Intake.drain`` waits for,
    and ``stopping`` cuts its waits short.
    """

    def __init__(
        self,
        config: Config,
        *,
        spool: Spool,
        metrics: Metrics,
        deliverer: Deliverer,
        rand: Callable[[], float],
        tasks: set[asyncio.Task[object]],
        stopping: asyncio.Event,
    ) -> None:
        self._config = config
        self._spool = spool
        self._metrics = metrics
        self._deliverer = deliverer
        self._rand = rand
        self._tasks = tasks
        self._stopping = stopping

    async def settle(
        self,
        message: NewMessage,
        ids: Sequence[int],
        copies: Sequence[Copy],
        result: Result,
        now: float,
    ) -> None:
        """Write down each copy's fate (Rule 5); the reply does not wait for a failed write."""
        decision = result.decision
        if not decision.taken or all(f is Fate.DELIVERED for f in decision.fates):
            # Nothing left to do for any copy: the application keeps the message (4xx,
            # 5xx), or every copy arrived. One write drops it all.
            await self._write(message.id, "discard", lambda: self._spool.discard(message.id))
            return
        writes: list[Awaitable[bool]] = []
        for copy_id, copy, outcome, fate in zip(
            ids, copies, result.outcomes, decision.fates, strict=True
        ):
            write = self._fate_write(message, copy_id, copy, outcome, fate=fate, now=now)
            writes.append(self._write(message.id, fate.value, write))
        await asyncio.gather(*writes)  # concurrent: the spool commits them together
        self._deliverer.wake()

    def _fate_write(
        self,
        message: NewMessage,
        copy_id: int,
        copy: Copy,
        outcome: Outcome,
        *,
        fate: Fate,
        now: float,
    ) -> Write:
        """The spool write that records one copy's fate."""
        policy = self._config.delivery
        if fate is Fate.DELIVERED:
            return functools.partial(
                self._spool.record_delivered, copy_id, now=now, attempts=1, outcome=outcome
            )
        if fate is Fate.RETRY:
            # The queue's first backoff, jittered: copies deferred together do not
            # all come back together; never past the message's lifetime.
            delay = backoff(
                1,
                initial=policy.retry_initial,
                maximum=policy.retry_max,
                jitter=policy.retry_jitter,
                rand=self._rand(),
            )
            self._metrics.retry_scheduled()
            return functools.partial(
                self._spool.record,
                copy_id,
                CopyState.DEFERRED,
                now=now,
                next_try=min(now + delay, message.expires),
                attempts=1,
                outcome=outcome,
            )
        # Refused for good: failed now, and its sender is told.
        dsn = notification(
            self._config,
            message_id=message.id,
            sender=message.sender,
            rcpt=copy.recipient.text,
            headers=copy.headers,
            received=message.received,
            auth_user=message.auth_user,
            outcome=outcome,
            now=now,
            expired=False,
        )
        return functools.partial(
            self._spool.record,
            copy_id,
            CopyState.FAILED,
            now=now,
            attempts=1,
            outcome=outcome,
            also_store=dsn,
        )

    async def _write(self, queue_id: str, what: str, write: Write) -> bool:
        """Try a spool write once; if it fails, retry it in the background (Rule 5)."""
        try:
            await write()
            return True
        except Exception:  # a full disk, an I/O error, a bug: the copies stay "delivering"
            log.exception(
                "spool write failed after the upstream's reply; retrying",
                extra={"fields": {"queue_id": queue_id, "write": what}},
            )
        task = asyncio.ensure_future(self._retry(queue_id, what, write))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return False

    async def _retry(self, queue_id: str, what: str, write: Write) -> None:
        """Try ``write`` at each of ``SETTLE_RETRY``'s delays until it lands."""
        attempt = 0
        while True:
            delay = SETTLE_RETRY.delay(attempt + 1)
            if self._stopping.is_set():
                await asyncio.sleep(SETTLE_RETRY.initial)
            else:  # a stop cuts the wait short: one try at once, then the shortest delay
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
            attempt += 1
            try:
                await write()
            except Exception:
                # Logged once, when the delay first reaches its maximum; not every time.
                if delay >= SETTLE_RETRY.maximum > SETTLE_RETRY.delay(attempt - 1):
                    log.exception(
                        "spool write still failing",
                        extra={"fields": {"queue_id": queue_id, "write": what}},
                    )
                continue
            log.info(
                "spool write done at a retry",
                extra={"fields": {"queue_id": queue_id, "write": what, "tries": attempt + 1}},
            )
            self._deliverer.wake()
            return
