"""`solo-relay queue` on a spool built with ``relay.custody.spool.Spool``.

In-process (``relay.cli.main.main`` with the environment the process would have),
except ``python -m relay queue`` itself: the entry point with ``--config`` before
or after the action, and a command waiting for a lock held by another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from relay.cli import main as cli
from relay.config import LogConfig
from relay.custody.spool import CopyState, NewCopy, NewMessage, Spool
from relay.ops.logs import AddressTokens, load_key

SENDER = "alice@example.org"
BOB, CAROL, DAVE, ERIN = (
    "bob@example.com",
    "carol@example.net",
    "dave@example.test",
    "erin@example.com",
)
BODY = b"BODY-MARKER: never printed, not even to bob@example.com\r\n"
HOUR = 3600.0


def headers(rcpt: str, *extra: str) -> bytes:
    """A copy's header section naming its recipient and the sender."""
    lines = [
        f"Received: from app.example.org by relay.example.net for <{rcpt}>; now",
        f"From: Alice Example <{SENDER}>",
        f"To: {rcpt}",
        "Subject: Invoice",
        *extra,
    ]
    return "".join(f"{line}\r\n" for line in lines).encode() + b"\r\n"


def store(spool: Spool, *messages: NewMessage) -> None:
    for message in messages:
        asyncio.run(spool.store(message))


def sample(now: float) -> tuple[NewMessage, NewMessage]:
    """Q1: queued, deferred, failed and delivered copies; Q2: one deferred copy from <>."""
    q1 = NewMessage(
        id="Q1",
        sender=SENDER,
        smtputf8=False,
        received=now - 600,
        expires=now + 2 * 86400,
        body=BODY,
        copies=(
            NewCopy(BOB, headers(BOB, "X-Evil: \x1b[2Jcleared")),
            NewCopy(
                CAROL,
                headers(CAROL),
                state=CopyState.DEFERRED,
                next_try=now + HOUR,
                attempts=2,
                last_code=451,
                last_enhanced="4.7.1",
                last_text=f"<{CAROL}> greylisted",
            ),
            NewCopy(DAVE, headers(DAVE), state=CopyState.FAILED, attempts=1, last_code=550),
            NewCopy(ERIN, headers(ERIN), state=CopyState.DELIVERED, attempts=1, last_code=250),
        ),
    )
    q2 = NewMessage(
        id="Q2",
        sender="",
        smtputf8=False,
        received=now - 60,
        expires=now + 2 * 86400,
        body=b"report\r\n",
        copies=(NewCopy(SENDER, headers(SENDER), state=CopyState.DEFERRED, next_try=now + HOUR),),
        is_dsn=True,
    )
    return q1, q2


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    """A stopped relay's spool holding the sample messages, and its token key."""
    directory = tmp_path / "spool"
    spool = Spool(directory, fsync=False)
    spool.open()
    try:
        store(spool, *sample(time.time()))
    finally:
        spool.close()
    load_key(LogConfig(), directory)  # as `serve` does at start
    return directory


@pytest.fixture
def running(spool_dir: Path) -> Iterator[Spool]:
    """The spool held open by this process, as a running relay holds it."""
    spool = Spool(spool_dir, fsync=False)
    spool.open()
    try:
        yield spool
    finally:
        spool.close()


def queue(
    spool_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``solo-relay queue ARGS`` in this process, with ``RELAY_SPOOL_DIR`` and no other
    RELAY_* setting, in ``spool_dir``'s parent: what ``python -m relay queue`` would get."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(
            os.environ, {**clean, "RELAY_SPOOL_DIR": str(spool_dir), **(env or {})}, clear=True
        ),
        contextlib.chdir(spool_dir.parent),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            status = cli.main(["queue", *args])
        except SystemExit as exc:  # --help, and argparse's usage errors
            status = int(exc.code or 0)
    return subprocess.CompletedProcess(["queue", *args], status, out.getvalue(), err.getvalue())


def queue_process(spool_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m relay queue ARGS`` with ``RELAY_SPOOL_DIR`` and no other RELAY_* setting."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", "queue", *args],
        env={**clean, "RELAY_SPOOL_DIR": str(spool_dir)},
        cwd=spool_dir.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def token(spool_dir: Path, address: str) -> str:
    return AddressTokens(load_key(LogConfig(), spool_dir))(address)


def rows(spool_dir: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(spool_dir / "spool.db")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_list_shows_tokens_not_addresses(spool_dir: Path) -> None:
    """list: one line per queued/deferred/failed copy, sender and recipient as keyed tokens."""
    result = queue(spool_dir, "list")
    assert result.returncode == 0, result.stderr
    assert "@" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "QUEUE",
        "ID",
        "COPY",
        "STATE",
        "TRIES",
        "NEXT",
        "TRY",
        "LAST",
        "REPLY",
        "AGE",
        "MESSAGE-ID",
        "FROM",
        "TO",
    ]
    assert len(lines) == 6  # header, Q1's bob, carol and dave; Q2's one (erin's is delivered)
    assert lines[-1] == "total: 4 copies of 2 messages (deferred 2, failed 1, queued 1)"
    sender = token(spool_dir, SENDER)
    bob = next(line for line in lines if line.endswith(token(spool_dir, BOB)))
    assert bob.split()[:5] == ["Q1", bob.split()[1], "queued", "0", "now"] and sender in bob
    carol = next(line for line in lines if line.endswith(token(spool_dir, CAROL)))
    assert "deferred  2" in carol and "in 59m" in carol and "451 4.7.1" in carol
    assert " 10m " in carol
    dave = next(line for line in lines if line.endswith(token(spool_dir, DAVE)))
    assert "failed" in dave and "550" in dave
    assert token(spool_dir, ERIN) not in result.stdout
    q2 = next(line for line in lines if line.startswith("Q2 "))
    assert " <> " in q2 and q2.endswith(sender)


def test_list_show_addresses_prints_them(spool_dir: Path) -> None:
    """list --show-addresses: the addresses in clear instead of tokens."""
    result = queue(spool_dir, "list", "--show-addresses")
    assert result.returncode == 0, result.stderr
    for address in (SENDER, BOB, CAROL, DAVE):
        assert address in result.stdout
    assert ERIN not in result.stdout
    assert "a_" not in result.stdout


def test_show_prints_headers_redacted_never_the_body(spool_dir: Path) -> None:
    """show: envelope, size and each copy's headers, addresses as tokens, no body, no escapes."""
    result = queue(spool_dir, "show", "Q1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "@" not in out and "BODY-MARKER" not in out and "\x1b" not in out
    assert f"sender     {token(spool_dir, SENDER)}" in out
    assert f"size       body {len(BODY)} bytes" in out
    assert "received   " in out and "(10m ago)" in out
    assert "copies     4" in out
    for rcpt in (BOB, CAROL, DAVE, ERIN):
        assert f": {token(spool_dir, rcpt)}\n" in out  # the "--- copy N: TOKEN" line
        assert f"To: {token(spool_dir, rcpt)}\n" in out
    assert f"From: Alice Example <{token(spool_dir, SENDER)}>" in out
    assert "X-Evil: \\u001b[2Jcleared" in out
    assert f"last reply 451 4.7.1 <{token(spool_dir, CAROL)}> greylisted" in out


def test_show_with_addresses_still_no_body(spool_dir: Path) -> None:
    """show --show-addresses: header addresses in clear, the body still never printed."""
    result = queue(spool_dir, "show", "Q1", "--show-addresses")
    assert result.returncode == 0, result.stderr
    assert f"sender     {SENDER}" in result.stdout
    assert f"To: {CAROL}" in result.stdout and f"<{BOB}>" in result.stdout
    assert "BODY-MARKER" not in result.stdout


def test_retry_makes_copies_due_now(spool_dir: Path) -> None:
    """retry ID moves that message's deferred next_try to now; retry --all moves the rest."""
    before = time.time()
    result = queue(spool_dir, "retry", "Q1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2 copies of Q1 due now\n"  # queued (already due) and deferred
    q1 = dict(rows(spool_dir, "SELECT rcpt, next_try FROM copies WHERE message = 'Q1'"))
    assert before <= float(str(q1[CAROL])) <= time.time()
    assert q1[BOB] == 0.0  # already due: its place in line is kept
    (q2,) = rows(spool_dir, "SELECT next_try FROM copies WHERE message = 'Q2'")
    assert float(str(q2[0])) > time.time() + HOUR / 2
    result = queue(spool_dir, "retry", "--all")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "3 copies due now\n"
    (q2,) = rows(spool_dir, "SELECT next_try FROM copies WHERE message = 'Q2'")
    assert float(str(q2[0])) <= time.time()
    states = rows(spool_dir, "SELECT state FROM copies WHERE message = 'Q1' ORDER BY id")
    assert [s for (s,) in states] == ["queued", "deferred", "failed", "delivered"]


def test_delete_removes_message_and_copies(spool_dir: Path) -> None:
    """delete ID removes the message and all its copies; the other message stays."""
    result = queue(spool_dir, "delete", "Q1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "deleted Q1: 4 copies\n"
    assert rows(spool_dir, "SELECT id FROM messages") == [("Q2",)]
    assert rows(spool_dir, "SELECT message FROM copies") == [("Q2",)]
    assert queue(spool_dir, "show", "Q1").returncode == 1


def test_stats_counts_every_state(spool_dir: Path) -> None:
    """stats: all five states (zero included), messages, oldest live age, quarantine, size."""
    conn = sqlite3.connect(spool_dir / "spool.db")
    with conn:
        conn.execute(
            "INSERT INTO quarantine (kind, ref, reason, at) VALUES ('copy', 'Q0/9', 'crc', 0)"
        )
    conn.close()
    result = queue(spool_dir, "stats")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:7]] == [
        ["queued", "1"],
        ["delivering", "0"],
        ["deferred", "2"],
        ["delivered", "1"],
        ["failed", "1"],
        ["messages", "2"],
        ["oldest", "live"],
    ]
    assert lines[6].split()[2] == "10m"
    assert lines[7].split() == ["quarantined", "1"]
    assert lines[8].startswith("database ") and "spool.db" in lines[8] and "KiB" in lines[8]


def test_unknown_id_exits_1(spool_dir: Path) -> None:
    """show, retry and delete of an id not in the spool: exit 1, saying so, changing nothing."""
    for action in ("show", "retry", "delete"):
        result = queue(spool_dir, action, "NOPE")
        assert result.returncode == 1, action
        assert result.stdout == ""
        assert result.stderr == "solo-relay queue: no message NOPE in the spool\n"
    assert len(rows(spool_dir, "SELECT id FROM copies")) == 5


def test_missing_database_is_not_created(tmp_path: Path) -> None:
    """No spool database: exit 1 naming the path; neither directory nor database is created."""
    missing = tmp_path / "nowhere"
    result = queue_process(missing, "stats")  # the exit status of the real process
    assert result.returncode == 1
    assert result.stderr.startswith("solo-relay queue: no spool database at ")
    assert str(missing / "spool.db") in result.stderr
    assert not missing.exists()


def test_configuration_error_exits_2(spool_dir: Path) -> None:
    """Bad configuration: exit 2 and one line naming the key, as `serve` does."""
    result = queue(spool_dir, "list", env={"RELAY_SPOOL_FSYNC": "maybe"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "solo-relay: configuration error: RELAY_SPOOL_FSYNC: must be true or false, not 'maybe'"
    ]


def test_config_file_before_or_after_the_action(spool_dir: Path, tmp_path: Path) -> None:
    """--config PATH works before or after the action; --help describes each action."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\ndir = "{spool_dir}"\n')
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    for args in (["--config", str(config), "stats"], ["stats", "--config", str(config)]):
        result = subprocess.run(
            [sys.executable, "-m", "relay", "queue", *args],
            env=clean,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("queued       1\n")
    for action, words in (
        ("list", "One line per copy"),
        ("show", "Never the body"),
        ("retry", "due now"),
        ("delete", "Remove one message"),
        ("stats", "Copies by state"),
    ):
        result = queue(spool_dir, action, "--help")
        assert result.returncode == 0 and words in " ".join(result.stdout.split()), action


def test_works_beside_a_running_relay(running: Spool, spool_dir: Path) -> None:
    """With the spool open elsewhere: retry is claimed, delete of a copy in flight is harmless."""
    result = queue(spool_dir, "list")
    assert result.returncode == 0 and result.stdout.count("\n") == 6  # with the totals line
    assert queue(spool_dir, "retry", "Q2").stdout == "1 copy of Q2 due now\n"
    jobs = asyncio.run(running.claim_due(time.time(), 10))
    assert sorted(job.message_id for job in jobs) == ["Q1", "Q2"]  # bob's (due) and Q2's
    bob = next(job for job in jobs if job.message_id == "Q1")
    result = queue(spool_dir, "delete", "Q1")
    assert result.returncode == 0, result.stderr
    assert "1 copy being delivered at that moment may still arrive" in result.stdout
    asyncio.run(running.record(bob.copy_id, CopyState.DELIVERED, now=time.time()))
    assert rows(spool_dir, "SELECT message FROM copies") == [("Q2",)]
    stats = queue(spool_dir, "stats")
    assert stats.returncode == 0 and "delivering   1" in stats.stdout


def test_waits_for_the_relays_write_lock(running: Spool, spool_dir: Path) -> None:
    """Under a write lock held elsewhere, list still reads and retry waits, then succeeds."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(spool_dir / "spool.db", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE copies SET attempts = attempts")
        locked.set()
        release.wait(30)
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        assert queue(spool_dir, "list").returncode == 0  # WAL: readers never wait
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        retry = subprocess.Popen(
            [sys.executable, "-m", "relay", "queue", "retry", "--all"],
            env={**clean, "RELAY_SPOOL_DIR": str(spool_dir)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        until_waiting_for_the_lock(retry, spool_dir)
        assert retry.poll() is None  # waiting for the lock, not failed
        release.set()
        out, err = retry.communicate(timeout=30)
        assert retry.returncode == 0, err
        assert out == "3 copies due now\n"
    finally:
        release.set()
        holder.join()


def until_waiting_for_the_lock(child: subprocess.Popen[str], spool_dir: Path) -> None:
    """Until ``child`` has begun its write transaction and sleeps in SQLite's busy handler.

    It opens ``spool.db-wal`` at its first access to the database, ``BEGIN IMMEDIATE``
    (the statements before it touch no file), and while the lock is held elsewhere it
    can only sleep and try again: its state is ``S`` between tries. (Linux's /proc;
    elsewhere this waits its 30 s, and the test still holds.)
    """
    wal = str((spool_dir / "spool.db-wal").resolve())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and child.poll() is None:
        with contextlib.suppress(OSError):
            fds = Path(f"/proc/{child.pid}/fd")
            opened = any(os.readlink(fd) == wal for fd in fds.iterdir())
            state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if opened and state == "S":
                return
        time.sleep(0.01)


def test_a_large_body_kept_as_a_file_is_sized_and_deleted(spool_dir: Path) -> None:
    body = b"x" * 100_000 + b"\r\n"
    message = NewMessage(
        "QBIG", SENDER, False, time.time(), time.time() + 3600, body, (NewCopy(BOB, headers(BOB)),)
    )
    spool = Spool(spool_dir, fsync=False)
    spool.open()
    try:
        store(spool, message)
    finally:
        spool.close()
    file = spool_dir / "bodies" / "QBIG"
    assert file.read_bytes() == body
    shown = queue(spool_dir, "show", "QBIG")
    assert shown.returncode == 0, shown.stderr
    assert f"body {len(body)} bytes" in shown.stdout
    stats = queue(spool_dir, "stats")
    assert (
        f"body files   1, {len(body) // 1024}" in stats.stdout or "body files   1," in stats.stdout
    )
    assert queue(spool_dir, "delete", "QBIG").returncode == 0
    assert not file.exists()
