"""Direct delivery's reply table and deadline, with a scripted upstream double.

A double is used here because a real server cannot be made to hang forever
inside one copy while answering another (the deadline case).
"""

from __future__ import annotations

import asyncio

import pytest

from relay.delivery import choose_reply, deliver_direct
from relay.isolation import isolate
from relay.model import Copy, Credentials, Envelope, Outcome, Stage, Status
from relay.outbox import CheckStep

DELIVERED = Outcome(Status.DELIVERED, Stage.DOT, 250, "2.0.0", "ok")
TRANSIENT = Outcome(Status.TRANSIENT, Stage.RCPT, 451, "4.2.0", "later")
PERMANENT = Outcome(Status.PERMANENT, Stage.RCPT, 550, "5.1.1", "unknown")


@pytest.mark.parametrize(
    ("outcomes", "reply"),
    [
        ([DELIVERED, DELIVERED], "250 2.0.0"),
        ([DELIVERED, PERMANENT], "250 2.0.0"),
        ([DELIVERED, TRANSIENT], "250 2.0.0"),
        ([TRANSIENT, PERMANENT], "451 4.4.0"),
        ([TRANSIENT], "451 4.4.0"),
        ([PERMANENT, PERMANENT], "554 5.0.0"),
    ],
)
def test_reply_table(outcomes: list[Outcome], reply: str) -> None:
    """All delivered or some: 250 (never a resend); none: 451 if any was transient, else 554."""
    assert str(choose_reply(outcomes, "Q1")).startswith(reply)


class HangingUpstream:
    """Answers alice at once and never answers bob."""

    async def send(
        self, mail_from: str, copy: Copy, *, smtputf8: bool, credentials: Credentials | None = None
    ) -> Outcome:
        if copy.recipient.local == "bob":
            await asyncio.Event().wait()
        return DELIVERED

    async def check(self) -> list[CheckStep]:
        return []

    async def aclose(self) -> None:
        return None


def test_copy_still_in_flight_at_the_deadline_is_ambiguous() -> None:
    """A copy in flight at the deadline is transient and ambiguous; the reply is a partial 250."""
    envelope = Envelope.parse("news@example.org", ["alice@example.com", "bob@example.com"])
    plan = isolate(envelope, b"Subject: x\r\n\r\nhi\r\n")
    seen: list[tuple[str, Status, bool]] = []

    async def main() -> None:
        result = await deliver_direct(
            HangingUpstream(),
            "news@example.org",
            plan.copies,
            smtputf8=False,
            credentials=None,
            deadline=0.05,
            queue_id="Q1",
            on_outcome=lambda c, o, _: seen.append((c.recipient.local, o.status, o.ambiguous)),
        )
        assert str(result.reply).startswith("250 2.0.0") and "1 of 2" in str(result.reply)

    asyncio.run(main())
    assert sorted(seen) == [("alice", Status.DELIVERED, False), ("bob", Status.TRANSIENT, True)]


def test_no_reply_after_the_dot_rules_out_a_4xx() -> None:
    """Nothing confirmed but a copy may have arrived: 250 (spooled), never 451 (a resend)."""
    ambiguous = Outcome(Status.TRANSIENT, Stage.DOT, ambiguous=True)
    assert str(choose_reply([ambiguous, TRANSIENT], "Q1")).startswith("250 2.0.0")
