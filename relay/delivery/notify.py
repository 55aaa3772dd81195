"""Delivery status notifications (RFC 3464): the report a failed copy sends its sender."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from relay.config import Config
from relay.core.dsn import Failure, build_dsn, dsn_from_address, dsn_recipient_ok
from relay.core.model import Outcome
from relay.custody.spool import Job, NewCopy, NewMessage, new_queue_id

log = logging.getLogger("relay.delivery")


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
    queue_id = new_queue_id()
    data = _report(
        config,
        queue_id,
        Failure(
            queue_id=message_id,
            sender=sender,
            recipient=rcpt,
            status=_status(outcome, expired),
            diagnostic=_diagnostic(outcome),
            remote_mta="",
            arrival_date=datetime.fromtimestamp(received, UTC),
            last_attempt=datetime.fromtimestamp(now, UTC),
            expired=expired,
            original_headers=headers,
        ),
        now,
    )
    if data is None:
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


def _status(outcome: Outcome, expired: bool) -> str:
    status = outcome.enhanced or ("4.4.7" if expired else "5.0.0")
    if expired and not status.startswith("4."):
        status = "4.4.7"
    return status


def _diagnostic(outcome: Outcome) -> str:
    return f"{outcome.code} {outcome.enhanced} {outcome.text}".strip() if outcome.code else ""


def _report(config: Config, queue_id: str, failure: Failure, now: float) -> bytes | None:
    """The report's bytes (header section, blank line, body), or None when none can be built."""
    hostname = config.smtp.hostname
    try:
        author = dsn_from_address(config.delivery.dsn_from, hostname, failure.sender)
        return build_dsn(
            failure,
            reporting_mta=hostname,
            now=datetime.fromtimestamp(now, UTC),
            message_id=f"{queue_id}@{author.rpartition('@')[2]}",
            from_address=author,
        )
    except ValueError:
        # build_dsn refuses what it cannot write safely (a sender over 254 octets):
        # the copy still fails and is counted; only the notification is lost.
        log.exception("no DSN possible", extra={"fields": {"queue_id": failure.queue_id}})
        return None


def notification_for(
    config: Config, job: Job, outcome: Outcome, now: float, *, expired: bool
) -> NewMessage | None:
    """The RFC 3464 report for this copy, or None (off, a DSN itself, or the sender is <>)."""
    if job.is_dsn:
        return None
    return notification(
        config,
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
