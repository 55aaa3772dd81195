"""Direct mode (SPEC 5): try every copy before answering, then one reply for the
message and one fate for each copy.

Rule 1: never ``250`` unless at least one copy was delivered (or may have
been), and never a 4xx that would make the application resend copies that
were already delivered.
Rule 2: all copies delivered gives ``250``. None delivered, and none that might
have been: the application keeps the message. Its reply is a 4xx if any copy
failed transiently, else a 5xx; the upstream's own code and enhanced code when
every copy of that class got the same one at MAIL, RCPT, DATA or the final dot
(one recipient: exactly what the upstream said, as Postfix's
``smtpd_proxy_filter`` passes its proxy's reply on), else ``451 4.4.0`` or
``554 5.0.0``. Otherwise ``250``, and the relay keeps the rest: a transient
failure, or no reply after the final dot, is retried from the queue; a
permanent refusal fails now and its sender gets a notification. A copy the
upstream accepted or refused for good is never sent again.
Rule 3: the whole attempt ends by a deadline well under the client's
10-minute DATA timeout; a copy still in flight then is counted as transient
and ambiguous (it may have arrived).
Rule 4: the reply names counts and codes, never the upstream's text: that
text may name a recipient, and the reply is logged.

The table (``choose_reply``) is pure; ``deliver_direct`` runs the copies through
the upstream the server opened, and ``intake`` writes each copy's fate down.
Nothing here imports a network library or the spool.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.core.errors import Reply
from relay.core.model import Copy, Credentials, Outcome, Stage, Status
from relay.upstream.smtp import Upstream

TIMED_OUT = Outcome(Status.TRANSIENT, Stage.DOT, 0, "", "deadline reached", ambiguous=True)


class Fate(enum.Enum):
    """What direct mode does with one copy once the reply is chosen."""

    DELIVERED = "delivered"  # the upstream took it: done, never sent again
    RETRY = "retry"  # transient, or no reply after the final dot: deferred in the queue
    FAILED = "failed"  # refused for good: failed now, the sender gets a DSN
    RETURNED = "returned"  # not taken: the application got a 4xx or 5xx and keeps it


@dataclass(frozen=True, slots=True)
class Decision:
    """The one reply to the application, and each copy's fate, in the copies' order."""

    reply: Reply
    fates: tuple[Fate, ...]

    @property
    def taken(self) -> bool:
        """Whether the relay answered ``250``: it owns what was not delivered."""
        return self.reply.code == 250


@dataclass(frozen=True, slots=True)
class Result:
    decision: Decision
    outcomes: tuple[Outcome, ...]

    @property
    def reply(self) -> Reply:
        return self.decision.reply


async def deliver_direct(
    upstream: Upstream,
    mail_from: str,
    copies: Sequence[Copy],
    *,
    smtputf8: bool,
    credentials: Credentials | None,
    deadline: float,
    queue_id: str,
    on_outcome: Callable[[Copy, Outcome, float], None],
    soft_bounce: bool = False,
    notifies: bool = True,
) -> Result:
    """Send every copy (concurrently, the pool bounds it) and choose the reply."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one(copy: Copy) -> Outcome:
        outcome = await upstream.send(mail_from, copy, smtputf8=smtputf8, credentials=credentials)
        on_outcome(copy, outcome, loop.time() - started)
        return outcome

    tasks = [asyncio.ensure_future(one(copy)) for copy in copies]
    try:
        done, pending = await asyncio.wait(tasks, timeout=deadline)
    except asyncio.CancelledError:  # a stop that could wait no longer: no copy goes on alone
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    outcomes = []
    for copy, task in zip(copies, tasks, strict=True):
        if task in done and task.exception() is None:
            outcomes.append(task.result())
            continue
        # Still in flight at the deadline (or failed inside the upstream, which
        # ``send`` promises never to do): it may have arrived, so it is ambiguous.
        outcomes.append(TIMED_OUT)
        on_outcome(copy, TIMED_OUT, loop.time() - started)
    decision = choose_reply(outcomes, queue_id, soft_bounce=soft_bounce, notifies=notifies)
    return Result(decision, tuple(outcomes))


# Replies about the message that the application may be given as they are (RFC 5321
# 4.2.2-4.2.3); 421 is not one: it means the relay itself is closing the session.
_PASSED_ON = frozenset({450, 451, 452, 550, 551, 552, 553, 554})
_ABOUT_THE_MESSAGE = frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.DOT})


def choose_reply(
    outcomes: Sequence[Outcome],
    queue_id: str,
    *,
    soft_bounce: bool = False,
    notifies: bool = True,
) -> Decision:
    """Rules 1 and 2 as a table over the copies' outcomes (pure).

    A copy with no reply after its final dot may have arrived: like a delivered
    one, it rules out a 4xx (the application would send it again). With
    ``soft_bounce`` a permanent refusal counts as transient, as in the queue.
    ``notifies``: whether a refused copy's sender gets a DSN (``delivery.dsn`` is on
    and the sender is not ``<>``); the reply says so only then.
    """
    total = len(outcomes)
    delivered = sum(1 for o in outcomes if o.status is Status.DELIVERED)

    def permanent(o: Outcome) -> bool:
        return o.status is Status.PERMANENT and not soft_bounce

    if delivered == total:
        reply = Reply(250, "2.0.0", f"OK: queued as {queue_id}, {total} copies delivered")
        return Decision(reply, (Fate.DELIVERED,) * total)
    if delivered or any(o.ambiguous for o in outcomes):
        fates = tuple(
            Fate.DELIVERED
            if o.status is Status.DELIVERED
            else Fate.FAILED
            if permanent(o)
            else Fate.RETRY
            for o in outcomes
        )
        text = f"OK: queued as {queue_id}, {delivered} of {total} copies delivered"
        retry, failed = fates.count(Fate.RETRY), fates.count(Fate.FAILED)
        if retry:
            text += f", {retry} queued for retry"
        if failed:
            text += f", {failed} refused" + (" (the sender is notified)" if notifies else "")
        return Decision(Reply(250, "2.0.0", text), fates)
    returned = (Fate.RETURNED,) * total
    transient = [o for o in outcomes if not permanent(o)]
    if transient:
        reply = _passed_on(transient, 4) or Reply(
            451, "4.4.0", "Upstream did not take the message; nothing was delivered"
        )
        return Decision(reply, returned)
    reply = _passed_on(outcomes, 5) or Reply(
        554, "5.0.0", "Upstream refused every copy; nothing was delivered"
    )
    return Decision(reply, returned)


def _passed_on(outcomes: Sequence[Outcome], klass: int) -> Reply | None:
    """The upstream's code and enhanced code, when every one of ``outcomes`` got the same."""
    replies = {(o.code, o.enhanced, o.stage in _ABOUT_THE_MESSAGE) for o in outcomes}
    if len(replies) != 1:
        return None
    code, enhanced, about_the_message = replies.pop()
    if not about_the_message or code not in _PASSED_ON or code // 100 != klass:
        return None
    if klass == 4:
        enhanced = enhanced if enhanced.startswith("4.") else "4.4.0"
        return Reply(code, enhanced, "Upstream did not take the message; nothing was delivered")
    enhanced = enhanced if enhanced.startswith("5.") else "5.0.0"
    return Reply(code, enhanced, "Upstream refused every copy; nothing was delivered")
