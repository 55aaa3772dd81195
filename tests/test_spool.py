"""The spool's custody (SPEC 1, 5): durable writes, claims, recovery and quarantine.

Every test uses a real SQLite spool in ``tmp_path``; corruption is made with a
second sqlite3 connection or by rewriting the file, as a disk or an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.cli import main as cli
from relay.config import load
from relay.core.model import Outcome, Stage, Status
from relay.custody import schema as schema_module
from relay.custody import spool as spool_module
from relay.custody import writer as writer_module
from relay.custody.spool import CopyState, NewCopy, NewMessage, Spool, SpoolError
from tests.relay_harness import running_relay

T0 = 1_700_000_000.0
SENDER = "news@example.org"
ALICE = "alice@example.com"
BOB = "bob@example.net"
DELIVERED = Outcome(Status.DELIVERED, Stage.DOT, 250, "2.0.0", "ok")
TRANSIENT = Outcome(Status.TRANSIENT, Stage.RCPT, 451, "4.2.0", "try later")


def copy_headers(rcpt: str) -> bytes:
    return f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: hello\r\n\r\n".encode()


def new_message(
    message_id: str = "M1",
    rcpts: tuple[str, ...] = (ALICE, BOB),
    *,
    body: bytes = b"Hello.\r\n",
    now: float = T0,
) -> NewMessage:
    return NewMessage(
        id=message_id,
        sender=SENDER,
        smtputf8=False,
        received=now,
        expires=now + 172_800,
        body=body,
        copies=tuple(NewCopy(r, copy_headers(r), next_try=now) for r in rcpts),
    )


@contextlib.contextmanager
def opened(directory: Path, *, max_bytes: int = 0) -> Iterator[Spool]:
    spool = Spool(directory, max_bytes=max_bytes)
    spool.open()
    try:
        yield spool
    finally:
        spool.close()


def states(directory: Path) -> dict[str, str]:
    """Recipient -> state, read by a second connection (as ``solo-relay queue`` does)."""
    with contextlib.closing(sqlite3.connect(directory / "spool.db")) as conn:
        return dict(conn.execute("SELECT rcpt, state FROM copies").fetchall())


def count(directory: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(directory / "spool.db")) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def tamper(directory: Path, sql: str, *params: object) -> None:
    """Change the stored bytes behind the spool's back (the spool is closed)."""
    with contextlib.closing(sqlite3.connect(directory / "spool.db")) as conn:
        conn.execute(sql, params)
        conn.commit()


async def test_store_then_claim_marks_copies_delivering(tmp_path: Path) -> None:
    """store then claim_due returns every copy once, marked delivering; a second claim is empty."""
    with opened(tmp_path) as spool:
        await spool.store(new_message())
        jobs = await spool.claim_due(T0, 10)
        assert sorted(job.rcpt for job in jobs) == [ALICE, BOB]
        assert {job.message_id for job in jobs} == {"M1"}
        assert all(job.sender == SENDER and job.attempts == 0 for job in jobs)
        assert {job.rcpt: job.headers for job in jobs}[BOB] == copy_headers(BOB)
        assert await spool.body("M1") == b"Hello.\r\n"
        assert states(tmp_path) == {ALICE: "delivering", BOB: "delivering"}
        assert await spool.claim_due(T0 + 3600, 10) == []


async def test_claim_respects_limit_and_due_time(tmp_path: Path) -> None:
    """claim_due takes at most ``limit`` copies, and none whose next_try is later than now."""
    with opened(tmp_path) as spool:
        await spool.store(new_message("M1", (ALICE,), now=T0))
        await spool.store(new_message("M2", (BOB,), now=T0 + 10))
        assert await spool.claim_due(T0 - 1, 10) == []
        assert [job.rcpt for job in await spool.claim_due(T0 + 10, 1)] == [ALICE]
        assert await spool.next_due() == T0 + 10
        assert [job.rcpt for job in await spool.claim_due(T0 + 10, 1)] == [BOB]
        assert await spool.next_due() is None


async def test_record_delivered_of_last_copy_removes_the_message(tmp_path: Path) -> None:
    """A message leaves the spool when its last copy is final; not before."""
    with opened(tmp_path) as spool:
        await spool.store(new_message())
        jobs = {job.rcpt: job for job in await spool.claim_due(T0, 10)}
        await spool.record(jobs[ALICE].copy_id, CopyState.DELIVERED, now=T0, outcome=DELIVERED)
        assert count(tmp_path, "messages") == 1
        assert states(tmp_path) == {ALICE: "delivered", BOB: "delivering"}
        await spool.record(jobs[BOB].copy_id, CopyState.DELIVERED, now=T0, outcome=DELIVERED)
        assert count(tmp_path, "messages") == 0
        assert count(tmp_path, "copies") == 0
        assert await spool.body("M1") is None
        assert spool.live == 0


async def test_claims_take_queued_and_deferred_copies_in_due_order(tmp_path: Path) -> None:
    """Across both states, the earliest due first (then the oldest id), up to the limit."""
    with opened(tmp_path) as spool:
        carol, dave = "carol@example.org", "dave@example.net"
        await spool.store(new_message("M1", (ALICE, BOB), now=T0))
        [alice, bob] = await spool.claim_due(T0, 10)
        await spool.record(alice.copy_id, CopyState.DEFERRED, now=T0, next_try=T0 + 5)
        await spool.record(bob.copy_id, CopyState.DEFERRED, now=T0, next_try=T0 + 20)
        await spool.store(new_message("M2", (carol,), now=T0 + 10))
        await spool.store(new_message("M3", (dave,), now=T0 + 10))
        assert await spool.next_due() == T0 + 5
        assert [j.rcpt for j in await spool.claim_due(T0 + 30, 3)] == [ALICE, carol, dave]
        assert [j.rcpt for j in await spool.claim_due(T0 + 30, 3)] == [BOB]
        assert await spool.next_due() is None


async def test_record_delivered_batches_copies_that_report_together(tmp_path: Path) -> None:
    """Copies delivered together are recorded together, each answered for itself."""
    with opened(tmp_path) as spool:
        rcpts = tuple(f"user{n}@example.com" for n in range(40))
        await spool.store(new_message("M1", rcpts[:20]))
        await spool.store(new_message("M2", rcpts[20:]))
        jobs = await spool.claim_due(T0, 100)
        assert len(jobs) == 40 and spool.live == 40
        await spool.record(jobs[0].copy_id, CopyState.FAILED, now=T0, outcome=TRANSIENT)
        found = await asyncio.gather(
            *(
                spool.record_delivered(job.copy_id, now=T0, attempts=1, outcome=DELIVERED)
                for job in jobs[1:]
            ),
            spool.record_delivered(999_999, now=T0, attempts=1, outcome=DELIVERED),
        )
        assert found == [True] * 39 + [False]  # the unknown copy: gone, nothing written
        # Every copy final: both messages left the spool, the failed copy with its message.
        assert count(tmp_path, "messages") == 0 and count(tmp_path, "copies") == 0
        assert spool.live == 0


async def test_a_failed_delivered_batch_does_not_fail_the_records_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivered record that failed (another writer held the lock too long) leaves the
    next records free: they are written once the spool can be, not failed for ever."""
    monkeypatch.setattr(schema_module, "BUSY_TIMEOUT_MS", 200)
    with opened(tmp_path) as spool:
        await spool.store(new_message("M1", (ALICE, BOB)))
        first, second = await spool.claim_due(T0, 10)
        other = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # as solo-relay queue delete or recover would
        with pytest.raises(SpoolError):
            await spool.record_delivered(first.copy_id, now=T0, attempts=1, outcome=DELIVERED)
        other.execute("ROLLBACK")
        other.close()
        for job in (first, second):
            assert await spool.record_delivered(job.copy_id, now=T0, attempts=1, outcome=DELIVERED)
        assert count(tmp_path, "copies") == 0


async def test_record_delivered_keeps_a_message_with_live_copies(tmp_path: Path) -> None:
    """A delivered copy is written as such; its message stays while another copy lives."""
    with opened(tmp_path) as spool:
        await spool.store(new_message())
        jobs = {job.rcpt: job for job in await spool.claim_due(T0, 10)}
        assert await spool.record_delivered(
            jobs[ALICE].copy_id, now=T0, attempts=3, outcome=DELIVERED
        )
        assert states(tmp_path) == {ALICE: "delivered", BOB: "delivering"}
        assert spool.live == 1
        with sqlite3.connect(tmp_path / "spool.db") as db:
            row = db.execute(
                "SELECT attempts, last_code, last_text FROM copies WHERE rcpt = ?", (ALICE,)
            ).fetchone()
        assert row == (3, 250, "ok")


async def test_record_deferred_keeps_attempts_and_next_try(tmp_path: Path) -> None:
    """A deferred copy is claimable again at its next_try, with its attempts and last reply."""
    with opened(tmp_path) as spool:
        await spool.store(new_message(rcpts=(ALICE,)))
        (job,) = await spool.claim_due(T0, 10)
        await spool.record(
            job.copy_id,
            CopyState.DEFERRED,
            now=T0,
            next_try=T0 + 60,
            attempts=1,
            outcome=TRANSIENT,
        )
        assert await spool.next_due() == T0 + 60
        assert await spool.claim_due(T0 + 59, 10) == []
        (again,) = await spool.claim_due(T0 + 60, 10)
        assert (again.copy_id, again.attempts) == (job.copy_id, 1)
        with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as conn:
            row = conn.execute("SELECT last_code, last_enhanced FROM copies").fetchone()
        assert row == (451, "4.2.0")


async def test_stats_counts_copies_by_state_and_oldest(tmp_path: Path) -> None:
    """stats counts copies by state and gives the received time of the oldest live message."""
    with opened(tmp_path) as spool:
        assert await spool.stats() == (dict.fromkeys(CopyState, 0), None)
        await spool.store(new_message("M1", (ALICE, BOB), now=T0))
        await spool.store(new_message("M2", ("carol@example.org",), now=T0 + 5))
        (first,) = await spool.claim_due(T0, 1)
        await spool.record(first.copy_id, CopyState.DEFERRED, now=T0, next_try=T0 + 60, attempts=1)
        assert len(await spool.claim_due(T0, 1)) == 1
        counts, oldest = await spool.stats()
        assert counts == {
            CopyState.QUEUED: 1,
            CopyState.DELIVERING: 1,
            CopyState.DEFERRED: 1,
            CopyState.DELIVERED: 0,
            CopyState.FAILED: 0,
        }
        assert oldest == T0
        assert spool.live == 3


async def test_release_puts_claimed_copies_back(tmp_path: Path) -> None:
    """release returns delivering copies to queued (claimable at once), and leaves final ones."""
    with opened(tmp_path) as spool:
        await spool.store(new_message())
        jobs = {job.rcpt: job for job in await spool.claim_due(T0, 10)}
        await spool.record(jobs[ALICE].copy_id, CopyState.DELIVERED, now=T0, outcome=DELIVERED)
        await spool.release([jobs[ALICE].copy_id, jobs[BOB].copy_id], T0 + 1)
        assert states(tmp_path) == {ALICE: "delivered", BOB: "queued"}
        assert [job.rcpt for job in await spool.claim_due(T0 + 1, 10)] == [BOB]


async def test_dsn_commits_with_the_failure(tmp_path: Path) -> None:
    """record(..., also_store=dsn) writes the failure and the notification in one commit."""
    with opened(tmp_path) as spool:
        await spool.store(new_message(rcpts=(BOB,)))
        (job,) = await spool.claim_due(T0, 10)
        dsn = NewMessage(
            id="D1",
            sender="",
            smtputf8=False,
            received=T0,
            expires=T0 + 100,
            body=b"report\r\n",
            copies=(NewCopy(SENDER, b"To: <news@example.org>\r\n\r\n", next_try=T0),),
            is_dsn=True,
        )
        commits = spool.commits
        await spool.record(job.copy_id, CopyState.FAILED, now=T0, attempts=1, also_store=dsn)
        assert spool.commits == commits + 1
        (report,) = await spool.claim_due(T0, 10)
        assert (report.message_id, report.sender, report.rcpt, report.is_dsn) == (
            "D1",
            "",
            SENDER,
            True,
        )
        assert count(tmp_path, "messages") == 1  # the original left with its last copy


async def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    """200 concurrent stores from the loop all become durable in far fewer commits than stores."""
    with opened(tmp_path) as spool:
        before = spool.commits
        await asyncio.gather(*(spool.store(new_message(f"M{i}", (ALICE,))) for i in range(200)))
        commits = spool.commits - before
        assert 1 <= commits <= 20, commits
        assert spool.live == 200
    with opened(tmp_path) as again:
        assert (await again.stats())[0][CopyState.QUEUED] == 200


async def test_bad_operation_fails_alone_in_its_batch(tmp_path: Path) -> None:
    """A duplicate message id fails with SpoolError alone; the writes sharing its commit land."""
    with opened(tmp_path) as spool:
        results = await asyncio.gather(
            spool.store(new_message("M1", (ALICE,))),
            spool.store(new_message("M1", (ALICE,))),
            spool.store(new_message("M2", (BOB,))),
            return_exceptions=True,
        )
        assert isinstance(results[0], list) and isinstance(results[2], list)
        assert isinstance(results[1], SpoolError)
        assert results[1].reply.code == 451
        assert states(tmp_path) == {ALICE: "queued", BOB: "queued"}


async def test_reopen_after_crash_requeues_delivering_copies(tmp_path: Path) -> None:
    """Copies left delivering by a crash (files as a SIGKILL leaves them) are queued again."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    with opened(live) as spool:
        await spool.store(new_message())
        jobs = {job.rcpt: job for job in await spool.claim_due(T0, 10)}
        await spool.record(jobs[ALICE].copy_id, CopyState.DELIVERED, now=T0, outcome=DELIVERED)
        # The process dies here: the database and its WAL are whatever was last committed.
        crashed.mkdir()
        for name in ("spool.db", "spool.db-wal"):
            shutil.copyfile(live / name, crashed / name)
    assert states(crashed) == {ALICE: "delivered", BOB: "delivering"}
    with opened(crashed) as spool:
        assert spool.quarantined == 0
        assert states(crashed) == {ALICE: "delivered", BOB: "queued"}
        (job,) = await spool.claim_due(T0, 10)
        assert (job.rcpt, job.attempts) == (BOB, 0)
        assert await spool.body("M1") == b"Hello.\r\n"


async def test_close_without_recording_then_reopen_requeues(tmp_path: Path) -> None:
    """A claim never recorded (a stop mid-delivery) is queued again at the next open."""
    with opened(tmp_path) as spool:
        await spool.store(new_message())
        assert len(await spool.claim_due(T0, 10)) == 2
    with opened(tmp_path) as spool:
        assert states(tmp_path) == {ALICE: "queued", BOB: "queued"}
        assert len(await spool.claim_due(T0, 10)) == 2


async def test_corrupt_copy_headers_are_quarantined_at_open(tmp_path: Path) -> None:
    """A copy whose header bytes changed is moved to quarantine at open and counted; others stay."""
    with opened(tmp_path) as spool:
        await spool.store(new_message())
    tamper(
        tmp_path,
        "UPDATE copies SET headers = ? WHERE rcpt = ?",
        copy_headers(BOB).replace(b"hello", b"HELLO"),
        BOB,
    )
    with opened(tmp_path) as spool:
        assert spool.quarantined == 1
        assert [job.rcpt for job in await spool.claim_due(T0, 10)] == [ALICE]
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as conn:
        kind, ref, reason = conn.execute("SELECT kind, ref, reason FROM quarantine").fetchone()
    assert (kind, reason) == ("copy", "copy checksum mismatch")
    assert ref.startswith("M1/")


async def test_corrupt_body_quarantines_the_message_at_open(tmp_path: Path) -> None:
    """A body whose bytes changed sets its whole message aside at open; other messages stay."""
    with opened(tmp_path) as spool:
        await spool.store(new_message("M1"))
        await spool.store(new_message("M2", ("carol@example.org",)))
    tamper(tmp_path, "UPDATE messages SET body = ? WHERE id = 'M1'", b"Hellp.\r\n")
    with opened(tmp_path) as spool:
        assert spool.quarantined == 1
        assert [job.message_id for job in await spool.claim_due(T0, 10)] == ["M2"]
        assert await spool.body("M1") is None
    assert count(tmp_path, "quarantine") == 1


@pytest.mark.parametrize(
    ("sql", "value"),
    [
        ("UPDATE copies SET headers = ? WHERE rcpt = 'bob@example.net'", "text, not bytes"),
        ("UPDATE copies SET rcpt = ? WHERE rcpt = 'bob@example.net'", b"bob\xff@example.net"),
        ("UPDATE copies SET state = ? WHERE rcpt = 'bob@example.net'", "garbled"),
        ("UPDATE messages SET body = ?", 12345),
        ("UPDATE copies SET state = CAST(? AS TEXT) WHERE rcpt = 'bob@example.net'", b"\xff\xfe"),
        # A message id that cannot be read: the whole file is set aside (the scan cannot go on).
        ("UPDATE messages SET id = CAST(? AS TEXT)", b"M\xff"),
    ],
    ids=[
        "headers-as-text",
        "rcpt-invalid-utf8",
        "unknown-state",
        "body-as-integer",
        "state-utf8",
        "message-id-utf8",
    ],
)
async def test_corrupt_column_types_are_quarantined_not_raised(
    tmp_path: Path, sql: str, value: object
) -> None:
    """A record whose column changed type or encoding is quarantined at open; open never raises."""
    with opened(tmp_path) as spool:
        await spool.store(new_message())
    tamper(tmp_path, sql, value)
    with opened(tmp_path) as spool:
        assert spool.quarantined == 1
        counts, _ = await spool.stats()
        assert sum(counts.values()) <= 1
        await spool.store(new_message("M9", (ALICE,)))  # the spool still takes custody
    whole_file = "messages SET id" in sql
    assert (tmp_path / "quarantine").exists() == whole_file


async def test_corruption_found_while_running_is_quarantined(tmp_path: Path) -> None:
    """A copy or body changed under a running spool is quarantined when claimed or read."""
    with opened(tmp_path) as spool:
        await spool.store(new_message("M1", (ALICE, BOB)))
        await spool.store(new_message("M2", ("carol@example.org",)))
        tamper(tmp_path, "UPDATE copies SET headers = x'00' WHERE rcpt = ?", BOB)
        tamper(tmp_path, "UPDATE messages SET body = x'00' WHERE id = 'M2'")
        jobs = await spool.claim_due(T0, 10)
        assert sorted(job.rcpt for job in jobs) == [ALICE, "carol@example.org"]
        assert spool.quarantined == 1
        assert await spool.body("M2") is None
        assert spool.quarantined == 2


async def test_quarantined_last_copy_lets_its_message_go(tmp_path: Path) -> None:
    """A message whose only live copy was quarantined does not stay in the spool forever."""
    with opened(tmp_path) as spool:
        await spool.store(new_message(rcpts=(BOB,)))
    tamper(tmp_path, "UPDATE copies SET headers = x'00'")
    with opened(tmp_path) as spool:
        assert spool.quarantined == 1
    assert count(tmp_path, "messages") == 0


@pytest.mark.parametrize("damage", ["random-bytes", "truncated"])
async def test_unreadable_database_is_moved_aside(tmp_path: Path, damage: str) -> None:
    """A spool.db that is not a database is moved to spool/quarantine/; a fresh spool opens."""
    with opened(tmp_path) as spool:
        for i in range(20):
            await spool.store(new_message(f"M{i}", body=random.Random(i).randbytes(3000)))
        await spool.store(new_message("BIG", body=LARGE))
    path = tmp_path / "spool.db"
    original = path.read_bytes()
    if damage == "random-bytes":
        path.write_bytes(random.Random(7).randbytes(len(original)))
    else:
        path.write_bytes(original[: len(original) // 2])
    with opened(tmp_path) as spool:
        assert spool.quarantined == 1
        assert await spool.stats() == (dict.fromkeys(CopyState, 0), None)
        await spool.store(new_message("N1", (ALICE,)))
        assert [job.rcpt for job in await spool.claim_due(T0, 10)] == [ALICE]
    aside = sorted(p.name for p in (tmp_path / "quarantine").iterdir())
    assert any(name.startswith("spool-") and name.endswith(".db") for name in aside)
    # Its large bodies went with it (the fresh spool would have swept them away).
    [moved] = [p for p in (tmp_path / "quarantine").iterdir() if p.name.endswith(".bodies")]
    assert (moved / "BIG").read_bytes() == LARGE


@pytest.mark.parametrize("damage", ["record", "file"])
async def test_relay_starts_on_a_damaged_spool(tmp_path: Path, damage: str) -> None:
    """A relay started on a corrupt record or an unreadable spool.db starts and counts it."""
    directory = tmp_path / "spool"
    with opened(directory) as spool:
        await spool.store(new_message())
    if damage == "record":
        tamper(directory, "UPDATE copies SET headers = x'00' WHERE rcpt = ?", BOB)
    else:
        (directory / "spool.db").write_bytes(random.Random(3).randbytes(8192))
    upstream = f"outbox:{tmp_path / 'outbox'}"
    async with running_relay(tmp_path, upstream, {"RELAY_MODE": "queue"}) as relay:
        assert relay.registry.get_sample_value("solo_relay_spool_quarantined_total") == 1
        assert relay.spool is not None
        await relay.spool.store(new_message("M2", ("carol@example.org",)))


async def test_second_quarantine_keeps_the_first(tmp_path: Path) -> None:
    """Two unreadable databases set aside in the same second both stay in quarantine/."""
    for _ in range(2):
        (tmp_path / "spool.db").write_bytes(b"not a database at all" * 200)
        with opened(tmp_path) as spool:
            assert spool.quarantined == 1
    aside = [p for p in (tmp_path / "quarantine").iterdir() if p.suffix == ".db"]
    assert len(aside) == 2


async def test_full_spool_refuses_with_451(tmp_path: Path) -> None:
    """Over max_bytes a store fails with SpoolError (451 4.3.0); smaller mail is taken after."""
    # An empty spool's schema takes a few 16 KiB pages: the limit leaves room for those.
    config = load(environ={"RELAY_SPOOL_MAX_BYTES": str(256 * 1024)})
    with opened(tmp_path, max_bytes=config.spool.max_bytes) as spool:
        with pytest.raises(SpoolError, match="full") as caught:
            await spool.store(new_message("BIG", body=b"x" * 400_000))
        reply = caught.value.reply
        assert (reply.code, reply.enhanced) == (451, "4.3.0")
        assert count(tmp_path, "messages") == 0
        await spool.store(new_message("SMALL", (ALICE,)))
        assert [job.rcpt for job in await spool.claim_due(T0, 10)] == [ALICE]


async def test_full_spool_still_drains(tmp_path: Path) -> None:
    """When new mail no longer fits, copies can still be claimed and recorded, freeing room."""
    with opened(tmp_path, max_bytes=512 * 1024) as spool:
        # A claim rewrites its copy's row, header section included (here 100 kB).
        big = b"X-Pad: " + b"p" * 100_000 + b"\r\n\r\n"
        await spool.store(
            NewMessage("BIG", SENDER, False, T0, T0 + 9e9, b"", (NewCopy(BOB, big, next_try=T0),))
        )
        stored = 1
        with pytest.raises(SpoolError, match="full"):
            while stored < 100:
                await spool.store(new_message(f"M{stored}", (ALICE,), body=b"x" * 8192))
                stored += 1
        assert stored > 5
        jobs = await spool.claim_due(T0, 100)
        assert len(jobs) == stored
        for job in jobs[:5]:
            await spool.record(job.copy_id, CopyState.DELIVERED, now=T0, outcome=DELIVERED)
        await spool.release([job.copy_id for job in jobs[5:]], T0)
        await spool.store(new_message("AFTER", (BOB,), body=b"x" * 8192))
        assert (await spool.stats())[0][CopyState.QUEUED] == stored - 5 + 1


async def test_cancelled_caller_does_not_kill_the_writer(tmp_path: Path) -> None:
    """A caller cancelled while its write waits (a dropped session) leaves the spool working."""
    with opened(tmp_path) as spool:
        await spool.store(new_message(rcpts=(ALICE,)))
        # Another process holds the write lock (as `solo-relay queue` may), so the write waits.
        other = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        waiting = asyncio.ensure_future(spool.store(new_message("M2", (BOB,))))
        await asyncio.sleep(0)  # submitted to the writer thread
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        other.execute("COMMIT")
        other.close()
        counts, _ = await asyncio.wait_for(spool.stats(), timeout=5)
        assert counts[CopyState.QUEUED] in (1, 2)
        await asyncio.wait_for(spool.store(new_message("M3", ("carol@example.org",))), 5)


async def test_closed_spool_refuses(tmp_path: Path) -> None:
    """A spool that is not open answers SpoolError, never a hang."""
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError):
        await spool.store(new_message())


def test_a_second_relay_cannot_open_the_same_spool(tmp_path: Path) -> None:
    """One relay per spool: a second open of the same directory is refused, not shared."""
    first = Spool(tmp_path)
    first.open()
    try:
        with pytest.raises(SpoolError, match="in use by another relay"):
            Spool(tmp_path).open()
    finally:
        first.close()
    second = Spool(tmp_path)
    second.open()  # free again once the first has closed
    second.close()


def test_a_busy_database_stops_the_open_and_is_not_quarantined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock held past the busy timeout is trouble to report, not corruption to set aside."""
    monkeypatch.setattr(schema_module, "BUSY_TIMEOUT_MS", 100)
    with opened(tmp_path) as spool:
        asyncio.run(spool.store(new_message("M1", (ALICE,))))
    holder = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(SpoolError, match="cannot open the spool"):
            Spool(tmp_path).open()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not (tmp_path / "quarantine").exists()
    assert states(tmp_path) == {ALICE: "queued"}


def test_damaged_numbers_are_quarantined_at_open(tmp_path: Path) -> None:
    """Text where an attempt count should be is set aside, not a crash or a resend storm."""
    with opened(tmp_path) as spool:
        asyncio.run(spool.store(new_message("M1", (ALICE, BOB))))
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as conn:
        conn.execute("UPDATE copies SET attempts = 'x' WHERE rcpt = ?", (BOB,))
        conn.commit()
    with opened(tmp_path) as spool:
        assert spool.quarantined == 1
    assert states(tmp_path) == {ALICE: "queued"}


# -- large bodies as files (Rule 3) ---------------------------------------------------

LARGE = b"".join(b"line %06d of a large body\r\n" % n for n in range(4000))  # ~108 KB


def bodies(directory: Path) -> dict[str, bytes]:
    folder = directory / spool_module.BODIES
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}


async def test_a_large_body_is_a_file_until_its_last_copy_is_final(tmp_path: Path) -> None:
    assert len(LARGE) >= spool_module.BODY_FILE_OCTETS
    with opened(tmp_path) as spool:
        await spool.store(new_message("BIG", body=LARGE))
        await spool.store(new_message("SMALL", body=b"small\r\n"))
        assert bodies(tmp_path) == {"BIG": LARGE}  # the small one stays in the database
        with sqlite3.connect(tmp_path / "spool.db") as db:
            assert db.execute("SELECT length(body) FROM messages WHERE id = 'BIG'").fetchone() == (
                0,
            )
        assert await spool.body("BIG") == LARGE
        jobs = [j for j in await spool.claim_due(T0, 10) if j.message_id == "BIG"]
        await spool.record_delivered(jobs[0].copy_id, now=T0, attempts=1, outcome=DELIVERED)
        assert bodies(tmp_path) == {"BIG": LARGE}  # one copy still to go
        await spool.record(jobs[1].copy_id, CopyState.FAILED, now=T0, outcome=TRANSIENT)
        assert bodies(tmp_path) == {}
        assert await spool.body("BIG") is None


async def test_a_large_body_survives_a_restart(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        await spool.store(new_message("BIG", body=LARGE))
        await spool.claim_due(T0, 10)  # delivering when the process stops
    with opened(tmp_path) as spool:
        assert {job.message_id for job in await spool.claim_due(T0, 10)} == {"BIG"}
        assert await spool.body("BIG") == LARGE


async def test_a_duplicate_id_leaves_the_first_body_file_alone(tmp_path: Path) -> None:
    with opened(tmp_path) as spool:
        await spool.store(new_message("BIG", body=LARGE))
        with pytest.raises(SpoolError):
            await spool.store(new_message("BIG", body=LARGE[::-1]))
        assert bodies(tmp_path) == {"BIG": LARGE}
        assert await spool.body("BIG") == LARGE


async def test_body_files_without_a_row_go_and_rows_without_a_file_are_quarantined(
    tmp_path: Path,
) -> None:
    """At open: a file a crash left behind is removed; a missing or altered file quarantines."""
    with opened(tmp_path) as spool:
        for name in ("GONE", "ALTERED", "FINE"):
            await spool.store(new_message(name, body=LARGE))
    folder = tmp_path / spool_module.BODIES
    (folder / "GONE").unlink()
    (folder / "ALTERED").write_bytes(LARGE.replace(b"line 000100", b"line 999999"))
    (folder / "LEFTOVER").write_bytes(b"from a transaction that never committed")
    with opened(tmp_path) as spool:
        assert spool.quarantined == 2
        assert bodies(tmp_path) == {"FINE": LARGE}
        assert {job.message_id for job in await spool.claim_due(T0, 10)} == {"FINE"}
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as db:
        reasons = dict(db.execute("SELECT ref, reason FROM quarantine").fetchall())
        kept = db.execute("SELECT data FROM quarantine WHERE ref = 'ALTERED'").fetchone()
    assert reasons == {"GONE": "body file missing", "ALTERED": "body checksum mismatch"}
    assert kept is not None and len(kept[0]) == len(LARGE)  # the altered bytes, kept aside


async def test_body_files_count_against_max_bytes(tmp_path: Path) -> None:
    with opened(tmp_path, max_bytes=512 * 1024) as spool:
        stored = 0
        with pytest.raises(SpoolError, match="full"):
            while stored < 20:
                await spool.store(new_message(f"B{stored}", (ALICE,), body=LARGE))
                stored += 1
        assert 2 <= stored <= 5  # ~108 KB each against 512 KB, the database included
        assert len(bodies(tmp_path)) == stored


# -- issue 13: damage verdicts, recovery, the lock, bounded files -----------------------

BIG = b"B" * (spool_module.BODY_FILE_OCTETS + 10)  # a body that lives in bodies/
# Random damages tried (times FAULT_ROUNDS, the fault suite's knob for longer runs).
TRIALS = 40 * int(os.environ.get("FAULT_ROUNDS", "1"))


def hashes(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("damage", ["emptied", "removed"])
async def test_a_database_gone_beside_body_files_is_quarantined_never_swept(
    tmp_path: Path, damage: str
) -> None:
    """spool.db emptied or removed beside bodies/: the bodies go to quarantine, not deleted."""
    with opened(tmp_path) as spool:
        await spool.store(new_message("LARGE", (ALICE,), body=BIG))
    (tmp_path / "spool.db-wal").unlink(missing_ok=True)
    if damage == "emptied":
        (tmp_path / "spool.db").write_bytes(b"")
    else:
        (tmp_path / "spool.db").unlink()
    with opened(tmp_path) as spool:
        assert spool.quarantined == 1
        assert spool.live == 0
    (kept,) = (tmp_path / "quarantine").glob("*.bodies")
    assert (kept / "LARGE").read_bytes() == BIG


async def test_random_damage_is_quarantined_byte_for_byte_never_a_stall(tmp_path: Path) -> None:
    """Random bytes anywhere in spool.db: open, claims, body reads and stats never fail.

    Damage is either set aside whole (the file kept exactly as found) or caught record by
    record. (Found with this loop: a damaged index passed quick_check and then failed
    every claim, and a sender that was not UTF-8 failed every claim that met it.)
    """
    rng = random.Random(1)
    master = tmp_path / "master"
    with opened(master) as spool:
        for n in range(40):
            body = rng.randbytes(rng.choice([100, 3000, 70_000]))
            await spool.store(new_message(f"M{n}", body=body))
    size = (master / "spool.db").stat().st_size
    for trial in range(TRIALS):
        directory = tmp_path / f"t{trial}"
        shutil.copytree(master, directory)
        with (directory / "spool.db").open("r+b") as file:
            file.seek(rng.randrange(size))
            file.write(rng.randbytes(rng.choice([1, 8, 64, 512, 4096, 16384])))
        found = (directory / "spool.db").read_bytes()
        with opened(directory) as spool:
            for job in await spool.claim_due(T0, 1000):
                await spool.body(job.message_id)
            await spool.stats()
            quarantined = spool.quarantined
        aside = list((directory / "quarantine").glob("spool-*.db"))
        if aside:
            assert [p.read_bytes() for p in aside] == [found], trial
        else:
            assert quarantined <= 80, trial
        shutil.rmtree(directory)


async def test_queue_recover_brings_back_the_readable_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spool damaged mid-file is quarantined; queue recover spools its intact records again."""
    rng = random.Random(7)
    originals: dict[str, NewMessage] = {}
    with opened(tmp_path) as spool:
        for n in range(60):
            message = new_message(f"M{n:02}", body=rng.randbytes(2000) if n % 10 else BIG)
            originals[message.id] = message
            await spool.store(message)
        await spool.claim_due(T0, 4)  # a few "delivering" when the damage comes
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    with (tmp_path / "spool.db").open("r+b") as file:
        file.seek((pages // 2) * spool_module.PAGE_SIZE)
        file.write(rng.randbytes(spool_module.PAGE_SIZE))
    with opened(tmp_path) as spool:
        assert spool.quarantined == 1 and spool.live == 0
    (aside,) = (tmp_path / "quarantine").glob("spool-*.db")
    before = hashes(tmp_path / "quarantine")

    monkeypatch.setenv("RELAY_SPOOL_DIR", str(tmp_path))
    assert cli.main(["queue", "recover", str(aside)]) == 0
    out = capsys.readouterr().out
    assert hashes(tmp_path / "quarantine") == before  # the evidence is never written
    with opened(tmp_path) as spool:
        jobs = await spool.claim_due(T0 + 10**9, 1000)
        bodies = {job.message_id: await spool.body(job.message_id) for job in jobs}
    recovered = {job.message_id for job in jobs}
    assert len(recovered) >= 30, out  # one page of 16 KiB lost, not the spool
    assert len(recovered) < 60 or "damaged records left behind: 0" in out
    for job in jobs:  # exactly what was stored: checksums hold, nothing invented
        original = originals[job.message_id]
        assert (job.rcpt, job.headers) in {(c.rcpt, c.headers) for c in original.copies}
        assert bodies[job.message_id] == original.body
    assert f"recovered {len(recovered)} messages" in out
    # Run again, after the copies were delivered and left the spool: refused, in one line,
    # rather than queued again (they would be sent twice).
    with opened(tmp_path) as spool:
        for job in await spool.claim_due(T0 + 10**9, 1000):
            await spool.record_delivered(job.copy_id, now=T0, attempts=1, outcome=DELIVERED)
        assert spool.live == 0
    assert cli.main(["queue", "recover", str(aside)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recovered into this spool already" in err
    with opened(tmp_path) as spool:
        assert spool.live == 0


async def test_a_second_relay_on_the_spool_is_told_which_process_holds_it(tmp_path: Path) -> None:
    """The lock file names its holder: a second open fails with that process id, in one line."""
    with opened(tmp_path):
        other = Spool(tmp_path)
        with pytest.raises(SpoolError) as caught:
            other.open()
    text = str(caught.value)
    assert f"process {os.getpid()}" in text and "\n" not in text


async def test_wal_and_database_shrink_back_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a burst is delivered, an idle spool truncates its WAL and frees its pages."""
    monkeypatch.setattr(writer_module, "MAINTAIN_IDLE_SECONDS", 0.05)
    with opened(tmp_path) as spool:
        for n in range(120):
            await spool.store(new_message(f"M{n}", (ALICE,), body=b"x" * 60_000))
        high = (tmp_path / "spool.db").stat().st_size + (tmp_path / "spool.db-wal").stat().st_size
        assert high > 6_000_000
        for job in await spool.claim_due(T0, 1000):
            await spool.record_delivered(job.copy_id, now=T0, attempts=1, outcome=DELIVERED)
        done = spool.maintained
        async with asyncio.timeout(10):
            while spool.maintained == done:
                await asyncio.sleep(0.02)
        assert (tmp_path / "spool.db-wal").stat().st_size == 0
        assert (tmp_path / "spool.db").stat().st_size < 1_000_000


async def test_a_damaged_spool_is_set_aside_with_its_wal_byte_for_byte(tmp_path: Path) -> None:
    """Damage beside a WAL a killed relay left: database and WAL are kept exactly as found.

    (Before, the verdict was reached on a read-write connection whose close checkpointed
    and deleted the WAL: its transactions, mail acknowledged, were gone from the evidence.)
    """
    rng = random.Random(11)
    with opened(tmp_path) as spool:
        for n in range(60):
            await spool.store(new_message(f"M{n}", (ALICE,), body=rng.randbytes(3000)))
    # A process that dies with its last transaction only in the WAL (no checkpoint).
    script = (
        "import os, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute('PRAGMA wal_autocheckpoint = 0')\n"
        'conn.execute("UPDATE copies SET attempts = 1 WHERE id = 1")\n'
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "spool.db")], check=True)
    wal = tmp_path / "spool.db-wal"
    assert wal.stat().st_size > 0
    database = tmp_path / "spool.db"
    with database.open("r+b") as file:
        file.seek((database.stat().st_size // spool_module.PAGE_SIZE // 2) * spool_module.PAGE_SIZE)
        file.write(rng.randbytes(spool_module.PAGE_SIZE))
    found = (database.read_bytes(), wal.read_bytes())
    with opened(tmp_path) as spool:
        assert spool.quarantined == 1
    (aside,) = (tmp_path / "quarantine").glob("spool-*.db")
    assert (aside.read_bytes(), Path(f"{aside}-wal").read_bytes()) == found


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE messages SET sender = CAST(? AS TEXT) WHERE id = 'M1'",
        "UPDATE messages SET auth_user = CAST(? AS TEXT) WHERE id = 'M1'",
        "UPDATE copies SET last_text = CAST(? AS TEXT) WHERE message = 'M1'",
    ],
    ids=["sender", "auth-user", "last-text"],
)
async def test_undecodable_text_is_quarantined_at_open_and_never_stalls_claims(
    tmp_path: Path, sql: str
) -> None:
    """A text no claim can decode is one record set aside at open, not a claim failing forever.

    (Found by overwriting random bytes: a sender that was not UTF-8 passed the open and
    failed every claim that met it, so no copy at all was delivered.)
    """
    with opened(tmp_path) as spool:
        await spool.store(new_message("M1", (ALICE,)))
        await spool.store(new_message("M2", (BOB,)))
    tamper(tmp_path, sql, b"app\xff@example.org")
    with opened(tmp_path) as spool:
        assert spool.quarantined == 1
        assert [job.rcpt for job in await spool.claim_due(T0, 10)] == [BOB]


async def test_a_spool_made_without_auto_vacuum_is_converted_when_idle_and_shrinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older spool (auto_vacuum off) gets one VACUUM when idle and mostly free, then shrinks."""
    monkeypatch.setattr(writer_module, "MAINTAIN_IDLE_SECONDS", 0.05)
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db", isolation_level=None)) as conn:
        conn.execute(f"PRAGMA page_size = {spool_module.PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(spool_module.SCHEMA)
    with opened(tmp_path) as spool:
        for n in range(60):
            await spool.store(new_message(f"M{n}", (ALICE,), body=b"x" * 60_000))
        for job in await spool.claim_due(T0, 1000):
            await spool.record_delivered(job.copy_id, now=T0, attempts=1, outcome=DELIVERED)
        done = spool.maintained
        async with asyncio.timeout(10):
            while spool.maintained == done:
                await asyncio.sleep(0.02)
        assert (tmp_path / "spool.db").stat().st_size < 1_000_000
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.db")) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


def test_queue_recover_of_a_file_that_is_no_database_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a database (or no schema left): exit 1, one line naming the file, nothing added."""
    with opened(tmp_path / "live"):
        pass
    junk = tmp_path / "spool-1.db"
    junk.write_bytes(b"not a database at all" * 1000)
    monkeypatch.setenv("RELAY_SPOOL_DIR", str(tmp_path / "live"))
    assert cli.main(["queue", "recover", str(junk)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(junk) in err
    assert cli.main(["queue", "recover", str(tmp_path / "missing.db")]) == 1
