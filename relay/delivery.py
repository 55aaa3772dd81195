"""Direct delivery: try every copy before answering the application (SPEC 5, ``direct``).

Rule 1: never ``250`` unless at least one copy was delivered, and never a 4xx
that would make the application resend copies that were already delivered.
Rule 2: all copies delivered gives ``250``; none delivered gives the
upstream's class (``451`` if any failure was transient, else ``554``); some
delivered gives ``250``, and the copies that failed are reported (log and
metric): without the durable queue there is nowhere to keep them.
Rule 3: the whole attempt ends by a deadline well under the client's
10-minute DATA timeout; a copy still in flight then is counted as transient.

The upstream is whatever ``Upstream`` the server opened; nothing here imports
a network library.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.errors import Reply
from relay.model import Copy, Credentials, Outcome, Stage, Status
from relay.upstream import Upstream

TIMED_OUT = Outcome(Status.TRANSIENT, Stage.DOT, 0, "", "deadline reached", ambiguous=True)


@dataclass(frozen=True, slots=True)
class Result:
    reply: Reply
    outcomes: tuple[Outcome, ...]


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
) -> Result:
    """Send every copy (concurrently, the pool bounds it) and choose the reply."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one(copy: Copy) -> Outcome:
        outcome = await upstream.send(mail_from, copy, smtputf8=smtputf8, credentials=credentials)
        on_outcome(copy, outcome, loop.time() - started)
        return outcome

    tasks = [asyncio.ensure_future(one(copy)) for copy in copies]
    done, pending = await asyncio.wait(tasks, timeout=deadline)
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
    return Result(choose_reply(outcomes, queue_id), tuple(outcomes))


def choose_reply(outcomes: Sequence[Outcome], queue_id: str) -> Reply:
    """Rule 2 as a table over the copies' outcomes."""
    delivered = sum(1 for o in outcomes if o.status is Status.DELIVERED)
    total = len(outcomes)
    if delivered == total:
        return Reply(250, "2.0.0", f"OK: queued as {queue_id}, {total} copies delivered")
    if delivered:
        return Reply(
            250, "2.0.0", f"OK: queued as {queue_id}, {delivered} of {total} copies delivered"
        )
    if any(o.status is Status.TRANSIENT for o in outcomes):
        return Reply(451, "4.4.0", "Upstream did not take the message; nothing was delivered")
    return Reply(554, "5.0.0", "Upstream refused every copy; nothing was delivered")
