"""Process, upstream and spool-file faults against real ``solo-relay serve`` processes.

SIGKILL at random moments under load (a bounded loop), the upstream killed
and started again under load, a second relay on the same spool, and a spool
whose files were truncated, emptied, overwritten or lost a body file. The
recording upstream counts every Message-ID x recipient: each acknowledged
copy arrives; a copy arrives twice only when a relay died (or the upstream
went away) with that copy at the upstream, and those are counted and bounded.

``FAULT_ROUNDS`` makes the loops longer (the quick default keeps the
suite to a few seconds each).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.faults.harness import (
    RECIPIENTS,
    Load,
    RestartableUpstream,
    check_repeats,
    quarantined,
    run_to_exit,
    send,
)
from tests.relay_harness import until
from tests.test_crash import (
    RelayProcess,
    live,
    relay_env,
    relays,
    spool_copies,
    start_relay,
)

__all__ = ["relays"]  # the fixture, shared with tests/test_crash.py

ROUNDS = int(os.environ.get("FAULT_ROUNDS", "3"))
LONG_WAIT = 60.0


async def test_sigkill_at_random_moments_under_load_loses_no_acknowledged_copy(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """Load, SIGKILL at a random moment, restart; ROUNDS times: every 250ed copy arrives."""
    rng = random.Random(int(os.environ.get("FAULT_SEED", "13")))
    spool = tmp_path / "spool"
    async with RestartableUpstream() as upstream:
        env = relay_env(spool, upstream.port)
        load = Load()
        stop = asyncio.Event()
        runner = asyncio.create_task(load.run(stop))
        marks: list[int] = []
        try:
            for n in range(ROUNDS):
                relay = await start_relay(relays, tmp_path, f"relay-{n}", env)
                load.port = relay.smtp_port
                acknowledged = len(load.acknowledged)
                await until(lambda a=acknowledged: len(load.acknowledged) > a, "mail taken")
                await asyncio.sleep(rng.uniform(0.0, 0.4))  # the random moment
                relay.process.kill()
                assert await relay.exit_code() == -signal.SIGKILL
                # The mark is taken once the upstream has read all the dead relay sent:
                # a DATA still in the upstream's socket would otherwise be recorded
                # after the mark although the relay sent it (and never saw the 250)
                # before the kill.
                await until(lambda: upstream.open_connections() == 0, "the upstream read to EOF")
                marks.append(len(upstream.transactions))
                load.port = 0
        finally:
            stop.set()
            await runner
        last = await start_relay(relays, tmp_path, "last", env)
        await until(lambda: live(spool) == 0, "an empty spool", timeout=LONG_WAIT)
        last.process.send_signal(signal.SIGTERM)
        assert await last.exit_code() == 0, last.log.read_text()
    counts = upstream.counts()
    missing = load.acknowledged - set(counts)
    assert not missing, sorted(missing)[:5]
    repeats = check_repeats(upstream, marks)
    assert quarantined(spool) == []
    print(f"sent {load.sent} acknowledged {len(load.acknowledged)} copies; {repeats} repeats")


async def test_upstream_killed_and_restarted_under_load_loses_nothing(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """The upstream goes away and comes back ROUNDS times under load: every copy arrives."""
    spool = tmp_path / "spool"
    async with RestartableUpstream() as upstream:
        env = relay_env(spool, upstream.port, RELAY_DELIVERY_RETRY_INITIAL="0.1")
        relay = await start_relay(relays, tmp_path, "relay", env)
        load = Load(port=relay.smtp_port)
        stop = asyncio.Event()
        runner = asyncio.create_task(load.run(stop))
        marks: list[int] = []
        try:
            for _ in range(ROUNDS):
                received = len(upstream.transactions)
                await until(lambda r=received: len(upstream.transactions) > r, "copies arriving")
                await upstream.stop()
                marks.append(len(upstream.transactions))
                await asyncio.sleep(0.3)  # down for a while: copies are deferred
                await upstream.start()
        finally:
            stop.set()
            await runner
        await until(
            lambda: load.acknowledged <= set(upstream.counts()) and live(spool) == 0,
            "every copy",
            timeout=LONG_WAIT,
        )
        relay.process.send_signal(signal.SIGTERM)
        assert await relay.exit_code() == 0, relay.log.read_text()
    # A copy the upstream took just as it went away (no reply seen) is sent again.
    repeats = check_repeats(upstream, marks)
    print(f"acknowledged {len(load.acknowledged)} copies; {repeats} repeats, {len(marks)} drops")


async def test_a_second_relay_on_the_same_spool_is_refused_in_one_line(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """Same spool.dir: the second exits 1 with one line naming the first's pid, no traceback."""
    spool = tmp_path / "spool"
    async with RestartableUpstream() as upstream:
        env = relay_env(spool, upstream.port)
        first = await start_relay(relays, tmp_path, "first", env)
        second = run_to_exit(env, tmp_path)
        assert second.returncode == 1, second.stderr
        assert "Traceback" not in second.stderr, second.stderr
        (line,) = [line for line in second.stderr.splitlines() if "cannot start" in line]
        assert f"process {first.process.pid}" in line, line
        assert (await send(first.smtp_port, "still@example.org")).startswith("250")
        await until(lambda: live(spool) == 0, "the first relay still delivering")
        first.process.send_signal(signal.SIGTERM)
        assert await first.exit_code() == 0


async def test_a_supervisor_on_a_spool_another_relay_holds_is_refused_in_one_line(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    """workers = 2 on a spool a relay holds: exit 1, one line naming it (no restart loop)."""
    spool = tmp_path / "spool"
    async with RestartableUpstream() as upstream:
        env = relay_env(spool, upstream.port)
        first = await start_relay(relays, tmp_path, "first", env)
        second = run_to_exit({**env, "RELAY_WORKERS": "2"}, tmp_path)
        assert second.returncode == 1, second.stderr
        assert "Traceback" not in second.stderr, second.stderr
        (line,) = [line for line in second.stderr.splitlines() if "cannot start" in line]
        assert f"process {first.process.pid}" in line, line
        first.process.send_signal(signal.SIGTERM)
        assert await first.exit_code() == 0


def _damage(spool: Path, how: str) -> None:
    db = spool / "spool.db"
    if how == "truncated":
        with db.open("r+b") as file:
            file.truncate(db.stat().st_size // 2)
    elif how == "emptied":
        db.write_bytes(b"")
    elif how == "pages-overwritten":
        with db.open("r+b") as file:
            file.seek(16384)
            file.write(random.Random(5).randbytes(3 * 16384))
    elif how == "body-removed":
        (body,) = (spool / "bodies").iterdir()
        body.unlink()
    elif how == "body-damaged":
        (body,) = (spool / "bodies").iterdir()
        with body.open("r+b") as file:
            file.seek(100)
            file.write(b"damaged")


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "emptied",
        "pages-overwritten",
        "body-removed",
        "body-damaged",
    ],
)
async def test_a_damaged_spool_is_quarantined_and_the_relay_goes_on(
    tmp_path: Path, relays: list[RelayProcess], how: str
) -> None:
    """Damaged spool files: the relay starts, sets aside what is damaged, takes new mail."""
    spool = tmp_path / "spool"
    async with RestartableUpstream() as upstream:
        port = upstream.port
        await upstream.stop()  # nothing delivered: the spool holds the mail when it is damaged
        env = relay_env(spool, port)
        first = await start_relay(relays, tmp_path, "first", env)
        for n in range(8):
            assert (await send(first.smtp_port, f"kept-{n}@example.org")).startswith("250")
        assert (await send(first.smtp_port, "large@example.org", size=100_000)).startswith("250")
        wal = Path(f"{spool / 'spool.db'}-wal")
        first.process.send_signal(signal.SIGTERM)
        assert await first.exit_code() == 0
        with sqlite3.connect(spool / "spool.db") as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _damage(spool, how)
        damaged = (spool / "spool.db").read_bytes()
        damaged_wal = wal.read_bytes() if wal.exists() else b""
        bodies = {p.name: p.read_bytes() for p in (spool / "bodies").iterdir()}

        await upstream.start()
        second = await start_relay(relays, tmp_path, "second", env)
        text = second.log.read_text()
        assert "Traceback" not in text, text
        assert "quarantined" in text, text
        if how.startswith("body"):  # that record, in the quarantine table
            assert spool_copies(spool)["quarantine"] == 1
        else:  # the whole database, as it was found, and its body files (never swept)
            (aside,) = (spool / "quarantine").glob("spool-*.db")
            assert aside.read_bytes() == damaged
            aside_wal = Path(f"{aside}-wal")
            assert (aside_wal.read_bytes() if aside_wal.exists() else b"") == damaged_wal
            kept = Path(f"{aside}.bodies")
            assert {p.name: p.read_bytes() for p in kept.iterdir()} == bodies
        assert (await send(second.smtp_port, "new@example.org")).startswith("250 2.0.0")
        await until(lambda: live(spool) == 0, "everything kept delivered", timeout=LONG_WAIT)
        assert any(name == "new@example.org" for name, _ in upstream.counts())
        second.process.send_signal(signal.SIGTERM)
        assert await second.exit_code() == 0, second.log.read_text()
    if how.startswith("body"):  # only that message is set aside: the others are delivered
        names = {name for name, _ in upstream.counts()}
        assert {f"kept-{n}@example.org" for n in range(8)} <= names
        assert "large@example.org" not in names
    assert all(rcpt in RECIPIENTS for _, rcpt in upstream.counts())
