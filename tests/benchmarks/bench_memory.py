"""Memory under fan-out: one large message to many recipients, through the real relay.

Run from the repository root (a script, not a test: pytest does not collect it)::

    .venv/bin/python tests/benchmarks/bench_memory.py              # both cases of issue 5
    .venv/bin/python tests/benchmarks/bench_memory.py --case big   # 10 MB x 1,000 only

Cases:

``big``
    one 10 MB message to 1,000 recipients. Goal: peak RSS under 150 MB, every copy
    delivered, every body byte for byte the one sent.
``wide``
    one 5 KB message to 10,000 recipients (``smtp.max_recipients`` raised to 10,000),
    and, for comparison, one to 1,000. Goal: accepted, every copy delivered, memory
    flat: RSS sampled while the copies go out does not climb with them.

The relay runs as ``solo-relay serve`` (queue mode, the fsynced spool, log level
info) in front of a sink on loopback (this script with ``--sink``): an SMTP server
that takes every transaction, undoes the dot-stuffing, and reports each copy's
recipient and the SHA-256 of its body. Python's ``smtplib`` sends the message. The
relay's RSS is read from ``/proc/PID/status`` every 50 ms (``VmRSS``; ``VmHWM`` for
the peak). The body has lines that start with ``.`` (stuffed on the wire, both ways)
and non-ASCII bytes (8BITMIME). Exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
RSS_GOAL_MB = 150


# -- the sink -------------------------------------------------------------------------


async def _sink_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 sink.example.net ESMTP\r\n")
    rcpts: list[bytes] = []
    while line := await reader.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            writer.write(b"250-sink.example.net\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE\r\n")
        elif verb == b"MAIL":
            rcpts = []
            writer.write(b"250 2.1.0 ok\r\n")
        elif verb == b"RCPT":
            rcpts.append(line[line.index(b"<") + 1 : line.rindex(b">")])
            writer.write(b"250 2.1.5 ok\r\n")
        elif verb == b"DATA":
            writer.write(b"354 go on\r\n")
            digest = await _read_body(reader)
            for rcpt in rcpts:
                sys.stdout.write(f"{rcpt.decode()} {digest}\n")
            sys.stdout.flush()
            writer.write(b"250 2.0.0 ok\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 2.0.0 bye\r\n")
            break
        else:
            writer.write(b"250 2.0.0 ok\r\n")
        await writer.drain()
    writer.close()


async def _read_body(reader: asyncio.StreamReader) -> str:
    """SHA-256 of the body (after the header section) of the data, dot-stuffing undone."""
    data = bytearray(b"\r\n")  # a leading CRLF: the first line is found like the others
    while (end := data.find(b"\r\n.\r\n", max(len(data) - MB - 4, 0))) < 0:
        chunk = await reader.read(MB)
        if not chunk:
            raise ConnectionResetError("end of stream inside DATA")
        data += chunk
    message = bytes(data[2 : end + 2]).replace(b"\r\n..", b"\r\n.")
    if message.startswith(b".."):
        message = message[1:]
    return hashlib.sha256(message[message.index(b"\r\n\r\n") + 4 :]).hexdigest()


async def _sink(port: int) -> None:
    server = await asyncio.start_server(_sink_session, "127.0.0.1", port, limit=4 * MB)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# -- the harness ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def body_of(size: int) -> bytes:
    """``size`` bytes of CRLF lines; every 50th starts with a dot, some are 8-bit."""
    lines = []
    n = 0
    total = 0
    while total < size:
        text = f"{'.' if n % 50 == 0 else ''}line {n:08d} café " + "x" * 50 + "\r\n"
        line = text.encode()
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines)


@dataclass
class Run:
    label: str
    rcpts: int
    size: int
    accept_seconds: float = 0.0
    deliver_seconds: float = 0.0
    peak_kb: int = 0
    cpu_seconds: float = 0.0  # the relay's, user + system, for the whole case
    samples: list[tuple[int, int]] = field(default_factory=list)  # (copies so far, RSS kB)
    delivered: int = 0
    distinct: int = 0
    bodies_ok: bool = False


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


def run_case(label: str, rcpts: int, size: int, pool: int) -> Run:
    result = Run(label, rcpts, size)
    sink_port, relay_port = free_port(), free_port()
    spool = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    sink = subprocess.Popen(
        [sys.executable, __file__, "--sink", str(sink_port)], stdout=subprocess.PIPE, text=True
    )
    relay: subprocess.Popen[bytes] | None = None
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError("the sink did not start")
        seen: list[tuple[str, str]] = []

        def collect() -> None:
            assert sink.stdout is not None
            for line in sink.stdout:
                rcpt, digest = line.split()
                seen.append((rcpt, digest))

        threading.Thread(target=collect, daemon=True).start()
        env = {
            **os.environ,
            "RELAY_LISTEN": f"127.0.0.1:{relay_port}",
            "RELAY_METRICS_LISTEN": "127.0.0.1:0",
            "RELAY_SPOOL_DIR": str(spool),
            "RELAY_UPSTREAM": f"smtp+plain://127.0.0.1:{sink_port}",
            "RELAY_UPSTREAM_POOL_SIZE": str(pool),
            "RELAY_SMTP_MAX_RECIPIENTS": str(max(rcpts, 1000)),
        }
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"],
            env=env,
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", relay_port, timeout=5) as probe:
                    probe.noop()
                break
            except OSError:
                if time.monotonic() > deadline or relay.poll() is not None:
                    raise RuntimeError("the relay did not start") from None
                time.sleep(0.05)
        body = body_of(size)
        expected = hashlib.sha256(body).hexdigest()
        recipients = [f"user{n}@example.com" for n in range(rcpts)]
        message = (
            b"From: <news@example.org>\r\nTo: <list@example.org>\r\nSubject: big\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body
        )
        pid = relay.pid
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", relay_port, timeout=600) as client:
            client.sendmail("news@example.org", recipients, message, mail_options=["BODY=8BITMIME"])
        del message, body
        accepted = time.perf_counter()
        result.accept_seconds = accepted - started
        limit = time.monotonic() + 1800
        while len(seen) < rcpts:
            result.samples.append((len(seen), _status(pid, "VmRSS:")))
            if time.monotonic() > limit or relay.poll() is not None:
                break
            time.sleep(0.05)
        result.deliver_seconds = time.perf_counter() - accepted
        time.sleep(0.3)  # a copy sent twice would show now
        result.peak_kb = _status(pid, "VmHWM:")
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        result.cpu_seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        result.samples.append((len(seen), _status(pid, "VmRSS:")))
        result.delivered = len(seen)
        result.distinct = len({rcpt for rcpt, _ in seen})
        result.bodies_ok = bool(seen) and all(digest == expected for _, digest in seen)
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(timeout=120)
        sink.terminate()
        sink.wait(timeout=30)
        shutil.rmtree(spool, ignore_errors=True)
    return result


def _size(octets: int) -> str:
    return f"{octets / MB:g} MB" if octets >= MB else f"{octets / 1024:g} KB"


def report(run: Run) -> bool:
    ok = run.delivered == run.rcpts and run.distinct == run.rcpts and run.bodies_ok
    print(
        f"{run.label}: {run.rcpts:,} recipients x {_size(run.size)}:"
        f" accepted in {run.accept_seconds:.2f} s, delivered {run.delivered:,}"
        f" ({run.distinct:,} distinct) in {run.deliver_seconds:.1f} s"
        f" = {run.delivered / max(run.deliver_seconds, 1e-9):.0f} copies/s;"
        f" bodies identical: {'yes' if run.bodies_ok else 'NO'};"
        f" peak RSS {run.peak_kb / 1024:.1f} MB; relay CPU {run.cpu_seconds:.1f} s"
    )
    if run.samples:
        marks = [min(run.samples, key=lambda s: abs(s[0] - run.rcpts * q / 4)) for q in range(5)]
        print(
            "  RSS while delivering (copies sent: MB): "
            + ", ".join(f"{n:,}: {kb / 1024:.1f}" for n, kb in marks)
        )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("big", "wide", "all"), default="all")
    parser.add_argument("--pool-size", type=int, default=20, help="RELAY_UPSTREAM_POOL_SIZE")
    parser.add_argument("--sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        asyncio.run(_sink(args.sink))
        return 0
    failed = False
    if args.case in ("big", "all"):
        big = run_case("big", 1000, 10 * MB, args.pool_size)
        failed |= not report(big)
        if big.peak_kb / 1024 >= RSS_GOAL_MB:
            print(f"  peak RSS over the {RSS_GOAL_MB} MB goal")
            failed = True
    if args.case in ("wide", "all"):
        for rcpts in (1000, 10_000):
            wide = run_case(f"wide {rcpts:,}", rcpts, 5 * 1024, args.pool_size)
            failed |= not report(wide)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
