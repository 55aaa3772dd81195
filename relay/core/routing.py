"""Pure routing between several upstreams: whose fault a refusal is, and who sends next.

Rule 1 (blame): an outcome is about the copy (``RECIPIENT``: retried nowhere
else, it bounces or waits as SPEC 5 says), or about the upstream (``UPSTREAM``:
the copy may go to the next upstream at once). About the upstream: no
connection, TLS or AUTH failure, ``530`` (authentication required), ``421``
(RFC 5321 3.8: the service is closing), no reply before the final dot, any
5xx at ``MAIL`` (the provider refuses our account or sender domain, not this
recipient), a 5xx at ``RCPT`` that refuses relaying (``Relay access denied``:
our account may not send, for any recipient), and a 5xx at ``DATA`` or the
final dot whose RFC 3463 class is ``X.7.x`` security or policy, ``X.3.x`` mail
system (but ``X.3.4``, too big, is the message's), ``X.4.x`` network or
``X.5.x`` protocol. About the copy: every other 5xx at ``RCPT`` (whatever its
class: Microsoft's ``550 5.4.1 Recipient address rejected`` is a recipient that
does not exist), ``5.1.x``, ``5.2.x`` and ``5.6.x`` after ``DATA``, and the
copy's 4xx replies.

Rule 2 (down): an upstream-fault outcome marks the upstream down at once;
``down_after`` copy-transient 4xx replies in a row do too (a provider
throttling every copy is as good as down). A down upstream is tried again
after a backoff (``policy.Backoff``); the first success brings it back up.

Rule 3 (route): the configured order is the preference, among the upstreams
that serve the copy (its sender domain, its login). A ``primary`` takes copies
while it is up and has quota; a ``failover`` only while an upstream before it
is down; an ``overflow`` only while one before it has spent its quota; the first
upstream that serves a copy takes it whatever its role (there is nothing before
it). When the primary is back, it is first again: traffic returns by itself.

Real replies, and how Rule 1 reads them (each is a test in tests/test_routing.py):
``421 4.7.0 Try again later, closing connection`` (Gmail) -> upstream;
``535 5.7.8 Authentication credentials invalid`` (SES, SendGrid) -> upstream;
``550 5.7.1 Relaying denied`` (Mailgun, at MAIL) -> upstream;
``554 Message rejected: Email address is not verified`` (SES, at MAIL) -> upstream;
``554 5.7.1 <...>: Relay access denied`` (Postfix, at RCPT) -> upstream;
``554 5.7.1 Sending paused for this account`` (at the final dot) -> upstream;
``550 5.1.1 The email account that you tried to reach does not exist`` (Gmail,
at RCPT) -> recipient; ``550 5.4.1 Recipient address rejected: Access denied``
(Microsoft, at RCPT) -> recipient; ``552 5.2.2 Mailbox full`` -> recipient;
``550 5.6.0 Message content rejected`` -> recipient;
``452 4.2.2 Mailbox full`` -> recipient, transient.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from relay.core.model import Outcome, Stage, Status
from relay.core.policy import Backoff

SERVICE_CLOSING = 421  # RFC 5321 3.8
# RFC 3463 subject classes that are about the upstream: 3 mail system, 4 network
# and routing, 5 protocol, 7 security or policy. X.3.4 (message too big) is the copy's.
_UPSTREAM_SUBJECTS = frozenset({"3", "4", "5", "7"})
_COPY_DETAILS = frozenset({"3.4"})
# "Relay access denied" (Postfix), "Relaying denied" (Mailgun), "relay not permitted" (Exim).
_RELAY_DENIED = re.compile(r"\brelay(ing)? (access )?(denied|not permitted)", re.IGNORECASE)


class Role(enum.Enum):
    """What an upstream is for, in the configured list."""

    PRIMARY = "primary"
    FAILOVER = "failover"  # while the upstreams before it are down
    OVERFLOW = "overflow"  # while an upstream before it has spent its daily quota


class Blame(enum.Enum):
    """Rule 1: whose fault an outcome is."""

    NONE = "none"  # delivered
    RECIPIENT = "recipient"  # the copy's own: never retried at another upstream
    UPSTREAM = "upstream"  # the upstream's: the copy may go to the next one now


def blame(outcome: Outcome) -> Blame:
    """Rule 1, for one outcome."""
    if outcome.status is Status.DELIVERED:
        return Blame.NONE
    if outcome.stage in (Stage.CONNECT, Stage.TLS, Stage.AUTH) or outcome.auth_failed:
        return Blame.UPSTREAM
    if outcome.code == SERVICE_CLOSING or (outcome.code == 0 and not outcome.ambiguous):
        return Blame.UPSTREAM  # closing, or gone without a reply before the final dot
    if outcome.code < 500:
        return Blame.RECIPIENT
    if outcome.stage is Stage.MAIL:
        return Blame.UPSTREAM
    if outcome.stage is Stage.RCPT:
        return Blame.UPSTREAM if _RELAY_DENIED.search(outcome.text) else Blame.RECIPIENT
    if outcome.enhanced:
        _, subject, detail = outcome.enhanced.split(".")
        if subject in _UPSTREAM_SUBJECTS and f"{subject}.{detail}" not in _COPY_DETAILS:
            return Blame.UPSTREAM
    return Blame.RECIPIENT


@dataclass(frozen=True, slots=True)
class Health:
    """Rule 2: one upstream's recent record, as a value."""

    down_until: float = 0.0  # up when ``now >= down_until``
    downs: int = 0  # times marked down in a row: the backoff's attempt number
    deferrals: int = 0  # copy-transient 4xx replies in a row

    def up(self, now: float) -> bool:
        return now >= self.down_until

    def after(self, outcome: Outcome, now: float, *, down_after: int, retry: Backoff) -> Health:
        """The health once ``outcome`` is known (``retry`` spaces the tries of a down one)."""
        fault = blame(outcome)
        if fault is Blame.NONE:
            return Health()
        transient = outcome.status is Status.TRANSIENT
        if fault is Blame.RECIPIENT and not (transient and outcome.code >= 400):
            return replace(self, deferrals=0)  # the upstream answered: it is up
        deferrals = self.deferrals + (fault is Blame.RECIPIENT)
        if fault is Blame.RECIPIENT and deferrals < down_after:
            return replace(self, deferrals=deferrals)
        downs = self.downs + 1
        return Health(down_until=now + retry.delay(downs), downs=downs, deferrals=0)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One configured upstream as routing sees it at one moment."""

    name: str
    role: Role
    up: bool
    spent: bool  # its daily quota is used up until the provider's reset
    serves: bool = True  # it may take this copy (sender domain, credential passthrough)


@dataclass(frozen=True, slots=True)
class Route:
    """Rule 3's answer: the upstream to use, or why there is none now."""

    name: str | None
    reason: str = ""  # when ``name`` is None: "down", "spent" or "none serves this copy"


def route(candidates: Sequence[Candidate], *, tried: frozenset[str] = frozenset()) -> Route:
    """Rule 3: the first upstream that may take the copy now (none of ``tried``)."""
    earlier_down = earlier_spent = False
    served = False
    for c in candidates:
        if not c.serves:
            continue
        eligible = (
            c.role is Role.PRIMARY
            or not served  # the first that serves this copy: nothing before it to fail over
            or (c.role is Role.FAILOVER and earlier_down)
            or (c.role is Role.OVERFLOW and earlier_spent)
        )
        served = True
        if eligible and c.up and not c.spent and c.name not in tried:
            return Route(c.name)
        earlier_down |= not c.up or c.name in tried
        earlier_spent |= c.spent
    if not served:
        return Route(None, "none serves this copy")
    return Route(None, "spent" if earlier_spent and not earlier_down else "down")
