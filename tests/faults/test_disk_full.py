"""A full disk at every phase (issue 13, sections 1 and 3): never corruption, never a loss.

Each test runs real ``solo-relay serve`` processes on a spool in a tmpfs of a
few megabytes, fills it to 100 % at one phase, frees it, and checks with the
recording upstream that every acknowledged copy (Message-ID x recipient)
arrives, and that nothing was quarantined.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.faults.harness import (
    RECIPIENTS,
    RestartableUpstream,
    fill,
    free,
    quarantined,
    run_to_exit,
    send,
    tmpfs,
)
from tests.relay_harness import until
from tests.test_crash import RelayProcess, live, relay_env, relays, start_relay
from tests.upstream_server import Delay

__all__ = ["relays"]  # the fixture, shared with tests/test_crash.py


def expected(names: list[str]) -> set[tuple[str, str]]:
    return {(name, rcpt) for name in names for rcpt in RECIPIENTS}


async def test_restart_on_a_full_disk_stays_down_in_one_line_then_delivers_everything(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """Copies left delivering, disk full at start: exit 1, one line, no quarantine; then sent."""
    with tmpfs(tmp_path / "fs") as fs:
        spool = fs / "spool"
        async with RestartableUpstream() as upstream:
            upstream.script("DOT", [Delay(30.0, 250)] * 4)  # held: the copies stay delivering
            env = relay_env(spool, upstream.port)
            first = await start_relay(relays, tmp_path, "first", env)
            names = [f"restart-{n}@example.org" for n in range(2)]
            for name in names:
                assert (await send(first.smtp_port, name)).startswith("250 2.0.0")
            await until(lambda: len(upstream.transactions) >= 1, "a copy at the upstream")
            first.process.kill()
            assert await first.exit_code() == -signal.SIGKILL
            await upstream.stop()
            upstream._scripts.clear()
            upstream.transactions.clear()
            await upstream.start()

            filler = fill(fs)
            refused = run_to_exit(env, tmp_path)
            assert refused.returncode == 1, refused.stderr
            assert "Traceback" not in refused.stderr, refused.stderr
            lines = [line for line in refused.stderr.splitlines() if "cannot start" in line]
            assert len(lines) == 1 and "full" in lines[0], refused.stderr
            assert quarantined(spool) == []

            free(filler)
            second = await start_relay(relays, tmp_path, "second", env)
            await until(lambda: set(upstream.counts()) >= expected(names), "every copy")
            await until(lambda: live(spool) == 0, "an empty spool")
            second.process.send_signal(signal.SIGTERM)
            assert await second.exit_code() == 0, second.log.read_text()
            assert quarantined(spool) == []


async def test_first_start_on_a_full_disk_stays_down_in_one_line(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """A new spool on a full disk: exit 1 with one line and no traceback; then it starts."""
    with tmpfs(tmp_path / "fs") as fs:
        spool = fs / "spool"
        env = relay_env(spool, 9)
        filler = fill(fs)
        # With nothing at all in spool.dir, the log hash key cannot be made (exit 2).
        refused = run_to_exit(env, tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.count("\n") == 1 and "No space left" in refused.stderr
        free(filler)
        first = await start_relay(relays, tmp_path, "first", env)  # makes the key
        first.process.send_signal(signal.SIGTERM)
        assert await first.exit_code() == 0
        for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
            (spool / name).unlink(missing_ok=True)
        filler = fill(fs)
        refused = run_to_exit(env, tmp_path)  # the key is there: the new database is not
        assert refused.returncode == 1, refused.stderr
        assert "Traceback" not in refused.stderr, refused.stderr
        (line,) = [x for x in refused.stderr.splitlines() if "cannot start" in x]
        assert "full" in line, line
        free(filler)
        second = await start_relay(relays, tmp_path, "second", env)
        second.process.send_signal(signal.SIGTERM)
        assert await second.exit_code() == 0


async def test_mail_on_a_full_disk_gets_4xx_never_a_lost_250(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """Disk full while accepting: 452 4.3.1, or a 250 that is kept; after space, all sent."""
    with tmpfs(tmp_path / "fs") as fs:
        spool = fs / "spool"
        async with RestartableUpstream() as upstream:
            env = relay_env(spool, upstream.port)
            relay = await start_relay(relays, tmp_path, "relay", env)
            filler = fill(fs)
            acknowledged = []
            replies = []
            for n in range(6):
                name = f"full-{n}@example.org"
                reply = await send(relay.smtp_port, name, size=200_000)
                replies.append(reply[:3])
                # SPEC 8: a full spool is 452 4.3.1 (a failing one 451 4.3.0).
                assert reply.startswith(("452 4.3.1", "250 2.0.0")), reply
                if reply.startswith("250"):
                    acknowledged.append(name)
            assert any(r.startswith("4") for r in replies), replies
            free(filler)
            name = "after@example.org"
            assert (await send(relay.smtp_port, name)).startswith("250 2.0.0")
            acknowledged.append(name)
            await until(lambda: set(upstream.counts()) >= expected(acknowledged), "every copy")
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.exit_code() == 0, relay.log.read_text()
            assert "Traceback" not in relay.log.read_text()
            assert quarantined(spool) == []
            assert max(upstream.counts().values()) == 1


async def test_delivering_on_a_full_disk_sends_each_copy_once_and_records_it_later(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """Disk full as the upstream answers 250: the records fail and are retried; no resend."""
    with tmpfs(tmp_path / "fs") as fs:
        spool = fs / "spool"
        async with RestartableUpstream() as upstream:
            upstream.script("DOT", [Delay(0.5, 250)] * 8)  # the copies wait at the upstream
            env = relay_env(spool, upstream.port)
            relay = await start_relay(relays, tmp_path, "relay", env)
            names = [f"deliver-{n}@example.org" for n in range(4)]
            for name in names:
                assert (await send(relay.smtp_port, name)).startswith("250 2.0.0")
            await until(lambda: upstream.transactions, "copies at the upstream")
            filler = fill(fs)  # before their 250s arrive: the delivered records cannot be written
            await until(
                lambda: "recording a delivery failed" in relay.log.read_text(),
                "a delivered record to fail",
            )
            await until(lambda: set(upstream.counts()) >= expected(names), "every copy sent")
            free(filler, room=512 * 1024)  # space comes back only partly
            await until(lambda: live(spool) == 0, "every copy recorded")
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.exit_code() == 0, relay.log.read_text()
            assert max(upstream.counts().values()) == 1, upstream.counts()
            assert quarantined(spool) == []


async def test_claims_on_a_full_disk_wait_for_space_then_everything_is_sent_once(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """Copies due while the disk is full cannot be claimed: they wait, then go, once each."""
    with tmpfs(tmp_path / "fs") as fs:
        spool = fs / "spool"
        async with RestartableUpstream() as upstream:
            port = upstream.port
            await upstream.stop()  # down: the copies are deferred
            env = relay_env(spool, port, RELAY_DELIVERY_RETRY_INITIAL="0.1")
            relay = await start_relay(relays, tmp_path, "relay", env)
            names = [f"claim-{n}@example.org" for n in range(3)]
            for name in names:
                assert (await send(relay.smtp_port, name)).startswith("250 2.0.0")
            await until(lambda: "copy deferred" in relay.log.read_text(), "a deferral")
            filler = fill(fs)
            await upstream.start()
            # A claim is a write: refused by the full disk (unless the WAL had room to reuse).
            await until(
                lambda: (
                    "delivery loop: spool unavailable" in relay.log.read_text()
                    or upstream.transactions
                ),
                "a claim refused by the full disk",
            )
            free(filler)
            await until(lambda: set(upstream.counts()) >= expected(names), "every copy")
            await until(lambda: live(spool) == 0, "every copy recorded")
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.exit_code() == 0, relay.log.read_text()
            assert "Traceback" not in relay.log.read_text()
            assert max(upstream.counts().values()) == 1, upstream.counts()
            assert quarantined(spool) == []


async def test_sigterm_on_a_full_disk_exits_0_and_loses_nothing(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """SIGTERM with copies in flight and the disk full: exit 0, no traceback; all sent later."""
    with tmpfs(tmp_path / "fs") as fs:
        spool = fs / "spool"
        async with RestartableUpstream() as upstream:
            upstream.script("DOT", [Delay(1.0, 250)] * 2)
            env = relay_env(spool, upstream.port, RELAY_DELIVERY_DRAIN_GRACE="0.2")
            relay = await start_relay(relays, tmp_path, "first", env)
            names = ["stop-0@example.org", "stop-1@example.org"]
            for name in names:
                assert (await send(relay.smtp_port, name)).startswith("250 2.0.0")
            await until(lambda: upstream.transactions, "a copy at the upstream")
            filler = fill(fs)
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.exit_code() == 0, relay.log.read_text()
            assert "Traceback" not in relay.log.read_text()
            free(filler)
            second = await start_relay(relays, tmp_path, "second", env)
            await until(lambda: set(upstream.counts()) >= expected(names), "every copy")
            await until(lambda: live(spool) == 0, "an empty spool")
            second.process.send_signal(signal.SIGTERM)
            assert await second.exit_code() == 0, second.log.read_text()
            assert quarantined(spool) == []
