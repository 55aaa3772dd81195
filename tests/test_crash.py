"""Process faults (SPEC 1, 5 and 9): SIGKILL at named points, SIGTERM mid-delivery.

The relay runs as a subprocess on a spool directory of its own; the upstream
is a recording ``UpstreamServer`` in the test's event loop. A first relay is
killed at a point (``tests/crash_launcher.py`` patches it to SIGKILL itself
there), a second one is started normally on the same spool, and the upstream's
transactions say what was delivered: everything acknowledged with ``250``
arrives, and nothing arrives twice except the copy that was at the upstream
when the process died (the one at-least-once window SPEC 5 allows).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.relay_harness import WAIT_TIMEOUT, submit, until
from tests.upstream_server import Delay, UpstreamServer

LAUNCHER = Path(__file__).with_name("crash_launcher.py")
SENDER = "app@example.org"
RECIPIENTS = ("alice@example.com", "bob@example.net")
MESSAGE = (
    b"From: App <app@example.org>\r\n"
    b"To: alice@example.com, bob@example.net\r\n"
    b"Subject: custody across a crash\r\n"
    b"\r\n" + b"A line of the body, long enough to be sent in two parts.\r\n" * 20
)
LIVE_STATES = ("queued", "delivering", "deferred")
START_TIMEOUT = 15.0  # seconds for a relay process to log "listening"
SETTLE = 1.0  # when nothing may be delivered: the time a wrong delivery gets to show up


@dataclass
class RelayProcess:
    process: subprocess.Popen[bytes]
    log: Path
    smtp_port: int

    async def exit_code(self, timeout: float = WAIT_TIMEOUT) -> int:
        """The exit status once the process ends (negative: its signal); fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            assert time.monotonic() < deadline, f"still running:\n{self.log.read_text()}"
            await asyncio.sleep(0.02)
        return code


@pytest.fixture
def relays() -> Iterator[list[RelayProcess]]:
    """Every relay process a test starts; any still running at the end is killed."""
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        if relay.process.poll() is None:
            relay.process.kill()
        relay.process.wait(timeout=10)


def relay_env(spool: Path, upstream_port: int, **extra: str) -> dict[str, str]:
    """``python -m relay serve``'s environment: queue mode, free ports, quick retries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        {
            "RELAY_LISTEN": "127.0.0.1:0",
            "RELAY_METRICS_LISTEN": "127.0.0.1:0",
            "RELAY_SPOOL_DIR": str(spool),
            "RELAY_UPSTREAM": f"smtp+plain://127.0.0.1:{upstream_port}",
            "RELAY_MODE": "queue",
            "RELAY_SMTP_HOSTNAME": "relay.example.test",
            "RELAY_SPOOL_MIN_FREE_BYTES": "0",
            "RELAY_DELIVERY_RETRY_INITIAL": "0.2",
            "RELAY_DELIVERY_RETRY_MAX": "1",
            "RELAY_DELIVERY_DRAIN_GRACE": "5",
            "RELAY_LOG_FORMAT": "json",
            **extra,
        }
    )
    return env


async def start_relay(
    relays: list[RelayProcess],
    workdir: Path,
    name: str,
    env: dict[str, str],
    crash_at: str | None = None,
) -> RelayProcess:
    """Start ``serve`` (or the crash launcher) and wait for its "listening" line."""
    if crash_at is None:
        argv = [sys.executable, "-m", "relay", "serve"]
    else:
        argv = [sys.executable, str(LAUNCHER), crash_at]
    log = workdir / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=workdir, env=env, stdout=sink, stderr=sink)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "listening":
                    relay = RelayProcess(process, log, int(event["smtp"].rsplit(":", 1)[1]))
                    relays.append(relay)
                    return relay
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(timeout=10)
            pytest.fail(f"{name} relay did not start:\n{log.read_text(errors='replace')}")
        await asyncio.sleep(0.02)


def spool_copies(spool: Path) -> dict[str, int]:
    """Copies in the spool database by state, plus its ``messages`` and ``quarantine`` rows."""
    conn = sqlite3.connect(spool / "spool.db", timeout=10)
    try:
        counts = dict(conn.execute("SELECT state, COUNT(*) FROM copies GROUP BY state").fetchall())
        counts["messages"] = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        counts["quarantine"] = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        return counts
    finally:
        conn.close()


def queue_stats(env: dict[str, str]) -> dict[str, int]:
    """``solo-relay queue stats`` on the relay's spool: its counted lines, by name."""
    result = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "stats"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    counts = {}
    for line in result.stdout.splitlines():
        name, _, value = line.rpartition(" ")
        if value.isdigit():
            counts[name.strip()] = int(value)
    return counts


EMPTY_STATS = {
    "queued": 0,
    "delivering": 0,
    "deferred": 0,
    "delivered": 0,
    "failed": 0,
    "messages": 0,
    "quarantined": 0,
}


def live(spool: Path) -> int:
    counts = spool_copies(spool)
    return sum(counts.get(state, 0) for state in LIVE_STATES)


def delivered(upstream: UpstreamServer) -> set[str]:
    return {rcpt for t in upstream.transactions for rcpt in t.rcpt_tos}


@dataclass(frozen=True)
class Point:
    name: str
    acknowledged: bool  # the client saw 250
    delivered: bool  # the copies reach the upstream after the restart
    may_resend: bool  # a copy was at the upstream when the process died

    def __str__(self) -> str:
        return self.name


POINTS = (
    Point("during-data", acknowledged=False, delivered=False, may_resend=False),
    # Stored but never answered: SPEC allows delivering it (the client will likely
    # send it again); the spool write was durable, so the restart delivers it once.
    Point("after-spool-write", acknowledged=False, delivered=True, may_resend=False),
    Point("after-250", acknowledged=True, delivered=True, may_resend=False),
    Point("during-upstream", acknowledged=True, delivered=True, may_resend=True),
    Point("after-upstream-250", acknowledged=True, delivered=True, may_resend=True),
)


@pytest.mark.parametrize("point", POINTS, ids=str)
async def test_sigkill_then_restart_delivers_each_acknowledged_copy(
    tmp_path: Path, point: Point, relays: list[RelayProcess]
) -> None:
    """SIGKILL at each point, then restart: every 250ed copy arrives; only ones in flight repeat."""
    spool = tmp_path / "spool"
    async with UpstreamServer() as upstream:
        env = relay_env(spool, upstream.port)
        if point.name == "during-upstream":
            # The upstream has the whole copy but holds its reply; the test kills the relay.
            upstream.script("DOT", [Delay(10.0, 250) for _ in RECIPIENTS])
            first = await start_relay(relays, tmp_path, "first", env)
        else:
            first = await start_relay(relays, tmp_path, "first", env, crash_at=point.name)
        pause = 0.3 if point.name == "during-data" else 0.0
        reply = await submit(first.smtp_port, MESSAGE, RECIPIENTS, sender=SENDER, pause=pause)
        if point.name == "during-upstream":
            await until(lambda: upstream.transactions, "the upstream to receive a copy")
            first.process.kill()
        assert await first.exit_code() == -signal.SIGKILL, first.log.read_text()
        while upstream.next_reply("DOT") is not None:
            pass  # the restarted relay gets prompt replies
        assert reply.startswith("250 2.0.0 OK: queued as ") is point.acknowledged, reply
        in_flight = delivered(upstream)  # the copies the upstream had when the relay died

        second = await start_relay(relays, tmp_path, "second", env)
        expected = set(RECIPIENTS) if point.delivered else set()
        await until(
            lambda: delivered(upstream) >= expected and live(spool) == 0,
            f"delivery of {sorted(expected)} and an empty spool",
        )
        if not expected:
            await asyncio.sleep(SETTLE)
        second.process.send_signal(signal.SIGTERM)
        assert await second.exit_code() == 0, second.log.read_text()

    assert all(len(t.rcpt_tos) == 1 for t in upstream.transactions)
    counts = Counter(t.rcpt_tos[0] for t in upstream.transactions)
    assert set(counts) == expected
    resent = {rcpt for rcpt, n in counts.items() if n > 1}
    if point.may_resend:
        assert resent <= in_flight and max(counts.values()) <= 2, counts
    else:
        assert not resent, counts
    for t in upstream.transactions:
        (rcpt,) = t.rcpt_tos
        header = t.content.split(b"\r\n\r\n", 1)[0]
        assert f"for <{rcpt}>".encode() in header
        assert not any(other.encode() in header for other in RECIPIENTS if other != rcpt)
        # A resent copy is the stored copy again, byte for byte (same queue id and date).
        assert all(u.content == t.content for u in upstream.transactions if u.rcpt_tos == [rcpt])
    assert spool_copies(spool) == {"messages": 0, "quarantine": 0}
    assert queue_stats(env) == EMPTY_STATS


async def test_sigterm_mid_delivery_exits_promptly_and_keeps_the_copy(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """SIGTERM while the upstream holds the dot reply: exit 0 in the grace, copy queued, resent."""
    spool = tmp_path / "spool"
    rcpt = RECIPIENTS[0]
    async with UpstreamServer() as upstream:
        upstream.script("DOT", [Delay(1.5, 250)])
        env = relay_env(spool, upstream.port, RELAY_DELIVERY_DRAIN_GRACE="0.2")
        first = await start_relay(relays, tmp_path, "first", env)
        assert (await submit(first.smtp_port, MESSAGE, (rcpt,), sender=SENDER)).startswith(
            "250 2.0.0"
        )
        await until(lambda: upstream.transactions, "the upstream to receive the copy")
        stopping = time.monotonic()
        first.process.send_signal(signal.SIGTERM)
        assert await first.exit_code() == 0, first.log.read_text()
        assert time.monotonic() - stopping < 1.2, "the drain grace (0.2 s) did not cut delivery"
        # Cut by the grace, the copy is put back in the queue (not left "delivering").
        assert spool_copies(spool) == {"queued": 1, "messages": 1, "quarantine": 0}
        sent_before = len(upstream.transactions)

        second = await start_relay(relays, tmp_path, "second", env)
        await until(
            lambda: len(upstream.transactions) > sent_before and live(spool) == 0,
            "the kept copy to be delivered",
        )
        second.process.send_signal(signal.SIGTERM)
        assert await second.exit_code() == 0, second.log.read_text()

    assert [t.rcpt_tos for t in upstream.transactions[sent_before:]] == [[rcpt]]
    assert spool_copies(spool) == {"messages": 0, "quarantine": 0}
    assert queue_stats(env) == EMPTY_STATS
