"""The queue's delivery schedule (SPEC 1, 5): retries, lifetime, DSN, 535 pause, rates, drain.

The spool is real (SQLite in ``tmp_path``); the clock and the jitter are
injected, so nothing sleeps. The upstream is a scripted double answering each
recipient from its own queue of outcomes: these tests are about the schedule,
not the wire (two cases at the end use the real recording SMTP server).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from relay.config import Config, load
from relay.core.addresses import parse_address
from relay.core.model import Copy, Credentials, Outcome, Stage, Status
from relay.core.policy import Backoff, RateLimiter, backoff
from relay.custody.spool import CopyState, Job, NewCopy, NewMessage, Spool, SpoolError, SpoolFull
from relay.delivery import Deliverer
from relay.delivery import settle as settle_module
from relay.ops.logs import AddressTokens
from relay.ops.metrics import Metrics
from relay.upstream.outbox import CheckStep
from relay.upstream.smtp import Upstream, open_upstream
from tests.upstream_server import PASSWORD, USER, UpstreamServer

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
SENDER = "news@example.org"
ALICE = "alice@example.com"
BOB = "bob@example.net"
CAROL = "carol@example.test"

DELIVERED = Outcome(Status.DELIVERED, Stage.DOT, 250, "2.0.0", "ok")
TRANSIENT = Outcome(Status.TRANSIENT, Stage.RCPT, 451, "4.2.0", "mailbox busy")
REFUSED = Outcome(Status.TRANSIENT, Stage.CONNECT, 0, "", "connection refused")
PERMANENT = Outcome(Status.PERMANENT, Stage.RCPT, 550, "5.1.1", "no such user")
BAD_CREDENTIALS = Outcome(
    Status.TRANSIENT, Stage.AUTH, 535, "5.7.8", "bad credentials", auth_failed=True
)


@dataclass(frozen=True)
class Sent:
    mail_from: str
    rcpt: str
    data: bytes


class ScriptedUpstream:
    """Answers each recipient from its own queue of outcomes (then 250), recording every send.

    A recipient in ``hang`` never gets an answer (until cancelled); one in ``gate``
    waits for that event to be set.
    """

    def __init__(self, script: Mapping[str, Sequence[Outcome]] | None = None) -> None:
        self.script = {rcpt: list(outcomes) for rcpt, outcomes in (script or {}).items()}
        self.sent: list[Sent] = []
        self.hang: set[str] = set()
        self.gate: dict[str, asyncio.Event] = {}
        self.called = asyncio.Event()

    async def send(
        self, mail_from: str, copy: Copy, *, smtputf8: bool, credentials: Credentials | None = None
    ) -> Outcome:
        rcpt = copy.recipient.text
        self.sent.append(Sent(mail_from, rcpt, bytes(copy)))
        self.called.set()
        if rcpt in self.hang:
            await asyncio.Event().wait()
        if rcpt in self.gate:
            await self.gate[rcpt].wait()
        queue = self.script.get(rcpt)
        return queue.pop(0) if queue else DELIVERED

    async def check(self) -> list[CheckStep]:
        return []

    async def aclose(self) -> None:
        return None

    def to(self, rcpt: str) -> list[Sent]:
        return [s for s in self.sent if s.rcpt == rcpt]


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    directory: Path
    config: Config
    spool: Spool
    upstream: ScriptedUpstream
    deliverer: Deliverer
    clock: Clock
    registry: CollectorRegistry
    real: Upstream | None = None  # a real SMTP upstream in place of the double

    async def store(
        self, message_id: str, rcpts: Sequence[str], *, sender: str = SENDER, at: float = T0
    ) -> None:
        await self.spool.store(
            NewMessage(
                id=message_id,
                sender=sender,
                smtputf8=False,
                received=at,
                expires=at + self.config.delivery.lifetime,
                body=b"Hello.\r\n",
                copies=tuple(NewCopy(r, headers(r, sender), next_try=at) for r in rcpts),
            )
        )

    async def run_at(self, now: float) -> int:
        """Set the clock to ``now``, claim what is due, and wait for those deliveries."""
        self.clock.now = now
        return await self.deliverer.run_once(now)

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(f"solo_relay_{name}", labels)
        assert value is not None, name
        return value

    def row(self, rcpt: str) -> tuple[str, int, float] | None:
        """(state, attempts, next_try) of the copy for ``rcpt``, or None if it left the spool."""
        with contextlib.closing(sqlite3.connect(self.directory / "spool.db")) as conn:
            found = conn.execute(
                "SELECT state, attempts, next_try FROM copies WHERE rcpt = ?", (rcpt,)
            ).fetchone()
        return None if found is None else (found[0], found[1], found[2])


def headers(rcpt: str, sender: str = SENDER) -> bytes:
    return (
        f"Received: from app ([127.0.0.1]) by relay.example.test for <{rcpt}>\r\n"
        f"From: <{sender or 'mailer@example.org'}>\r\nTo: <{rcpt}>\r\n"
        "Subject: Your order\r\nMessage-ID: <order-1@example.org>\r\n\r\n"
    ).encode()


@contextlib.contextmanager
def world(
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    script: Mapping[str, Sequence[Outcome]] | None = None,
    *,
    rand: float = 0.5,
    spool: Spool | None = None,
    real_upstream: bool = False,
) -> Iterator[World]:
    config = load(
        environ={"RELAY_SMTP_HOSTNAME": "relay.example.test", "RELAY_SPOOL_DIR": str(tmp_path)}
        | dict(env or {})
    )
    the_spool = spool or Spool(tmp_path)
    the_spool.open()
    registry = CollectorRegistry()
    upstream = ScriptedUpstream(script)
    clock = Clock()
    real = open_upstream(config.upstream, helo_name="relay.example.test") if real_upstream else None
    deliverer = Deliverer(
        config,
        the_spool,
        real or upstream,
        Metrics(registry),
        AddressTokens(b"k" * 32),
        clock=clock,
        rand=lambda: rand,
    )
    try:
        yield World(tmp_path, config, the_spool, upstream, deliverer, clock, registry, real)
    finally:
        the_spool.close()


def parse_dsn(data: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    """The DSN as a message, and its per-message and per-recipient field blocks."""
    report = email.message_from_bytes(data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = [part for part in report.get_payload() if isinstance(part, email.message.Message)]
    types = [part.get_content_type() for part in parts]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = [b for b in parts[1].get_payload() if isinstance(b, email.message.Message)]
    assert len(blocks) == 2
    return report, blocks


async def test_transient_failure_defers_with_jittered_backoff(tmp_path: Path) -> None:
    """A 4xx defers the copy: attempts 1, next_try = now + backoff(1) with the injected jitter."""
    with world(tmp_path, script={ALICE: [TRANSIENT]}, rand=0.0) as w:
        await w.store("M1", [ALICE])
        assert await w.run_at(T0) == 1
        # retry_initial 60 s, jitter 0.2, rand 0.0: 60 * (1 - 0.2) = 48 s.
        assert w.row(ALICE) == ("deferred", 1, T0 + 48)
        assert await w.run_at(T0 + 47.9) == 0
        assert len(w.upstream.sent) == 1
        assert w.metric("retries_total") == 1
        assert w.metric("copies_total", outcome="transient") == 1


async def test_backoff_doubles_up_to_retry_max(tmp_path: Path) -> None:
    """Each further failure doubles the delay, capped at retry_max; attempts count up."""
    env = {"RELAY_DELIVERY_RETRY_INITIAL": "60", "RELAY_DELIVERY_RETRY_MAX": "300"}
    with world(tmp_path, env, script={ALICE: [TRANSIENT] * 6}) as w:
        await w.store("M1", [ALICE])
        now, delays = T0, []
        for attempt in range(1, 7):
            assert await w.run_at(now) == 1
            row = w.row(ALICE)
            assert row is not None
            state, attempts, next_try = row
            assert (state, attempts) == ("deferred", attempt)
            delays.append(next_try - now)
            now = next_try
        assert delays == [60, 120, 240, 300, 300, 300]
        assert w.metric("retries_total") == 6


def test_one_backoff_decides_both_the_retries_and_the_record_retries() -> None:
    """The pure decision: ``Backoff`` is ``backoff`` with its parameters, nothing else.

    A delivered copy's record is retried after 0.25 s doubling to 5 s, unjittered; the
    queue's retries are the same function with ``delivery.retry_*`` and the jitter.
    """
    record = settle_module.RECORD_RETRY
    assert [record.delay(n) for n in range(1, 9)] == [0.25, 0.5, 1, 2, 4, 5, 5, 5]
    assert record.delay(3, rand=0.0) == record.delay(3, rand=0.99) == 1  # no jitter
    assert record.delay(5000) == 5  # hours of a full disk: still the cap (2.0 ** 4999 overflows)
    queue = Backoff(initial=60, maximum=300, jitter=0.2)
    for attempt in range(1, 8):
        for rand in (0.0, 0.25, 0.5, 0.999):
            expected = backoff(attempt, initial=60, maximum=300, jitter=0.2, rand=rand)
            assert queue.delay(attempt, rand) == expected
    assert queue.delay(1, 0.0) == 48  # 60 * (1 - 0.2)
    assert queue.delay(9, 0.5) == 300  # capped, then spread around the cap
    with pytest.raises(AttributeError):
        queue.initial = 1  # type: ignore[misc]  # a frozen value


async def test_success_after_two_failures_delivers_exactly_once(tmp_path: Path) -> None:
    """Two transient failures then a 250: one delivery, the message leaves, nothing is resent."""
    with world(tmp_path, script={ALICE: [REFUSED, TRANSIENT]}) as w:
        await w.store("M1", [ALICE])
        assert await w.run_at(T0) == 1
        assert await w.run_at(T0 + 60) == 1
        assert await w.run_at(T0 + 60 + 120) == 1
        assert w.row(ALICE) is None
        assert await w.run_at(T0 + 86_400) == 0
        assert len(w.upstream.to(ALICE)) == 3
        assert w.metric("copies_total", outcome="delivered") == 1
        assert w.metric("copies_total", outcome="transient") == 2
        assert w.metric("retries_total") == 2
        assert w.metric("dsn_sent_total") == 0


async def test_expiry_at_a_retry_fails_and_notifies_the_sender(tmp_path: Path) -> None:
    """A retry that fails after the lifetime: failed, and a 4.4.7 DSN naming only that recipient."""
    env = {"RELAY_DELIVERY_LIFETIME": "600", "RELAY_DELIVERY_RETRY_INITIAL": "60"}
    with world(tmp_path, env, script={BOB: [REFUSED] * 10}) as w:
        await w.store("M1", [ALICE, BOB])
        now = T0
        while (row := w.row(BOB)) is not None:
            assert row[0] in ("queued", "deferred")
            assert await w.run_at(now) >= 1
            if (row := w.row(BOB)) is not None:
                now = row[2]
        # Tried at 0, 60, 180, 420 and at the end of the lifetime, never after it.
        assert now == T0 + 600
        assert len(w.upstream.to(BOB)) == 5
        assert w.metric("copies_total", outcome="transient") == 5
        assert w.metric("dsn_sent_total") == 0  # queued; counted once the upstream takes it
        # The DSN is a new message from <> to the original sender, due at once.
        assert await w.run_at(now) == 1
        assert w.metric("dsn_sent_total") == 1
        (dsn,) = w.upstream.to(SENDER)
        assert dsn.mail_from == ""
        report, (per_message, per_recipient) = parse_dsn(dsn.data)
        assert report["To"] == f"<{SENDER}>"
        assert per_message["X-Queue-ID"] == "M1"
        assert per_recipient["Final-Recipient"] == f"rfc822; {BOB}"
        assert per_recipient["Action"] == "failed"
        assert per_recipient["Status"] == "4.4.7"
        assert ALICE.encode() not in dsn.data
        assert w.row(SENDER) is None  # the DSN was delivered and left the spool


async def test_last_retry_is_at_the_end_of_the_lifetime_not_before(tmp_path: Path) -> None:
    """A backoff that would pass the lifetime is cut to it: no failure before the lifetime ends."""
    env = {"RELAY_DELIVERY_LIFETIME": "100", "RELAY_DELIVERY_RETRY_INITIAL": "60"}
    with world(tmp_path, env, script={ALICE: [REFUSED] * 3}) as w:
        await w.store("M1", [ALICE])
        await w.run_at(T0)
        assert w.row(ALICE) == ("deferred", 1, T0 + 60)
        await w.run_at(T0 + 60)  # the next backoff (120 s) would pass the lifetime
        assert w.row(ALICE) == ("deferred", 2, T0 + 100)
        assert w.metric("dsn_sent_total") == 0
        await w.run_at(T0 + 100)
        assert w.row(ALICE) is None
        await w.run_at(T0 + 100)  # the DSN goes out
        assert w.metric("dsn_sent_total") == 1


async def test_permanent_failure_fails_at_once_with_dsn(tmp_path: Path) -> None:
    """A 5xx fails the copy on its first attempt; the DSN carries 5.1.1 and only that recipient."""
    with world(tmp_path, script={BOB: [PERMANENT]}) as w:
        await w.store("M1", [ALICE, BOB])
        assert await w.run_at(T0) == 2
        assert w.row(BOB) is None and w.row(ALICE) is None  # both final: the message left
        assert len(w.upstream.to(BOB)) == 1
        assert w.metric("retries_total") == 0
        assert w.metric("copies_total", outcome="permanent") == 1
        assert w.metric("dsn_sent_total") == 0
        assert await w.run_at(T0) == 1
        assert w.metric("dsn_sent_total") == 1
        (dsn,) = w.upstream.to(SENDER)
        assert dsn.mail_from == ""
        _, (_, per_recipient) = parse_dsn(dsn.data)
        assert per_recipient["Final-Recipient"] == f"rfc822; {BOB}"
        assert per_recipient["Status"] == "5.1.1"
        assert per_recipient["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
        assert ALICE.encode() not in dsn.data


async def test_null_sender_fails_without_dsn(tmp_path: Path) -> None:
    """A copy from <> that fails for good gets no DSN (a bounce is never bounced)."""
    with world(tmp_path, script={BOB: [PERMANENT]}) as w:
        await w.store("M1", [BOB], sender="")
        await w.run_at(T0)
        assert w.upstream.sent[0].mail_from == ""
        assert w.row(BOB) is None
        assert w.metric("dsn_sent_total") == 0
        assert await w.spool.stats() == (dict.fromkeys(CopyState, 0), None)


async def test_dsn_switched_off(tmp_path: Path) -> None:
    """delivery.dsn = false: a permanent failure is final and nothing goes to the sender."""
    with world(tmp_path, {"RELAY_DELIVERY_DSN": "false"}, script={BOB: [PERMANENT]}) as w:
        await w.store("M1", [BOB])
        await w.run_at(T0)
        assert w.row(BOB) is None
        assert w.metric("dsn_sent_total") == 0
        assert await w.run_at(T0 + 1) == 0
        assert w.upstream.to(SENDER) == []


async def test_failed_dsn_gets_no_dsn(tmp_path: Path) -> None:
    """A DSN that itself bounces is dropped (and never counted as sent): no notification loop."""
    with world(tmp_path, script={BOB: [PERMANENT], SENDER: [PERMANENT]}) as w:
        await w.store("M1", [BOB])
        await w.run_at(T0)
        await w.run_at(T0)
        assert len(w.upstream.to(SENDER)) == 1
        assert w.metric("dsn_sent_total") == 0
        assert await w.spool.stats() == (dict.fromkeys(CopyState, 0), None)


async def test_soft_bounce_defers_permanent_failures(tmp_path: Path) -> None:
    """soft_bounce: a 5xx is deferred like a 4xx; at expiry the DSN says 4.4.7, not 5.1.1."""
    env = {"RELAY_DELIVERY_SOFT_BOUNCE": "true", "RELAY_DELIVERY_LIFETIME": "60"}
    with world(tmp_path, env, script={BOB: [PERMANENT, PERMANENT]}) as w:
        await w.store("M1", [BOB])
        await w.run_at(T0)
        assert w.row(BOB) == ("deferred", 1, T0 + 60)
        assert w.metric("dsn_sent_total") == 0
        assert w.metric("retries_total") == 1
        await w.run_at(T0 + 60)
        assert w.row(BOB) is None
        await w.run_at(T0 + 60)
        (dsn,) = w.upstream.to(SENDER)
        _, (_, per_recipient) = parse_dsn(dsn.data)
        assert per_recipient["Status"] == "4.4.7"


async def test_bad_credentials_pause_delivery_without_spending_attempts(tmp_path: Path) -> None:
    """A 535 pauses all delivery until auth_pause ends; the copy waits queued, no attempt spent."""
    with world(tmp_path, script={ALICE: [BAD_CREDENTIALS]}) as w:
        await w.store("M1", [ALICE])
        assert await w.run_at(T0) == 1
        assert w.deliverer.paused_until == T0 + 300
        assert w.row(ALICE) == ("queued", 0, T0 + 300)
        await w.store("M2", [BOB], at=T0 + 10)  # due now, but delivery is paused
        assert await w.run_at(T0 + 10) == 0
        assert await w.run_at(T0 + 299.9) == 0
        assert len(w.upstream.sent) == 1
        await w.deliverer.refresh_gauges(T0 + 10)
        assert w.metric("upstream_auth_paused") == 1
        assert w.metric("upstream_auth_failures_total") == 1
        assert w.metric("retries_total") == 0
        assert await w.run_at(T0 + 300) == 1  # the probe: one login first
        assert await w.run_at(T0 + 300) == 1  # it got past AUTH: the rest goes
        assert w.row(ALICE) is None and w.row(BOB) is None
        assert sorted(s.rcpt for s in w.upstream.sent) == [ALICE, ALICE, BOB]
        await w.deliverer.refresh_gauges(T0 + 300)
        assert w.metric("upstream_auth_paused") == 0


async def test_after_an_auth_pause_one_probe_copy_logs_in_first(tmp_path: Path) -> None:
    """Pause over: one copy (one login) is tried, not concurrency logins at once (issue 14.8).

    A probe refused again pauses again; a probe that gets past AUTH lets the rest go at once.
    """
    rcpts = [f"user{i}@example.com" for i in range(6)]
    script = {rcpt: [BAD_CREDENTIALS] for rcpt in rcpts[:4]} | {rcpts[4]: [BAD_CREDENTIALS]}
    with world(tmp_path, {"RELAY_DELIVERY_CONCURRENCY": "4"}, script) as w:
        await w.store("M1", rcpts)
        assert await w.run_at(T0) == 4  # in flight together when the first 535 came
        assert w.deliverer.paused_until == T0 + 300
        assert w.deliverer.probing
        resume = T0 + 300
        assert await w.run_at(resume) == 1  # one probe, and it is refused too
        assert w.deliverer.paused_until == resume + 300
        assert await w.run_at(resume + 300) == 1  # the next probe gets through
        assert not w.deliverer.probing
        assert await w.run_at(resume + 300) == 4  # now every slot again
        assert await w.run_at(resume + 300) == 1  # the fifth copy waiting
        assert len(w.upstream.sent) == 11
        assert all(w.row(rcpt) is None for rcpt in rcpts)


async def test_rate_limit_per_second(tmp_path: Path) -> None:
    """rate_per_second = 2: two copies start at one instant, more only as the clock advances."""
    env = {"RELAY_DELIVERY_RATE_PER_SECOND": "2", "RELAY_DELIVERY_CONCURRENCY": "10"}
    with world(tmp_path, env) as w:
        rcpts = [f"user{i}@example.com" for i in range(5)]
        await w.store("M1", rcpts)
        assert await w.run_at(T0) == 2
        assert await w.run_at(T0) == 0
        assert await w.run_at(T0 + 0.5) == 1
        assert await w.run_at(T0 + 0.5) == 0
        assert await w.run_at(T0 + 5) == 2  # the bucket holds one second, never more
        assert sorted(s.rcpt for s in w.upstream.sent) == sorted(rcpts)


async def test_rate_limit_per_day(tmp_path: Path) -> None:
    """rate_per_day = 3: three copies this UTC day, the rest after midnight UTC."""
    env = {"RELAY_DELIVERY_RATE_PER_DAY": "3", "RELAY_DELIVERY_CONCURRENCY": "10"}
    with world(tmp_path, env) as w:
        await w.store("M1", [f"user{i}@example.com" for i in range(5)])
        assert await w.run_at(T0) == 3
        assert await w.run_at(T0 + 3600) == 0  # 23:13 UTC, the same day
        assert await w.run_at(T0 + 7200) == 2  # 00:13 UTC, the next day


def test_rate_limiter_survives_a_clock_set_back() -> None:
    """A wall clock set back an hour refills nothing but does not stall delivery for an hour."""
    limiter = RateLimiter(2, 0)
    assert limiter.take(T0, 5) == 2
    assert limiter.take(T0 - 3600, 5) == 0
    assert limiter.take(T0 - 3599, 5) == 2


async def test_concurrency_bounds_copies_in_flight(tmp_path: Path) -> None:
    """No more than delivery.concurrency copies are claimed while others are in flight."""
    with world(tmp_path, {"RELAY_DELIVERY_CONCURRENCY": "2"}) as w:
        rcpts = [f"user{i}@example.com" for i in range(3)]
        gate = asyncio.Event()
        w.upstream.gate = dict.fromkeys(rcpts, gate)
        await w.store("M1", rcpts)
        assert await w.deliverer.step(T0) == 2
        assert await w.deliverer.step(T0) == 0
        gate.set()
        assert await w.run_at(T0) == 0  # waits for the two in flight
        assert await w.run_at(T0) == 1
        assert sorted(s.rcpt for s in w.upstream.sent) == rcpts


async def test_drain_releases_a_hanging_copy(tmp_path: Path) -> None:
    """drain(grace) with a send that never answers cancels it and puts the copy back to queued."""
    with world(tmp_path) as w:
        w.upstream.hang.add(ALICE)
        await w.store("M1", [ALICE])
        assert await w.deliverer.step(T0) == 1
        await w.upstream.called.wait()
        await w.deliverer.drain(0.01)
        assert w.row(ALICE) == ("queued", 0, T0)
        assert await w.deliverer.step(T0) == 0  # drained: nothing more is claimed
        counts, _ = await w.spool.stats()
        assert counts[CopyState.QUEUED] == 1


async def test_drain_lets_a_delivery_finish_within_grace(tmp_path: Path) -> None:
    """A send that answers within the grace time is recorded delivered, not released."""
    with world(tmp_path) as w:
        w.upstream.gate[ALICE] = gate = asyncio.Event()
        await w.store("M1", [ALICE])
        assert await w.deliverer.step(T0) == 1
        await w.upstream.called.wait()
        draining = asyncio.create_task(w.deliverer.drain(10.0))
        await asyncio.sleep(0)
        gate.set()
        await draining
        assert w.row(ALICE) is None
        assert w.metric("copies_total", outcome="delivered") == 1


async def test_drain_during_a_claim_returns_the_claimed_copies(tmp_path: Path) -> None:
    """Copies claimed while drain begins are put back, never sent after the drain."""
    with world(tmp_path) as w:
        await w.store("M1", [ALICE])
        stepping = asyncio.create_task(w.deliverer.step(T0))
        await asyncio.sleep(0)  # the claim is with the spool's writer
        await w.deliverer.drain(1.0)
        assert await stepping == 0
        assert w.upstream.sent == []
        assert w.row(ALICE) == ("queued", 0, T0)


class FailingOnceSpool(Spool):
    """A real spool whose first ``claim_due`` or ``record`` fails as a full disk would."""

    def __init__(self, directory: Path, method: str) -> None:
        super().__init__(directory)
        self.method = method
        self.failed = asyncio.Event()

    def _fail_once(self, method: str) -> None:
        if method == self.method and not self.failed.is_set():
            self.failed.set()
            raise SpoolError("database or disk is full")

    async def claim_due(self, now: float, limit: int) -> list[Job]:
        self._fail_once("claim_due")
        return await super().claim_due(now, limit)

    async def record(self, copy_id: int, state: CopyState, **kwargs: Any) -> bool:
        self._fail_once("record")
        return await super().record(copy_id, state, **kwargs)


async def test_workers_outlive_a_spool_error(tmp_path: Path) -> None:
    """A spool error in the workers' loop is logged and retried, never the end of delivery."""
    spool = FailingOnceSpool(tmp_path, "claim_due")
    with world(tmp_path, spool=spool) as w:
        await w.store("M1", [ALICE])
        running = asyncio.create_task(w.deliverer.run())
        await spool.failed.wait()
        w.deliverer.wake()
        await asyncio.wait_for(w.upstream.called.wait(), 5)
        await w.deliverer.drain(5.0)
        await asyncio.wait_for(running, 5)
        assert w.row(ALICE) is None


async def test_failed_claim_spends_no_rate_tokens(tmp_path: Path) -> None:
    """A claim the spool refused started nothing, so it costs nothing against the rate limit."""
    spool = FailingOnceSpool(tmp_path, "claim_due")
    with world(tmp_path, {"RELAY_DELIVERY_RATE_PER_SECOND": "1"}, spool=spool) as w:
        await w.store("M1", [ALICE])
        with pytest.raises(SpoolError):
            await w.deliverer.step(T0)
        assert await w.run_at(T0) == 1


async def test_failed_state_write_puts_the_copy_back(tmp_path: Path) -> None:
    """An outcome the spool cannot record goes back to queued, never stuck delivering,
    and not due before the first retry delay (no resend loop while the spool fails)."""
    spool = FailingOnceSpool(tmp_path, "record")
    with world(tmp_path, script={BOB: [PERMANENT, PERMANENT]}, spool=spool) as w:
        await w.store("M1", [BOB])
        await w.run_at(T0)  # never raises
        assert spool.failed.is_set()
        later = T0 + w.config.delivery.retry_initial
        assert w.row(BOB) == ("queued", 0, later)
        assert w.metric("dsn_sent_total") == 0
        await w.run_at(later)  # tried again: now it fails for good, with its DSN
        assert w.row(BOB) is None
        await w.run_at(later)  # the DSN goes out
        assert w.metric("dsn_sent_total") == 1


async def test_no_dsn_possible_still_fails_the_copy(tmp_path: Path) -> None:
    """A sender no DSN can be written to (over 254 octets) still ends failed, never stuck."""
    long_sender = "s" * 64 + "@" + ".".join(["d" * 60] * 3) + ".example.com"
    with world(tmp_path, script={BOB: [PERMANENT]}) as w:
        await w.store("M1", [BOB], sender=long_sender)
        await w.run_at(T0)
        assert w.row(BOB) is None
        assert w.metric("copies_total", outcome="permanent") == 1
        assert w.metric("dsn_sent_total") == 0


async def test_body_lost_to_corruption_is_never_sent(tmp_path: Path) -> None:
    """A body corrupted under a running relay is quarantined, never sent, and no DSN is counted."""
    with world(tmp_path) as w:
        await w.store("M1", [BOB])
        with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as conn:
            conn.execute("UPDATE messages SET body = ? WHERE id = 'M1'", (b"Hellp.\r\n",))
            conn.commit()
        await w.run_at(T0)
        assert w.upstream.sent == []
        assert w.row(BOB) is None
        assert w.spool.quarantined == 1
        # The quarantine took the message and its copies: the DSN built for the lost
        # copy had nothing to commit with, and the metric does not claim one was sent.
        assert w.metric("dsn_sent_total") == 0
        assert await w.run_at(T0) == 0
        assert await w.spool.stats() == (dict.fromkeys(CopyState, 0), None)


async def test_spool_gauges_follow_the_states(tmp_path: Path) -> None:
    """refresh_gauges sets spool_copies by state and the oldest waiting copy's age."""
    with world(tmp_path, script={BOB: [TRANSIENT]}) as w:
        await w.store("M1", [ALICE, BOB])
        await w.deliverer.refresh_gauges(T0 + 30)
        assert w.metric("spool_copies", state="queued") == 2
        assert w.metric("spool_oldest_queued_age_seconds") == 30
        await w.run_at(T0 + 30)
        await w.deliverer.refresh_gauges(T0 + 40)
        assert w.metric("spool_copies", state="queued") == 0
        assert w.metric("spool_copies", state="deferred") == 1
        assert w.metric("spool_copies", state="delivered") == 1
        assert w.metric("spool_oldest_queued_age_seconds") == 40
        assert w.metric("copies_total", outcome="delivered") == 1
        assert w.metric("upstream_replies_total", **{"class": "4xx", "stage": "rcpt"}) == 1


async def test_real_upstream_4xx_then_delivery(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Against a real SMTP server: 451 at RCPT defers, the retry delivers the exact copy bytes."""
    plain_server.script("RCPT", [451])
    env = {"RELAY_UPSTREAM": plain_server.url()}
    with world(tmp_path, env, real_upstream=True) as w:
        try:
            await w.store("M1", [BOB])
            await w.run_at(T0)
            assert w.row(BOB) == ("deferred", 1, T0 + 60)
            assert plain_server.transactions == []
            await w.run_at(T0 + 60)
            assert w.row(BOB) is None
        finally:
            assert w.real is not None
            await w.real.aclose()
    (transaction,) = plain_server.transactions
    assert transaction.mail_from == SENDER
    assert transaction.rcpt_tos == [BOB]
    assert transaction.content == headers(BOB) + b"Hello.\r\n"


async def test_real_upstream_535_pauses(tmp_path: Path, plain_server: UpstreamServer) -> None:
    """Against a real SMTP server: wrong credentials (535) pause delivery, the copy waits queued."""
    env = {
        "RELAY_UPSTREAM": plain_server.url(user=USER),
        "RELAY_UPSTREAM_PASSWORD": PASSWORD + "-wrong",
    }
    with world(tmp_path, env, real_upstream=True) as w:
        try:
            await w.store("M1", [BOB])
            await w.run_at(T0)
        finally:
            assert w.real is not None
            await w.real.aclose()
        assert w.deliverer.paused_until == T0 + w.config.delivery.auth_pause
        assert w.row(BOB) == ("queued", 0, w.deliverer.paused_until)
        assert plain_server.transactions == []


async def test_real_upstream_after_the_pause_one_login_not_pool_size(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """On the wire: four copies, wrong password; at the pause's end one AUTH, not four."""
    env = {
        "RELAY_UPSTREAM": plain_server.url(user=USER),
        "RELAY_UPSTREAM_PASSWORD": PASSWORD + "-wrong",
        "RELAY_UPSTREAM_POOL_SIZE": "4",
    }
    rcpts = [f"user{i}@example.com" for i in range(4)]
    with world(tmp_path, env, real_upstream=True) as w:
        try:
            await w.store("M1", rcpts)
            assert await w.run_at(T0) == 4
            first = len(plain_server.auths)
            resume = w.deliverer.paused_until
            assert resume == T0 + w.config.delivery.auth_pause
            assert await w.run_at(resume) == 1
            assert len(plain_server.auths) == first + 1  # one probe login
            assert w.deliverer.paused_until == resume + w.config.delivery.auth_pause
            plain_server.users[USER] = PASSWORD + "-wrong"  # the provider takes it now
            assert await w.run_at(w.deliverer.paused_until) == 1
            assert not w.deliverer.probing
            assert await w.run_at(w.deliverer.paused_until) == 3
        finally:
            assert w.real is not None
            await w.real.aclose()
    assert sorted(t.rcpt_tos[0] for t in plain_server.transactions) == rcpts
    assert first >= 1


class FailingRecords(Spool):
    """A real spool whose writes of a delivered copy's state fail (a disk gone bad)."""

    async def record(self, copy_id: int, state: CopyState, **kwargs: Any) -> bool:
        if state is CopyState.DELIVERED:
            raise SpoolError("database or disk is full")
        return await super().record(copy_id, state, **kwargs)

    delivered_failures = 0

    async def record_delivered(self, copy_id: int, **kwargs: Any) -> bool:
        self.delivered_failures += 1
        raise SpoolError("database or disk is full")


async def test_delivered_copy_that_cannot_be_recorded_is_not_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream took it but the spool would not note it: it stays delivering, not re-queued."""
    monkeypatch.setattr(settle_module, "RECORD_RETRY", Backoff(0.01, 5.0))
    spool = FailingRecords(tmp_path)
    with world(tmp_path, spool=spool) as w:
        await w.store("M1", [ALICE])
        assert await w.deliverer.step(T0) == 1
        async with asyncio.timeout(10):
            while spool.delivered_failures < 3:  # the record is retried, outside the slot
                await asyncio.sleep(0.01)
        assert w.row(ALICE) is not None and w.row(ALICE)[0] == "delivering"  # type: ignore[index]
        assert await w.deliverer.step(T0 + 3600) == 0
        assert len(w.upstream.to(ALICE)) == 1
        assert w.deliverer.unrecorded == 1
        await w.deliverer.drain(0.05)
        assert w.deliverer.unrecorded == 0


class SlowRecords(Spool):
    """A spool on a disk that is full, then gets room back: ALICE's delivered record fails
    once, and its retry waits until ``room`` is set."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.room = asyncio.Event()
        self.alice: int | None = None
        self.tries = 0

    async def record_delivered(self, copy_id: int, **kwargs: Any) -> bool:
        if copy_id == self.alice:
            self.tries += 1
            if self.tries == 1:
                raise SpoolError("database or disk is full")
            await self.room.wait()
        return await super().record_delivered(copy_id, **kwargs)


async def test_a_delivered_record_being_retried_holds_no_connection_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slot: while ALICE's delivered record is retried, BOB is sent (issue 13, section 3).

    (Before, the retries slept inside the delivery task, which held the slot: with the
    disk full, every slot waited out the record's back-off and delivery stalled.)
    """
    monkeypatch.setattr(settle_module, "RECORD_RETRY", Backoff(0.01, 5.0))
    spool = SlowRecords(tmp_path)
    with world(tmp_path, {"RELAY_DELIVERY_CONCURRENCY": "1"}, spool=spool) as w:
        await w.store("M1", [ALICE])
        spool.alice = 1  # the first copy stored
        await w.store("M2", [BOB])
        assert await w.deliverer.step(T0) == 1
        async with asyncio.timeout(5):
            while spool.tries < 2:  # the first record failed; its retry waits for room
                await asyncio.sleep(0.01)
            while await w.deliverer.step(T0) == 0:
                await asyncio.sleep(0.01)
            while not w.upstream.to(BOB):
                await asyncio.sleep(0.01)
        assert w.row(ALICE) is not None and w.row(ALICE)[0] == "delivering"  # type: ignore[index]
        assert await w.deliverer.step(T0 + 3600) == 0  # ALICE is not claimed again
        spool.room.set()
        await w.deliverer.run_once(T0 + 3600)
        assert w.row(ALICE) is None and w.row(BOB) is None  # both recorded, messages done
        assert [s.rcpt for s in w.upstream.sent] == [ALICE, BOB]


async def test_refused_passthrough_login_holds_only_its_own_mail(tmp_path: Path) -> None:
    """An application's bad passthrough password waits alone; other mail is not paused."""
    with world(tmp_path, script={ALICE: [BAD_CREDENTIALS]}) as w:
        w.deliverer.credentials["app"] = Credentials("app", "wrong")
        await w.spool.store(
            NewMessage(
                id="M1",
                sender=SENDER,
                smtputf8=False,
                received=T0,
                expires=T0 + 3600,
                body=b"Hello.\r\n",
                copies=(NewCopy(ALICE, headers(ALICE), next_try=T0),),
                auth_user="app",
            )
        )
        await w.store("M2", [BOB])
        await w.run_at(T0)
        assert w.deliverer.paused_until == 0
        assert w.row(ALICE) is not None and w.row(ALICE)[0] == "queued"  # type: ignore[index]
        assert len(w.upstream.to(BOB)) == 1


async def test_one_free_slot_goes_to_the_spool_before_handed_over_mail(tmp_path: Path) -> None:
    """With copies waiting in memory and one slot, a copy due in the spool is not starved.

    (Found in review: the one slot always went to the in-memory line, so while new mail
    kept coming, retries and DSNs due in the spool never started.)
    """
    with world(tmp_path, {"RELAY_DELIVERY_CONCURRENCY": "1"}) as w:
        await w.store("OLD", [ALICE])  # queued in the spool, due now
        fresh = NewMessage(
            id="NEW",
            sender=SENDER,
            smtputf8=False,
            received=T0,
            expires=T0 + 3600,
            body=b"Hello.\r\n",
            copies=(NewCopy(BOB, headers(BOB, SENDER), CopyState.DELIVERING, next_try=T0),),
        )
        ids = await w.spool.store(fresh)
        assert w.deliverer.hand_over(fresh, ids, [parse_address(BOB, smtputf8=False)])
        assert await w.run_at(T0) == 1
        assert [s.rcpt for s in w.upstream.sent] == [ALICE]
        assert await w.run_at(T0 + 1) == 1
        assert [s.rcpt for s in w.upstream.sent] == [ALICE, BOB]


class FailingOnce(Spool):
    """Recording a failure fails; putting the copy back fails once, then works."""

    releases = 0

    async def record(self, copy_id: int, state: CopyState, **kwargs: Any) -> bool:
        if state is not CopyState.DELIVERED:
            raise SpoolError("database is locked")
        return await super().record(copy_id, state, **kwargs)

    async def release(self, copy_ids: Sequence[int], now: float) -> None:
        self.releases += 1
        if self.releases == 1:
            raise SpoolError("database is locked")
        await super().release(copy_ids, now)


async def test_a_copy_whose_way_back_to_the_queue_failed_is_put_back_later(
    tmp_path: Path,
) -> None:
    """Not sent, not recorded, release failed: the delivery loop puts it back, no restart.

    (Found in review; before, the copy stayed ``delivering`` until the next start.)
    """
    transient = Outcome(Status.TRANSIENT, Stage.RCPT, 451, "4.2.0", "try later")
    spool = FailingOnce(tmp_path)
    with world(tmp_path, script={ALICE: [transient]}, spool=spool) as w:
        await w.store("M1", [ALICE])
        runner = asyncio.create_task(w.deliverer.run())
        async with asyncio.timeout(10):
            while len(w.upstream.sent) < 2 or w.row(ALICE) is not None:
                await asyncio.sleep(0.02)
        # Back in the queue on the loop's next turn, then sent again (and delivered).
        assert spool.releases == 2
        assert [s.rcpt for s in w.upstream.sent] == [ALICE, ALICE]
        assert spool.releases == 2
        await w.deliverer.drain(1)
        await runner


async def test_a_refusal_whose_record_fails_is_not_sent_again_at_once(tmp_path: Path) -> None:
    """A 550 whose failed-and-DSN record cannot be written goes back to the queue not due
    before the first retry delay: not resent in a loop to the upstream that refused it."""
    with world(tmp_path, script={ALICE: [PERMANENT, PERMANENT, PERMANENT]}) as w:
        await w.store("m1", [ALICE])
        real = w.spool.record
        fails = [SpoolFull("database or disk is full")] * 2

        async def record(*args: Any, **kwargs: Any) -> bool:
            if fails:
                raise fails.pop()
            return await real(*args, **kwargs)

        w.spool.record = record  # type: ignore[method-assign]
        for _ in range(3):
            await w.run_at(T0)  # the clock does not move
        assert len(w.upstream.to(ALICE)) == 1
        row = w.row(ALICE)
        assert row is not None and row[0] == "queued" and row[2] >= T0 + 60
