"""relay.core.routing: whose fault a refusal is, an upstream's health, and who sends next."""

from __future__ import annotations

import pytest

from relay.core.model import Outcome, Stage, Status
from relay.core.policy import Backoff, classify_reply
from relay.core.routing import Blame, Candidate, Health, Role, Route, blame, route

RETRY = Backoff(initial=10.0, maximum=300.0)
DELIVERED = Outcome(Status.DELIVERED, Stage.DOT, 250, "2.0.0", "OK")


def refused(stage: Stage, reply: str) -> Outcome:
    code, _, text = reply.partition(" ")
    return classify_reply(stage, int(code), text)


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        (Stage.CONNECT, "421 4.7.0 Try again later, closing connection"),  # Gmail
        (Stage.MAIL, "421 4.7.0 Try again later, closing connection"),
        (Stage.AUTH, "535 5.7.8 Authentication credentials invalid"),  # SES, SendGrid
        (Stage.MAIL, "550 5.7.1 Relaying denied"),  # Mailgun
        (Stage.MAIL, "554 Message rejected: Email address is not verified"),  # SES
        (Stage.DOT, "554 5.7.1 Sending paused for this account"),
        (Stage.RCPT, "530 5.7.0 Authentication required"),
        (Stage.RCPT, "554 5.7.1 <bob@example.net>: Relay access denied"),  # Postfix
        (Stage.RCPT, "550 relay not permitted"),  # Exim
        (Stage.DOT, "554 5.3.0 Mail system error"),
    ],
)
def test_refusals_about_the_upstream_are_the_upstreams(stage: Stage, reply: str) -> None:
    assert blame(refused(stage, reply)) is Blame.UPSTREAM


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        (Stage.RCPT, "550 5.1.1 The email account that you tried to reach does not exist"),
        (Stage.RCPT, "552 5.2.2 Mailbox full"),
        (Stage.RCPT, "452 4.2.2 Mailbox full"),
        (Stage.RCPT, "550 No such user"),  # no enhanced code: the recipient's at RCPT
        (Stage.RCPT, "550 5.4.1 Recipient address rejected: Access denied"),  # Microsoft
        (Stage.RCPT, "550 5.7.1 Recipient rejected by policy"),
        (Stage.DOT, "550 5.6.0 Message content rejected"),
        (Stage.DOT, "552 5.3.4 Message too big for system"),
        (Stage.DOT, "451 4.3.0 Temporary failure, try again"),
    ],
)
def test_refusals_about_the_copy_are_the_recipients(stage: Stage, reply: str) -> None:
    assert blame(refused(stage, reply)) is Blame.RECIPIENT


def test_no_reply_before_the_dot_is_the_upstreams_and_after_it_the_copys() -> None:
    gone = Outcome(Status.TRANSIENT, Stage.DATA, 0, "", "connection lost")
    unknown = Outcome(Status.TRANSIENT, Stage.DOT, 0, "", "no reply", ambiguous=True)
    assert blame(gone) is Blame.UPSTREAM
    assert blame(unknown) is Blame.RECIPIENT  # it may have arrived: never sent elsewhere now
    assert blame(DELIVERED) is Blame.NONE


def test_an_upstream_fault_marks_it_down_for_a_growing_backoff_and_a_success_ends_it() -> None:
    fault = refused(Stage.CONNECT, "421 4.7.0 closing")
    health = Health().after(fault, 100.0, down_after=3, retry=RETRY)
    assert not health.up(100.0) and health.up(110.0)
    again = health.after(fault, 110.0, down_after=3, retry=RETRY)
    assert again.down_until == 130.0  # 20 s: the second down in a row waits twice as long
    assert again.after(DELIVERED, 130.0, down_after=3, retry=RETRY) == Health()


def test_copy_deferrals_mark_an_upstream_down_only_when_they_come_in_a_row() -> None:
    deferred = Outcome(Status.TRANSIENT, Stage.RCPT, 451, "4.2.0", "later")
    bounced = refused(Stage.RCPT, "550 5.1.1 no such user")
    health = Health()
    for _ in range(2):
        health = health.after(deferred, 0.0, down_after=3, retry=RETRY)
    assert health.up(0.0) and health.deferrals == 2
    assert health.after(bounced, 0.0, down_after=3, retry=RETRY).deferrals == 0  # it answered
    down = health.after(deferred, 0.0, down_after=3, retry=RETRY)
    assert not down.up(0.0) and down.downs == 1


def candidates(**states: str) -> list[Candidate]:
    """name=ROLE[,down][,spent][,other]: the configured order is the keyword order."""
    out = []
    for name, text in states.items():
        role, *flags = text.split(",")
        out.append(
            Candidate(
                name,
                Role(role),
                up="down" not in flags,
                spent="spent" in flags,
                serves="other" not in flags,
            )
        )
    return out


def test_the_primary_takes_every_copy_while_it_is_up() -> None:
    fleet = candidates(a="primary", b="failover", c="overflow")
    assert route(fleet) == Route("a")


def test_a_down_primary_fails_over_and_traffic_returns_when_it_is_back() -> None:
    assert route(candidates(a="primary,down", b="failover", c="overflow")) == Route("b")
    assert route(candidates(a="primary", b="failover", c="overflow")) == Route("a")


def test_a_spent_quota_overflows_but_does_not_fail_over() -> None:
    assert route(candidates(a="primary,spent", b="failover", c="overflow")) == Route("c")
    assert route(candidates(a="primary,spent", b="failover")) == Route(None, "spent")


def test_a_copy_that_failed_at_one_upstream_goes_to_the_next() -> None:
    fleet = candidates(a="primary", b="failover")
    assert route(fleet, tried=frozenset({"a"})) == Route("b")
    assert route(fleet, tried=frozenset({"a", "b"})) == Route(None, "down")


def test_several_primaries_share_in_order_and_only_serving_ones_count() -> None:
    assert route(candidates(a="primary,other", b="primary")) == Route("b")
    assert route(candidates(a="primary,other")) == Route(None, "none serves this copy")
    assert route(candidates(a="primary,down", b="primary,down", c="failover,down")) == Route(
        None, "down"
    )


def test_the_first_upstream_that_serves_a_copy_takes_it_whatever_its_role() -> None:
    """A passthrough copy only a failover serves goes there; roles count among servers."""
    assert route(candidates(a="primary,other", b="failover")) == Route("b")
    assert route(candidates(a="primary,other", b="overflow", c="failover")) == Route("b")
    assert route(candidates(a="primary,other", b="failover,down", c="failover")) == Route("c")
