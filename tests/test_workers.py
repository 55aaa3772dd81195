"""``workers = N``: a supervisor and N worker processes on one listener (relay/ops/workers.py).

Processes, the way a user starts them: ``solo-relay serve`` with ``RELAY_WORKERS``,
smtplib clients, the outbox upstream, and ``/metrics`` and ``/readyz`` over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.config import load
from relay.core.errors import ConfigError
from relay.custody.spool import NewCopy, NewMessage, Spool
from relay.ops.workers import orphaned_spools, share, spool_dir, spool_dirs

SENDER = "news@example.org"


def test_each_worker_gets_its_spool_and_its_share_of_the_limits(tmp_path: Path) -> None:
    config = load(
        environ={
            "RELAY_WORKERS": "3",
            "RELAY_SPOOL_DIR": str(tmp_path),
            "RELAY_UPSTREAM_POOL_SIZE": "20",
            "RELAY_SMTP_MAX_CONNECTIONS": "100",
            "RELAY_DELIVERY_RATE_PER_SECOND": "30",
            "RELAY_DELIVERY_RATE_PER_DAY": "1000",
            "RELAY_DELIVERY_MAX_QUEUED": "9000",
        }
    )
    parts = [share(config, k, 3) for k in range(3)]
    assert [p.spool.dir for p in parts] == [
        str(tmp_path),
        str(tmp_path / "worker-1"),
        str(tmp_path / "worker-2"),
    ]
    for part in parts:
        assert part.workers == 1
        assert part.upstream.pool_size == 7  # ceil(20 / 3): never below the total
        assert part.smtp.max_connections == 34
        assert part.delivery.rate_per_second == 10.0
        assert part.delivery.rate_per_day == 334
        assert part.delivery.max_queued == 3000
        assert part.delivery.concurrency == 0  # 0 still means "the pool size"
        assert part.metrics.listen == "127.0.0.1:0"  # the supervisor serves metrics.listen
    assert spool_dir(config, 0) == tmp_path


def test_each_worker_gets_its_share_of_every_listed_upstream(tmp_path: Path) -> None:
    """[[upstreams]]: each worker a third of each pool and of each local limit; on a shared
    store the limits stay whole (the store counts for all) and the local share shrinks."""
    env = {
        "RELAY_WORKERS": "3",
        "RELAY_SPOOL_DIR": str(tmp_path),
        "RELAY_UPSTREAMS": "ses,backup",
        "RELAY_UPSTREAMS_SES_URL": "smtp://user@smtp.example.net:587",
        "RELAY_UPSTREAMS_SES_POOL_SIZE": "9",
        "RELAY_UPSTREAMS_SES_RATE_PER_SECOND": "30",
        "RELAY_UPSTREAMS_SES_RATE_PER_DAY": "900",
        "RELAY_UPSTREAMS_BACKUP_URL": "smtp://user@smtp.example.org:587",
        "RELAY_UPSTREAMS_BACKUP_ROLE": "failover",
    }
    local = share(load(environ=env), 1, 3)
    ses, backup = local.routes
    assert (ses.pool_size, ses.rate_per_second, ses.rate_per_day) == (3, 10.0, 300)
    assert (backup.pool_size, backup.rate_per_second, backup.rate_per_day) == (2, 0.0, 0)
    shared = share(load(environ={**env, "RELAY_FLEET_STORE": "redis://store.test:6379/0"}), 1, 3)
    ses = shared.routes[0]
    assert (ses.pool_size, ses.rate_per_second, ses.rate_per_day) == (3, 30.0, 900)
    assert shared.fleet.expected_replicas == 3


def test_workers_setting_is_bounded() -> None:
    for bad in ("0", "65"):
        with pytest.raises(ConfigError, match="workers"):
            load(environ={"RELAY_WORKERS": bad})


def _message(message_id: str, rcpt: str) -> NewMessage:
    headers = f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: hi\r\n\r\n".encode()
    now = time.time()
    return NewMessage(
        message_id, SENDER, False, now, now + 3600, b"Hello\r\n", (NewCopy(rcpt, headers),)
    )


def test_queue_command_covers_every_worker_spool(tmp_path: Path) -> None:
    """``solo-relay queue`` lists, shows and deletes across spool.dir and spool.dir/worker-K."""
    base = tmp_path / "spool"
    for directory, message_id, rcpt in (
        (base, "QA", "alice@example.com"),
        (base / "worker-1", "QB", "bob@example.net"),
    ):
        spool = Spool(directory, fsync=False)
        spool.open()
        try:
            asyncio.run(spool.store(_message(message_id, rcpt)))
        finally:
            spool.close()
    config = load(environ={"RELAY_SPOOL_DIR": str(base)})
    assert spool_dirs(config) == [base, base / "worker-1"]
    assert orphaned_spools(config) == [base / "worker-1"]  # workers = 1: nobody delivers it

    def queue(*args: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        return subprocess.run(
            [sys.executable, "-m", "relay", "queue", *args],
            env={**clean, "RELAY_SPOOL_DIR": str(base)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    listing = queue("list")
    assert listing.returncode == 0, listing.stderr
    assert "QA" in listing.stdout and "QB" in listing.stdout
    # One listing for every spool: a SPOOL column, and the totals across them.
    assert [line.split()[:2] for line in listing.stdout.splitlines()[1:3]] == [
        [".", "QA"],
        ["worker-1", "QB"],
    ]
    assert listing.stdout.endswith("total: 2 copies of 2 messages in 2 spools (queued 2)\n")
    shown = queue("show", "QB")
    assert shown.returncode == 0 and "QB" in shown.stdout, shown.stderr
    assert queue("delete", "QB").returncode == 0
    assert "QB" not in queue("list").stdout
    missing = queue("show", "QZ")
    assert missing.returncode == 1 and "no message QZ" in missing.stderr


# -- the supervisor as a process --------------------------------------------------------


@dataclass
class Served:
    process: subprocess.Popen[str]
    directory: Path
    smtp: int
    metrics: int
    lines: list[dict[str, object]] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, object]]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def wait_for(self, name: str, count: int, timeout: float = 20.0) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while len(found := self.events(name)) < count:
            assert time.monotonic() < deadline, f"{count} {name!r} lines: {self.lines[-5:]}"
            time.sleep(0.05)
        return found

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}{path}", timeout=5) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.http("/readyz")[0] != 200:
            assert time.monotonic() < deadline, self.http("/readyz")
            time.sleep(0.1)

    def workers(self) -> list[int]:
        """PIDs of the supervisor's live children."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]


def serve(directory: Path, workers: int) -> subprocess.Popen[str]:
    """``solo-relay serve`` in ``directory`` on free ports, JSON logs on a pipe.

    In a process group of its own, as a terminal gives it.
    """
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
        "RELAY_WORKERS": str(workers),
        "RELAY_LISTEN": "127.0.0.1:0",
        "RELAY_METRICS_LISTEN": "127.0.0.1:0",
        "RELAY_LOG_FORMAT": "json",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        cwd=directory,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    process = serve(tmp_path, workers=2)
    assert process.stderr is not None
    first = json.loads(process.stderr.readline())
    smtp = int(str(first["smtp"]).rsplit(":", 1)[1])
    metrics = int(str(first["metrics"]).rsplit(":", 1)[1])
    result = Served(process, tmp_path, smtp, metrics, [first])

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            result.lines.append(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    try:
        yield result
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _send(served: Served, count: int, first: int = 0) -> None:
    for n in range(first, first + count):
        rcpts = [f"user{n}@example.com", f"other{n}@example.net"]
        with smtplib.SMTP("127.0.0.1", served.smtp, timeout=30) as client:
            client.sendmail(
                SENDER, rcpts, f"From: <{SENDER}>\r\nTo: {', '.join(rcpts)}\r\n\r\nHi\r\n".encode()
            )


def _delivered(directory: Path, count: int, timeout: float = 20.0) -> list[str]:
    """The To: line of every copy in the outbox, once ``count`` are there."""
    deadline = time.monotonic() + timeout
    while len(files := sorted((directory / "outbox").glob("*.eml"))) < count:
        assert time.monotonic() < deadline, f"{len(files)} of {count} copies"
        time.sleep(0.05)
    return sorted(
        line
        for path in files
        for line in path.read_bytes().decode().split("\r\n")
        if line.startswith("To:")
    )


def test_two_workers_serve_one_listener_and_one_endpoint(served: Served) -> None:
    """Every copy delivered once; metrics summed over the workers; SIGTERM stops them all."""
    listening = served.wait_for("listening", 3)  # the supervisor, then each worker
    assert sorted(str(line.get("worker")) for line in listening[1:]) == ["0/2", "1/2"]
    served.wait_ready()
    _send(served, 30)
    to_lines = _delivered(served.directory, 60)
    expected = sorted(
        f"To: {rcpt}"
        for n in range(30)
        for rcpt in (f"user{n}@example.com", f"other{n}@example.net")
    )
    assert to_lines == expected
    status, metrics = served.http("/metrics")
    assert status == 200
    accepted = re.search(r'solo_relay_messages_received_total\{result="accepted"\} (\S+)', metrics)
    assert accepted is not None and float(accepted.group(1)) == 30.0
    assert (served.directory / "spool" / "spool.db").exists()
    assert (served.directory / "spool" / "worker-1" / "spool.db").exists()
    workers = served.workers()
    assert len(workers) == 2
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_ctrl_c_to_the_process_group_stops_every_worker_cleanly(served: Served) -> None:
    """SIGINT to the whole group (a terminal's Ctrl-C): the supervisor alone gets it and
    passes SIGTERM on; every worker drains and says so (found in review: workers that
    got the SIGINT too were killed mid-drain by the supervisor's SIGTERM)."""
    served.wait_for("listening", 3)
    served.wait_ready()
    _send(served, 4)
    _delivered(served.directory, 8)
    os.killpg(served.process.pid, signal.SIGINT)
    assert served.process.wait(timeout=60) == 0
    assert len(served.wait_for("stopped", 3)) == 3  # the supervisor and both workers


def test_a_worker_that_dies_is_started_again(served: Served) -> None:
    served.wait_for("listening", 3)
    served.wait_ready()
    victim = served.workers()[0]
    os.kill(victim, signal.SIGKILL)
    served.wait_for("worker exited; starting it again", 1)
    served.wait_for("listening", 4)  # the new worker
    served.wait_ready()
    assert victim not in served.workers() and len(served.workers()) == 2
    _send(served, 10)
    assert len(_delivered(served.directory, 20)) == 20


def test_workers_stop_when_their_supervisor_is_killed(served: Served) -> None:
    """SIGKILL leaves no orphans: each worker sees its lifeline close and stops."""
    served.wait_for("listening", 3)
    workers = served.workers()
    served.process.kill()
    served.process.wait(timeout=10)
    deadline = time.monotonic() + 20
    for pid in workers:
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text():
            assert time.monotonic() < deadline, f"worker {pid} still running"
            time.sleep(0.05)


def test_a_spool_left_by_more_workers_is_delivered(tmp_path: Path) -> None:
    """With workers = 1, spool.dir/worker-1 (from a run with more) is delivered, and said so.

    (Found in review: it was only reported, so acknowledged mail waited there for good.)
    """
    left = tmp_path / "spool" / "worker-1"
    spool = Spool(left, fsync=False)
    spool.open()
    try:
        asyncio.run(spool.store(_message("QL", "alice@example.com")))
    finally:
        spool.close()
    process = serve(tmp_path, workers=1)
    try:
        assert process.stderr is not None
        lines = []
        for text in process.stderr:
            lines.append(json.loads(text))
            if lines[-1]["event"] == "listening":
                break
        [left_over] = [line for line in lines if line["level"] == "warning"]
        assert left_over["event"] == "delivering a spool left by a larger worker count"
        assert left_over["spool"] == "spool/worker-1" and left_over["live"] == 1
        assert _delivered(tmp_path, 1) == ["To: <alice@example.com>"]
        deadline = time.monotonic() + 10
        while _live(left) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _live(left)  # recorded as delivered: the message left that spool
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _live(directory: Path) -> int:
    with contextlib.closing(sqlite3.connect(directory / "spool.db")) as db:
        return int(db.execute("SELECT COUNT(*) FROM copies").fetchone()[0])


def test_queue_list_goes_on_past_an_unreadable_spool(tmp_path: Path) -> None:
    """One damaged worker spool: the others are still listed; the exit status says so."""
    base = tmp_path / "spool"
    spool = Spool(base, fsync=False)
    spool.open()
    try:
        asyncio.run(spool.store(_message("QA", "alice@example.com")))
    finally:
        spool.close()
    (base / "worker-1").mkdir()
    (base / "worker-1" / "spool.db").write_bytes(b"not a database " * 100)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    listing = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "list"],
        env={**clean, "RELAY_SPOOL_DIR": str(base)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "QA" in listing.stdout
    assert "worker-1" in listing.stderr
    assert listing.returncode == 1
