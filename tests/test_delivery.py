"""Direct delivery's reply table and deadline, with a scripted upstream double.

A double is used here because a real server cannot be made to hang forever
inside one copy while answering another (the deadline case).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.isolation import isolate
from relay.core.model import Copy, Credentials, Envelope, Outcome, Stage, Status
from relay.direct import Fate, choose_reply, deliver_direct
from relay.upstream.outbox import CheckStep

DELIVERED = Outcome(Status.DELIVERED, Stage.DOT, 250, "2.0.0", "ok")
TRANSIENT = Outcome(Status.TRANSIENT, Stage.RCPT, 451, "4.2.0", "later")
PERMANENT = Outcome(Status.PERMANENT, Stage.RCPT, 550, "5.1.1", "unknown")


AMBIGUOUS = Outcome(Status.TRANSIENT, Stage.DOT, ambiguous=True)
NO_ANSWER = Outcome(Status.TRANSIENT, Stage.CONNECT, 0, "", "connection refused")
GREETED_421 = Outcome(Status.TRANSIENT, Stage.CONNECT, 421, "4.3.2", "closing")
BAD_LOGIN = Outcome(Status.TRANSIENT, Stage.AUTH, 535, "5.7.8", "no", auth_failed=True)
FULL = Outcome(Status.TRANSIENT, Stage.RCPT, 452, "4.2.2", "mailbox full")
TOO_BIG = Outcome(Status.PERMANENT, Stage.DOT, 552, "5.3.4", "too big")
NO_ENHANCED = Outcome(Status.PERMANENT, Stage.RCPT, 550, "", "unknown")
D, R, F, X = Fate.DELIVERED, Fate.RETRY, Fate.FAILED, Fate.RETURNED


@pytest.mark.parametrize(
    ("outcomes", "reply", "fates"),
    [
        # Every copy delivered.
        ([DELIVERED, DELIVERED], "250 2.0.0 OK: queued as Q1, 2 copies delivered", (D, D)),
        # Some delivered (or may have been): 250; transient retried, permanent failed + DSN.
        (
            [DELIVERED, PERMANENT],
            "250 2.0.0 OK: queued as Q1, 1 of 2 copies delivered,"
            " 1 refused (the sender is notified)",
            (D, F),
        ),
        (
            [DELIVERED, TRANSIENT],
            "250 2.0.0 OK: queued as Q1, 1 of 2 copies delivered, 1 queued for retry",
            (D, R),
        ),
        (
            [AMBIGUOUS, PERMANENT, TRANSIENT],
            "250 2.0.0 OK: queued as Q1, 0 of 3 copies delivered, 2 queued for retry,"
            " 1 refused (the sender is notified)",
            (R, F, R),
        ),
        # Nothing delivered: the application keeps it; one shared upstream reply is passed on.
        ([PERMANENT], "550 5.1.1 Upstream refused every copy; nothing was delivered", (X,)),
        ([PERMANENT, PERMANENT], "550 5.1.1", (X, X)),
        ([TOO_BIG], "552 5.3.4", (X,)),
        ([NO_ENHANCED], "550 5.0.0", (X,)),
        ([TRANSIENT], "451 4.2.0 Upstream did not take the message; nothing was delivered", (X,)),
        ([FULL, FULL], "452 4.2.2", (X, X)),
        ([TRANSIENT, PERMANENT], "451 4.2.0", (X, X)),  # the transient copies decide
        # Different replies, or none about the message: the generic code of the class.
        ([PERMANENT, TOO_BIG], "554 5.0.0 Upstream refused every copy", (X, X)),
        ([TRANSIENT, FULL], "451 4.4.0 Upstream did not take the message", (X, X)),
        ([NO_ANSWER], "451 4.4.0", (X,)),
        ([GREETED_421], "451 4.4.0", (X,)),  # a 421 to the application would close its session
        ([BAD_LOGIN], "451 4.4.0", (X,)),  # the upstream's AUTH is not the application's
    ],
)
def test_reply_table(outcomes: list[Outcome], reply: str, fates: tuple[Fate, ...]) -> None:
    """Rules 1 and 2: one reply for the message, and each copy's fate."""
    decision = choose_reply(outcomes, "Q1")
    assert str(decision.reply).startswith(reply)
    assert decision.fates == fates
    assert decision.taken is (decision.reply.code == 250)


def test_soft_bounce_turns_refusals_into_retries() -> None:
    """soft_bounce: a permanent refusal is retried beside a delivery, and alone gives 451."""
    partial = choose_reply([DELIVERED, PERMANENT], "Q1", soft_bounce=True)
    assert partial.fates == (D, R) and "1 queued for retry" in partial.reply.text
    assert str(choose_reply([PERMANENT], "Q1", soft_bounce=True).reply).startswith("451 4.4.0")


def test_the_reply_promises_a_notification_only_when_one_is_sent() -> None:
    """delivery.dsn off, or a sender of <>: the refused copy is counted, nobody is promised."""
    text = choose_reply([DELIVERED, PERMANENT], "Q1", notifies=False).reply.text
    assert text.endswith("1 of 2 copies delivered, 1 refused")


def test_the_reply_never_carries_the_upstreams_text() -> None:
    """Rule 4: the upstream's text may name a recipient, and the reply is logged."""
    named = Outcome(Status.PERMANENT, Stage.RCPT, 550, "5.1.1", "bob@example.com unknown")
    for outcomes in ([named], [DELIVERED, named]):
        assert "@" not in choose_reply(outcomes, "Q1").reply.text


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
    decision = choose_reply([ambiguous, TRANSIENT], "Q1")
    assert str(decision.reply).startswith("250 2.0.0") and decision.fates == (R, R)


OUTCOMES = st.builds(
    Outcome,
    status=st.sampled_from(Status),
    stage=st.sampled_from(Stage),
    code=st.sampled_from([0, 250, 421, 450, 451, 452, 530, 535, 550, 552, 553, 554]),
    enhanced=st.sampled_from(["", "2.0.0", "4.2.0", "4.4.1", "5.1.1", "5.7.1", "4.0.0"]),
    text=st.sampled_from(["", "bob@example.com unknown", "ok"]),
    ambiguous=st.booleans(),
)


@given(outcomes=st.lists(OUTCOMES, min_size=1, max_size=8), soft_bounce=st.booleans())
def test_the_reply_and_the_fates_always_agree(outcomes: list[Outcome], soft_bounce: bool) -> None:
    """For any outcomes: 250 exactly when a copy arrived or may have; a delivered copy is
    never retried or returned; nothing is kept after a 4xx or 5xx; no 4xx after a copy
    may have arrived; soft_bounce fails nothing; the text never names an address."""
    decision = choose_reply(outcomes, "Q1", soft_bounce=soft_bounce)
    reply = decision.reply
    arrived = any(o.status is Status.DELIVERED or o.ambiguous for o in outcomes)
    assert decision.taken is arrived is (reply.code == 250)
    assert len(decision.fates) == len(outcomes)
    for outcome, fate in zip(outcomes, decision.fates, strict=True):
        if outcome.status is Status.DELIVERED:
            assert fate is Fate.DELIVERED
        elif decision.taken:
            assert fate in (Fate.RETRY, Fate.FAILED)
            assert fate is Fate.FAILED or outcome.status is not Status.PERMANENT or soft_bounce
        else:
            assert fate is Fate.RETURNED
    if soft_bounce:
        assert Fate.FAILED not in decision.fates
    assert reply.code in (250, 450, 451, 452, 550, 551, 552, 553, 554)
    assert reply.enhanced[0] == str(reply.code)[0]
    assert "@" not in reply.text
