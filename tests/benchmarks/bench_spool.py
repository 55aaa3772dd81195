"""What durability costs: accepted messages per second with the spool fsyncing, and without.

Run from the repository root:

    .venv/bin/python tests/benchmarks/bench_spool.py            # 20 sessions x 100 messages
    .venv/bin/python tests/benchmarks/bench_spool.py --quick    # a smoke run

Each case starts the relay as a subprocess in ``queue`` mode (the default) on
a fresh spool directory, with delivery throttled to one copy a day so that
only acceptance is measured, then has N concurrent SMTP sessions each send M
messages of about 5 KB to R recipients. Printed per case: messages/s,
copies/s, p50/p99 of the time from the final dot to the 250, and the spool's
commit count (group commit: many messages per fsync). The aim (issue 4):
with fsync, at least 0.7 of the no-fsync rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 80 + "\r\n") * 1


@dataclass
class Result:
    label: str
    messages: int
    copies: int
    seconds: float
    latencies: list[float]
    spool_db: Path

    def row(self) -> str:
        lat = sorted(self.latencies)
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        return (
            f"{self.label:<10} {self.messages:>8} {self.messages / self.seconds:>10.1f}"
            f" {self.copies / self.seconds:>10.1f} {p50:>9.2f} {p99:>9.2f}"
        )


def message(i: int, recipients: list[str]) -> bytes:
    head = (
        f"From: News <news@example.org>\r\nTo: {', '.join(recipients)}\r\n"
        f"Subject: benchmark {i}\r\nMessage-ID: <bench.{i}@example.org>\r\n\r\n"
    )
    return (head + BODY).encode()


async def session(port: int, count: int, rcpts: int, offset: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line or line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO bench.example.org\r\n")
    await writer.drain()
    await reply()
    for n in range(count):
        i = offset + n
        recipients = [f"customer{i:06d}x{r}@example.com" for r in range(rcpts)]
        commands = b"MAIL FROM:<news@example.org>\r\n" + b"".join(
            f"RCPT TO:<{r}>\r\n".encode() for r in recipients
        )
        writer.write(commands + b"DATA\r\n")  # PIPELINING (RFC 2920)
        await writer.drain()
        for _ in range(1 + rcpts + 1):
            line = await reply()
            if not line.startswith((b"250", b"354")):
                raise RuntimeError(f"unexpected reply {line!r}")
        writer.write(message(i, recipients) + b".\r\n")
        await writer.drain()
        started = time.perf_counter()
        line = await reply()
        latencies.append(time.perf_counter() - started)
        if not line.startswith(b"250"):
            raise RuntimeError(f"not accepted: {line!r}")
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


def run_case(label: str, fsync: bool, sessions: int, count: int, rcpts: int) -> Result:
    spool = Path(tempfile.mkdtemp(prefix=f"bench-{label}-"))
    port = free_port()
    env = {
        **os.environ,
        "RELAY_LISTEN": f"127.0.0.1:{port}",
        "RELAY_METRICS_LISTEN": "127.0.0.1:0",
        "RELAY_SPOOL_DIR": str(spool),
        "RELAY_SPOOL_FSYNC": "true" if fsync else "false",
        "RELAY_SPOOL_MIN_FREE_BYTES": "0",
        "RELAY_UPSTREAM": f"outbox:{spool / 'outbox'}",
        "RELAY_DELIVERY_RATE_PER_DAY": "1",
        "RELAY_LOG_FORMAT": "json",
        "RELAY_LOG_LEVEL": "info",
        "RELAY_SMTP_MAX_CONNECTIONS": "1000",
        "RELAY_SMTP_MAX_RECIPIENTS": str(max(rcpts, 1000)),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    listening = json.loads(process.stderr.readline())
    assert listening["event"] == "listening", listening
    # Keep reading its log, or a full pipe would stall the relay mid-benchmark.
    threading.Thread(target=process.stderr.read, daemon=True).start()
    latencies: list[float] = []

    async def drive() -> float:
        started = time.perf_counter()
        await asyncio.gather(
            *(session(port, count, rcpts, s * count, latencies) for s in range(sessions))
        )
        return time.perf_counter() - started

    try:
        seconds = asyncio.run(drive())
    finally:
        process.terminate()
        process.wait(timeout=60)
    messages = sessions * count
    return Result(label, messages, messages * rcpts, seconds, latencies, spool / "spool.db")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stored(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(
            conn.execute("SELECT COUNT(*) FROM copies WHERE state != 'delivered'").fetchone()[0]
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 sessions x 20 messages")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=100, help="per session")
    parser.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    args = parser.parse_args()
    sessions, count = (4, 20) if args.quick else (args.sessions, args.messages)
    print(
        f"{sessions} sessions x {count} messages of ~5 KB to {args.rcpts} recipient(s),"
        " relay in queue mode, delivery held back"
    )
    print(
        f"{'case':<10} {'messages':>8} {'msg/s':>10} {'copies/s':>10} {'p50 ms':>9} {'p99 ms':>9}"
    )
    results = []
    for label, fsync in (
        ("no-fsync", False),
        ("fsync", True),
        ("no-fsync", False),
        ("fsync", True),
    ):
        result = run_case(label, fsync, sessions, count, args.rcpts)
        results.append(result)
        print(result.row(), flush=True)
        kept = stored(result.spool_db) + len(list(result.spool_db.parent.glob("outbox/*.eml")))
        if kept != result.copies:
            print(f"ERROR: {kept} copies spooled or delivered, {result.copies} accepted")
            return 1
    rate = {
        label: statistics.mean(r.messages / r.seconds for r in results if r.label == label)
        for label in ("fsync", "no-fsync")
    }
    ratio = rate["fsync"] / rate["no-fsync"]
    print(f"ratio fsync / no-fsync (mean of two runs each): {ratio:.2f}  (aim: above 0.7)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
