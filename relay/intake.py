"""From a received message to the reply: isolate, guard, deliver, record.

Rule 1: the isolation core decides every copy; a refusal becomes its reply
code, a metric and one log line, and nothing is sent.
Rule 2: one log line per message and one per copy, tied by the queue id;
addresses appear only as keyed tokens.

Between the inbound shell and delivery; it holds no socket of its own.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime

from relay.config import Config
from relay.delivery import deliver_direct
from relay.errors import (
    BadAddress,
    BadData,
    HeaderDefect,
    LeakDetected,
    Rejected,
    Reply,
    TooManyHops,
)
from relay.inbound import Submission
from relay.isolation import isolate
from relay.logs import AddressTokens
from relay.metrics import MessageResult, Metrics
from relay.model import Copy, Envelope, Outcome, Stage, Trace
from relay.upstream import Upstream

log = logging.getLogger("relay.intake")

# Failing at these stages with no reply means the upstream itself could not be reached.
_UNREACHABLE = frozenset({Stage.CONNECT, Stage.TLS, Stage.AUTH})
OFFLOAD_OCTETS = 1 << 20  # isolate bigger messages in a thread so the loop keeps serving

_RESULTS: dict[type[Rejected], MessageResult] = {
    LeakDetected: MessageResult.REJECTED_LEAK,
    HeaderDefect: MessageResult.REJECTED_HEADER,
    TooManyHops: MessageResult.REJECTED_HEADER,
    BadData: MessageResult.REJECTED_DATA,
    BadAddress: MessageResult.REJECTED_ADDRESS,
}


def new_queue_id() -> str:
    """Sortable by time, unique enough per deployment, and naming nobody."""
    return f"{int(time.time()):x}{secrets.token_hex(5)}".upper()


class Intake:
    """Takes submissions into the isolation core and on to delivery."""

    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        metrics: Metrics,
        tokens: AddressTokens,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._config = config
        self._options = config.isolation.options()
        self._upstream = upstream
        self._metrics = metrics
        self._tokens = tokens
        self._now = now
        # The last copy's verdict on the upstream itself (for /readyz): reached or not.
        self.upstream_reachable = True

    async def accept(self, submission: Submission) -> Reply:
        queue_id = new_queue_id()
        envelope = Envelope(submission.sender, submission.recipients, submission.smtputf8)
        trace = Trace(
            by_host=self._config.smtp.hostname,
            helo=submission.helo,
            client_ip=submission.client_ip,
            protocol=submission.protocol,
            queue_id=queue_id,
            date=email.utils.format_datetime(self._now()),
        )
        size = len(submission.data)
        try:
            if size > OFFLOAD_OCTETS:
                plan = await asyncio.to_thread(
                    isolate, envelope, submission.data, self._options, trace
                )
            else:
                plan = isolate(envelope, submission.data, self._options, trace)
        except Rejected as exc:
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
        self._metrics.message_received(MessageResult.ACCEPTED, size, len(plan.copies))
        for warning in plan.warnings:
            self._metrics.body_warning()
            log.warning("body check", extra={"fields": {"queue_id": queue_id, "warning": warning}})
        for copy in plan.copies:
            self._metrics.header_changes(copy.changes)
        sender = submission.sender.text if submission.sender else ""
        log.info(
            "message received",
            extra={
                "fields": {
                    "queue_id": queue_id,
                    "sender": self._tokens(sender),
                    "size": size,
                    "copies": len(plan.copies),
                    "merged_duplicates": plan.merged_duplicates,
                }
            },
        )
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
        log.info(
            "message answered", extra={"fields": {"queue_id": queue_id, "reply": str(result.reply)}}
        )
        return result.reply

    def _record(self, queue_id: str, copy: Copy, outcome: Outcome, latency: float) -> None:
        self._metrics.copy_outcome(outcome, latency)
        self.upstream_reachable = outcome.stage not in _UNREACHABLE or outcome.code >= 200
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
                }
            },
        )
