"""The spool's reserve (relay/custody/reserve.py): on a full disk the outcome of a copy the
upstream has answered is still written, so nothing is sent twice after a restart.

Each test fills a small tmpfs to 100 % at the moment an outcome must be written;
with ``spool.reserve_bytes`` at 0 (no reserve) each of them fails as the relay did
before the reserve: the write fails and the copy is sent again at the next start.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from relay.custody.spool import Spool, SpoolFull
from tests.faults.harness import RECIPIENTS, RestartableUpstream, fill, free, send, tmpfs
from tests.relay_harness import until
from tests.test_crash import RelayProcess, live, relay_env, relays, start_relay
from tests.test_spool import DELIVERED, T0, new_message, states
from tests.upstream_server import Delay

__all__ = ["relays"]  # the fixture, shared with tests/test_crash.py

RESERVE = 1 << 20


async def test_an_outcome_on_a_full_disk_uses_the_reserve_and_new_mail_does_not(
    tmp_path: Path,
) -> None:
    """Full disk: a new message fails (SpoolFull) and leaves the reserve; the delivered
    records then give it up and land; with space back, the reserve is made again."""
    with tmpfs(tmp_path / "fs") as fs:
        directory = fs / "spool"
        spool = Spool(directory, reserve_bytes=RESERVE)
        spool.open()
        try:
            reserve = directory / "reserve"
            assert reserve.stat().st_size == RESERVE
            assert reserve.stat().st_blocks * 512 >= RESERVE  # allocated, not sparse
            await spool.store(new_message("M1"))
            jobs = await spool.claim_due(T0, 10)
            filler = fill(fs)
            with pytest.raises(SpoolFull):
                await spool.store(new_message("M2", body=b"x" * 200_000))
            assert spool.reserve.held, "new mail must never use the reserve"
            found = await asyncio.gather(
                *(
                    spool.record_delivered(j.copy_id, now=T0, attempts=1, outcome=DELIVERED)
                    for j in jobs
                )
            )
            assert found == [True, True]
            assert not reserve.exists() and spool.reserve.released == 1
            assert states(directory) == {}  # both delivered: the message is gone
            free(filler)
            async with asyncio.timeout(10):  # the idle writer's maintenance makes it again
                while not spool.reserve.held:
                    await asyncio.sleep(0.1)
        finally:
            spool.close()


async def test_direct_mode_on_a_full_disk_never_sends_an_accepted_copy_again(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """Direct mode, the disk full while the upstream holds the dot: the client gets 250,
    the discard lands in the reserve, SIGTERM exits 0, and the next start sends nothing."""
    with tmpfs(tmp_path / "fs") as fs:
        spool = fs / "spool"
        async with RestartableUpstream() as upstream:
            upstream.script("DOT", [Delay(1.5, 250)] * len(RECIPIENTS))
            env = relay_env(
                spool,
                upstream.port,
                RELAY_MODE="direct",
                RELAY_SPOOL_RESERVE_BYTES=str(RESERVE),
            )
            first = await start_relay(relays, tmp_path, "first", env)
            reply = asyncio.ensure_future(send(first.smtp_port, "direct-full@example.org"))
            await until(lambda: len(upstream.transactions) >= 1, "a copy at the upstream")
            filler = fill(fs)
            assert (await reply).startswith("250 2.0.0"), await reply
            first.process.send_signal(signal.SIGTERM)
            assert await first.exit_code() == 0, first.log.read_text()
            free(filler)
            second = await start_relay(relays, tmp_path, "second", env)
            await until(
                lambda: len(upstream.counts()) == len(RECIPIENTS) and live(spool) == 0,
                "the copy put back sent, and nothing left to send",
            )
            second.process.send_signal(signal.SIGTERM)
            assert await second.exit_code() == 0
            counts = upstream.counts()
            assert len(counts) == len(RECIPIENTS) and set(counts.values()) == {1}, counts
            assert live(spool) == 0


async def test_sigterm_on_a_full_disk_records_what_was_delivered_and_sends_it_once(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """Queue mode, the disk full with copies at the upstream, then SIGTERM: the delivered
    records land in the reserve (exit 0), and the next start sends no copy again."""
    with tmpfs(tmp_path / "fs") as fs:
        spool = fs / "spool"
        async with RestartableUpstream() as upstream:
            upstream.script("DOT", [Delay(1.0, 250)] * 4)
            env = relay_env(spool, upstream.port, RELAY_SPOOL_RESERVE_BYTES=str(RESERVE))
            relay = await start_relay(relays, tmp_path, "first", env)
            names = ["once-0@example.org", "once-1@example.org"]
            for name in names:
                assert (await send(relay.smtp_port, name)).startswith("250 2.0.0")
            await until(lambda: upstream.transactions, "a copy at the upstream")
            filler = fill(fs)
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.exit_code() == 0, relay.log.read_text()
            assert "Traceback" not in relay.log.read_text()
            free(filler)
            second = await start_relay(relays, tmp_path, "second", env)
            expected = {(name, rcpt) for name in names for rcpt in RECIPIENTS}
            await until(lambda: set(upstream.counts()) >= expected, "every copy")
            await until(lambda: live(spool) == 0, "an empty spool")
            second.process.send_signal(signal.SIGTERM)
            assert await second.exit_code() == 0
            counts = upstream.counts()
            assert set(counts) == expected and set(counts.values()) == {1}, counts
