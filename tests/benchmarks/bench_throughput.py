"""End-to-end throughput: Postfix's ``smtp-source`` into the relay, the relay into ``smtp-sink``.

Run from the repository root (it is a script, not a test: pytest does not collect it)::

    .venv/bin/python tests/benchmarks/bench_throughput.py                  # the issue's run
    .venv/bin/python tests/benchmarks/bench_throughput.py --messages 200   # a smoke run
    .venv/bin/python tests/benchmarks/bench_throughput.py --install        # apt-get postfix first
    .venv/bin/python tests/benchmarks/bench_throughput.py --delay-ms 20    # + pool scaling

It needs ``smtp-source`` and ``smtp-sink`` from Postfix (Debian package ``postfix``);
when they are missing it prints the command that installs them, or runs it with
``--install``. Postfix itself, run as a splitting relay for comparison, needs root
(``postfix_relay.py`` sets up a private instance; nothing of the system's is touched).

Cases (issue 5): messages of 5 KB to 1, 10 and 100 recipients, and of 1 MB to 10. For
each case, three targets are driven in the same run, each behind a fresh ``smtp-sink``
on a free loopback port (``-c``: it counts one ``mesg`` per transaction):

``sink``
    ``smtp-source`` straight into ``smtp-sink``: the ceiling (no splitting, one
    transaction per message; its "copies" are recipients, as in the issue's table).
``postfix``
    Postfix as a splitting relay (``smtp_destination_recipient_limit = 1``, queue on
    disk, fsynced), relaying to the sink: the reference.
``relay``
    solo-relay as ``solo-relay serve`` with its defaults (``queue`` mode, the SQLite
    spool with ``synchronous=FULL``, log level ``info``) but ``--workers`` processes
    (default: one per CPU, as Postfix uses every CPU) and an upstream pool of
    ``--pool-size`` connections in all, delivering to the sink.

``smtp-source`` drives each with 20 sessions that keep their connection (``-d``); the
clock stops when the sink has every copy. Meanwhile one more client (``Probe``) sends
messages of the same shape on its own connection and times each final dot to its
reply: the p50 and p99 columns (under load; its messages are counted in the totals).
Printed per case and target: messages/s and copies/s end to end, acceptance alone
(``smtp-source`` done), dot-to-reply p50/p99, CPU seconds per 1,000 copies (the relay:
its processes; Postfix: all processes of the instance, from ``/proc``), and memory (the
relay: peak RSS, ``VmHWM``, summed over its processes; Postfix: the sum of its
processes' PSS at the end of the load, since the sum of ~150 peaks counts shared pages
~150 times). Then the ratios, and where twice Postfix's rate is more than the sink itself
takes from ``smtp-source`` (its transactions a second), a note that the goal is beyond
what this sink can count: ``smtp-sink`` is one process, and at 1 MB a transaction it
fills a core at about 400 MB/s on the 2-core benchmark machine.

With ``--delay-ms N``, the 10-recipient case also runs through ``delay_proxy.py``, which
holds every reply of the sink for N ms (a provider far away), once per ``--pools`` size:
copies/s should grow with the pool.

The message count per case scales with the work: the 100-recipient case sends a tenth
of ``--messages``, the 1 MB case a twentieth.
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from postfix_relay import PostfixRelay, find_postfix

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOOLS = ("smtp-source", "smtp-sink")
TOOL_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
INSTALL = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postfix"
KB = 1024
MESG = re.compile(rb"mesg=(\d+)")
GOAL = 2.0  # relay copies/s over Postfix's, in every case (issue 5)


@dataclass(frozen=True)
class Case:
    label: str
    rcpts: int
    size: int  # payload bytes (smtp-source -l), headers not included
    share: int  # messages in this case: --messages // share


CASES = (
    Case("1 rcpt, 5 KB", 1, 5 * KB, 1),
    Case("10 rcpt, 5 KB", 10, 5 * KB, 1),
    Case("100 rcpt, 5 KB", 100, 5 * KB, 10),
    Case("10 rcpt, 1 MB", 10, KB * KB, 20),
)


@dataclass
class Result:
    target: str  # "sink", "postfix" or "relay"
    case: Case
    messages: int  # smtp-source's and the probe's
    copies: int  # transactions the sink counted
    seconds: float  # until the sink has every copy
    accept_seconds: float  # until smtp-source is done
    latencies: list[float] = field(default_factory=list)  # the probe's dot-to-reply
    cpu: float | None = None
    memory_kb: int | None = None

    def quantile(self, q: float) -> str:
        if len(self.latencies) < 2:
            return "-"
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return f"{cuts[int(q * 100) - 1] * 1000:.1f}"

    @property
    def copies_per_second(self) -> float:
        return self.copies / self.seconds

    def row(self) -> str:
        cpu = f"{self.cpu / self.copies * 1000:.2f}" if self.cpu is not None else "-"
        memory = f"{self.memory_kb / KB:.0f}" if self.memory_kb is not None else "-"
        return (
            f"{self.case.label:<15} {self.target:<8} {self.messages:>6} {self.copies:>7}"
            f" {self.messages / self.seconds:>8.1f} {self.copies_per_second:>9.1f}"
            f" {self.messages / self.accept_seconds:>9.1f} {self.quantile(0.5):>7}"
            f" {self.quantile(0.99):>7} {cpu:>8} {memory:>7}"
        )


HEADER = (
    f"{'case':<15} {'target':<8} {'msgs':>6} {'copies':>7} {'msg/s':>8} {'copies/s':>9}"
    f" {'accept/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu/1k':>8} {'mem MB':>7}"
)


class Target(Protocol):
    port: int

    def cpu_seconds(self) -> float: ...
    def close(self) -> None: ...


def find_tools() -> dict[str, str] | None:
    found: dict[str, str] = {}
    for tool in TOOLS:
        path = shutil.which(tool) or next(
            (f"{d}/{tool}" for d in TOOL_DIRS if os.access(f"{d}/{tool}", os.X_OK)), None
        )
        if path is None:
            return None
        found[tool] = path
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} is not listening on port {port} after 30 s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Sink:
    """``smtp-sink -c`` on a free port; ``count`` is its running total of transactions."""

    def __init__(self, binary: str) -> None:
        self.port = free_port()
        command = [binary, "-c", "-m", "1000"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        command += [f"127.0.0.1:{self.port}", "1024"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
        )
        self.count = 0
        self._tail = b""
        threading.Thread(target=self._read, daemon=True).start()
        wait_listening(self.port, self.process, "smtp-sink")

    def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := self.process.stdout.read(65536):
            text = self._tail + chunk
            counts = MESG.findall(text)
            if counts:
                self.count = int(counts[-1])
            self._tail = text[-64:]  # a counter may straddle two reads

    def wait_for(self, target: int, timeout: float) -> float:
        """Block until the sink has ``target`` transactions; return the time, raise on timeout."""
        deadline = time.perf_counter() + timeout
        while self.count < target:
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"smtp-sink has {self.count} of {target} after {timeout} s")
            time.sleep(0.002)
        return time.perf_counter()

    def close(self) -> None:
        stop(self.process)


class SinkTarget:
    """The sink itself as the target (the ceiling)."""

    def __init__(self, sink: Sink) -> None:
        self.port = sink.port

    def cpu_seconds(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


class Relay:
    """``solo-relay serve`` as a process with its defaults, delivering to ``upstream_port``."""

    def __init__(
        self,
        upstream_port: int,
        pool_size: int | None,
        workers: int | None = 1,
        extra_env: dict[str, str | None] | None = None,
    ) -> None:
        self.spool = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
        self.port = free_port()
        self.metrics_port = free_port()
        env = {
            **os.environ,
            "RELAY_LISTEN": f"127.0.0.1:{self.port}",
            "RELAY_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "RELAY_SPOOL_DIR": str(self.spool),
            "RELAY_UPSTREAM": f"smtp+plain://127.0.0.1:{upstream_port}",
            # None: the relay's own default (--defaults).
            **({"RELAY_UPSTREAM_POOL_SIZE": str(pool_size)} if pool_size is not None else {}),
            **({"RELAY_WORKERS": str(workers)} if workers is not None else {}),
            # Room for the load: 20 sessions + the probe, 100 recipients a message.
            "RELAY_SMTP_MAX_CONNECTIONS": "1000",
            "RELAY_SMTP_MAX_RECIPIENTS": "1000",
        }
        for name, value in (extra_env or {}).items():  # None: not set (bench_fleet.py)
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"], env=env, cwd=ROOT, stderr=subprocess.PIPE
        )
        self.log: collections.deque[bytes] = collections.deque(maxlen=20)
        # Keep reading its log (info: a line per message and per copy), or a full pipe
        # would stall the relay mid-benchmark.
        threading.Thread(target=self._drain, daemon=True).start()
        wait_listening(self.port, self.process, "the relay")
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until ``/readyz`` says 200: with workers, the listener is up before they are."""
        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the relay is not ready after 30 s")
            time.sleep(0.05)

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def pids(self) -> list[int]:
        """The relay process and, with workers, its worker processes."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *(int(child) for child in children)]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the relay's processes, from ``/proc/PID/stat``."""
        total = 0
        for pid in self.pids():
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # fields from 3 (state) on
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def memory_kb(self) -> int:
        """Peak RSS (``VmHWM``), summed over the relay's processes."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        return total

    def close(self) -> None:
        stop(self.process)
        shutil.rmtree(self.spool, ignore_errors=True)


def postfix_pss_kb(postfix: PostfixRelay) -> int:
    """The instance's memory now: the sum of its processes' proportional set size."""
    total = 0
    for pid in postfix.pids():
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


class Probe(threading.Thread):
    """One more client, sending messages like the case's on its own connection.

    For each, the body goes out up to its last CRLF, then the clock starts, the final
    ``.`` CRLF goes out, and the clock stops at the reply: the time the target takes
    to answer the end of data, under the load of ``smtp-source``.
    """

    def __init__(self, port: int, case: Case) -> None:
        super().__init__(daemon=True)
        self.port, self.case = port, case
        self.latencies: list[float] = []
        self.sent = 0
        self.error: BaseException | None = None
        self._finish = threading.Event()
        line = b"x" * 76 + b"\r\n"
        self._body = (
            b"From: <probe@example.org>\r\nTo: <probe@example.com>\r\nSubject: probe\r\n\r\n"
            + line * max(1, case.size // len(line))
        )

    def stop(self) -> None:
        self._finish.set()
        self.join(timeout=120)
        if self.error is not None:
            raise RuntimeError(f"probe failed: {self.error}")

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
                # Else Nagle holds the final ".\r\n" for the ACK of the body: +40 ms.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                replies = sock.makefile("rb")
                self._expect(replies, b"220")
                sock.sendall(b"EHLO probe.example.org\r\n")
                self._expect(replies, b"250")
                while not self._finish.is_set():
                    self._one(sock, replies)
                sock.sendall(b"QUIT\r\n")
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _one(self, sock: socket.socket, replies: collections.abc.Iterator[bytes]) -> None:
        sock.sendall(b"MAIL FROM:<probe@example.org>\r\n")
        self._expect(replies, b"250")
        for n in range(self.case.rcpts):
            sock.sendall(f"RCPT TO:<probe{n}@example.com>\r\n".encode())
            self._expect(replies, b"250")
        sock.sendall(b"DATA\r\n")
        self._expect(replies, b"354")
        sock.sendall(self._body)
        started = time.perf_counter()
        sock.sendall(b".\r\n")
        self._expect(replies, b"250")
        self.latencies.append(time.perf_counter() - started)
        self.sent += 1

    @staticmethod
    def _expect(replies: collections.abc.Iterator[bytes], code: bytes) -> None:
        for line in replies:
            if not line.startswith(code):
                raise RuntimeError(f"expected {code!r}, got {line!r}")
            if line[3:4] != b"-":
                return
        raise RuntimeError("connection closed")


def source(
    binary: str, port: int, sessions: int, messages: int, case: Case, *, reuse: bool = True
) -> None:
    command = [
        binary,
        # -d: keep the session open for the next message; without it, smtp-source's own
        # default, a new connection per message (as most mail libraries do).
        *(["-d"] if reuse else []),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-r",
        str(case.rcpts),
        "-l",
        str(case.size),
        "-M",
        "bench.example.org",
        "-f",
        "news@example.org",
        "-t",
        "customer@example.com",  # -r N sends to 1customer@..., 2customer@..., and so on
        "-S",
        "benchmark",
        f"127.0.0.1:{port}",
    ]
    done = subprocess.run(command, capture_output=True, timeout=3600, check=False)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace").strip()
        raise RuntimeError(f"smtp-source failed ({done.returncode}): {output}")


def measure(
    tools: dict[str, str],
    case: Case,
    target_name: str,
    *,
    sessions: int,
    messages: int,
    pool: int | None,
    timeout: float,
    delay_ms: float = 0.0,
    workers: int | None = 1,
    reuse: bool = True,
) -> Result:
    sink = Sink(tools["smtp-sink"])
    target: Target | None = None
    proxy: subprocess.Popen[bytes] | None = None
    try:
        upstream = sink.port
        if delay_ms:
            upstream = free_port()
            proxy = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "delay_proxy.py"),
                    str(upstream),
                    str(sink.port),
                    str(delay_ms),
                ],
                stdout=subprocess.PIPE,
            )
            assert proxy.stdout is not None
            proxy.stdout.readline()  # "ready"
        if target_name == "relay":
            target = Relay(upstream, pool, workers)
        elif target_name == "postfix":
            target = PostfixRelay(upstream)
        else:
            target = SinkTarget(sink)
        probe = Probe(target.port, case)
        cpu = target.cpu_seconds()
        started = time.perf_counter()
        probe.start()
        source(tools["smtp-source"], target.port, sessions, messages, case, reuse=reuse)
        accepted = time.perf_counter()
        probe.stop()
        total = messages + probe.sent
        copies = total * case.rcpts  # for the sink alone: recipients, as in the table
        transactions = total if target_name == "sink" else copies
        done = sink.wait_for(transactions, timeout=timeout)
        cpu = target.cpu_seconds() - cpu
        memory = None
        if isinstance(target, Relay):
            memory = target.memory_kb()
        elif isinstance(target, PostfixRelay):
            memory = postfix_pss_kb(target)
        time.sleep(0.2)  # any copy delivered twice would show up now
        if sink.count != transactions:
            raise RuntimeError(f"smtp-sink has {sink.count} transactions, {transactions} expected")
    except Exception:
        if isinstance(target, Relay):
            sys.stderr.write(b"".join(target.log).decode(errors="replace"))
        if isinstance(target, PostfixRelay):
            sys.stderr.write(target.log_tail())
        raise
    finally:
        if target is not None:
            target.close()
        if proxy is not None:
            stop(proxy)
        sink.close()
    return Result(
        target_name,
        case,
        total,
        copies,
        done - started,
        accepted - started,
        probe.latencies,
        cpu if target_name != "sink" else None,
        memory,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="messages in the 5 KB cases")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s")
    parser.add_argument("--pool-size", type=int, default=20, help="RELAY_UPSTREAM_POOL_SIZE")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="RELAY_WORKERS (default: one per CPU, as Postfix uses every CPU)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds a case may take")
    parser.add_argument(
        "--cases", default="1,2,3,4", help="which cases to run, by number (default: all four)"
    )
    parser.add_argument("--no-postfix", action="store_true", help="skip Postfix as a relay")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="also measure pool scaling at this delay"
    )
    parser.add_argument("--pools", default="5,10,20,40", help="pool sizes for --delay-ms")
    parser.add_argument("--install", action="store_true", help="apt-get install postfix if needed")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="the relay exactly as shipped: its own workers and pool size (ignores both flags)",
    )
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="smtp-source's default: a new connection per message (no -d), for every target",
    )
    args = parser.parse_args()
    if args.defaults:
        args.workers = args.pool_size = None

    tools = find_tools()
    if tools is None and args.install:
        print(f"installing: {INSTALL}", flush=True)
        subprocess.run(["sh", "-c", INSTALL], check=True)
        tools = find_tools()
    if tools is None:
        print("smtp-source and smtp-sink (Postfix) are missing; install them with (as root):")
        print(f"    {INSTALL}")
        print("or run this script with --install")
        return 2
    targets = ["sink", "relay"]
    if args.no_postfix:
        print("postfix relay: skipped (--no-postfix)")
    elif find_postfix() is None:
        print("postfix relay: not measured (needs Postfix >= 3.4 installed, and root)")
    else:
        targets.insert(1, "postfix")

    cases = [CASES[int(n) - 1] for n in args.cases.split(",")]
    tuning = (
        "its default workers and pool"
        if args.defaults
        else f"{args.workers} workers, upstream pool {args.pool_size} in all"
    )
    mode = "a new connection per message" if args.new_connections else "-d"
    print(
        f"smtp-source -s {args.sessions} {mode} into: {', '.join(targets)}"
        f" (relay: queue mode, fsynced spool, {tuning}); {os.cpu_count()} CPUs"
    )
    print(HEADER)
    results: dict[tuple[str, str], Result] = {}
    for case in cases:
        messages = max(args.sessions, args.messages // case.share)
        for name in targets:
            result = measure(
                tools,
                case,
                name,
                sessions=args.sessions,
                messages=messages,
                pool=args.pool_size,
                timeout=args.timeout,
                workers=args.workers,
                reuse=not args.new_connections,
            )
            results[(case.label, name)] = result
            print(result.row(), flush=True)

    print("\nrelay copies/s against the others (end to end, same run):")
    failed = False
    for case in cases:
        relay = results[(case.label, "relay")].copies_per_second
        sink = results[(case.label, "sink")]
        # What the sink itself takes: transactions of this size a second. A relay sends
        # one transaction per copy, so no relay can pass this many copies a second.
        ceiling = sink.messages / sink.seconds
        line = f"{case.label:<15} relay {relay:>8.1f}"
        if (case.label, "postfix") in results:
            postfix = results[(case.label, "postfix")].copies_per_second
            ok = relay >= GOAL * postfix
            failed |= not ok
            verdict = "meets" if ok else "misses"
            line += f" | postfix {postfix:>8.1f} = {relay / postfix:.2f}x ({verdict} {GOAL:g}x)"
            if GOAL * postfix > ceiling:
                line += f" | {GOAL:g}x is beyond the sink's own {ceiling:.0f} transactions/s"
        line += f" | sink {sink.copies_per_second:>8.1f}"
        print(line)

    if args.delay_ms:
        case = CASES[1]
        messages = max(args.sessions, args.messages // 2)
        print(
            f"\npool scaling: {case.label}, every upstream reply held {args.delay_ms:g} ms"
            f" (delay_proxy.py), {messages} messages"
        )
        for pool in (int(p) for p in args.pools.split(",")):
            result = measure(
                tools,
                case,
                "relay",
                sessions=args.sessions,
                messages=messages,
                pool=pool,
                timeout=args.timeout,
                delay_ms=args.delay_ms,
                workers=args.workers,
            )
            print(f"pool {pool:>3}: {result.copies_per_second:>8.1f} copies/s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
