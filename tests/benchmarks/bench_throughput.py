"""End-to-end throughput: Postfix's ``smtp-source`` into the relay, the relay into ``smtp-sink``.

Run from the repository root (it is a script, not a test: pytest does not collect it)::

    .venv/bin/python tests/benchmarks/bench_throughput.py                  # 1,000 messages a case
    .venv/bin/python tests/benchmarks/bench_throughput.py --messages 200   # a smoke run
    .venv/bin/python tests/benchmarks/bench_throughput.py --install        # apt-get postfix first

It needs ``smtp-source`` and ``smtp-sink`` from Postfix (Debian package ``postfix``); when
they are missing it prints the command that installs them, or runs it with ``--install``.

Cases (issue 5): messages of 5 KB to 1, 10 and 100 recipients, and messages of 1 MB to
10 recipients. For each, a fresh ``smtp-sink`` listens on a free loopback port and
counts what it receives (its ``-c`` running counter: one ``mesg`` per transaction, and
the relay delivers one transaction per copy); the relay starts in ``queue`` mode (the
default) on a fresh spool pointed at the sink; ``smtp-source`` drives it with 20
parallel sessions that reuse their connection (``-d``); the clock stops when the sink has
every copy, bounded by ``--timeout``. Printed per case: messages/s and copies/s end to
end, the acceptance rate alone (``smtp-source`` done), relay CPU seconds (user + system
from ``/proc/PID/stat``, counted from just before the load) per 1,000 copies, and peak
RSS (``VmHWM`` from ``/proc/PID/status``). The same run measures ``smtp-source``
straight into ``smtp-sink`` (the ceiling: no splitting, one transaction per message)
and prints relay/sink ratios. The message count per case scales with the work: the
100-recipient case sends a tenth of ``--messages``, the 1 MB case a twentieth.

Postfix itself as a splitting relay (``smtp_destination_recipient_limit = 1``) is not
set up here: the script prints "postfix relay: not measured".
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("smtp-source", "smtp-sink")
TOOL_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
INSTALL = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postfix"
KB = 1024
MESG = re.compile(rb"mesg=(\d+)")


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


@dataclass(frozen=True)
class Result:
    target: str  # "sink" (the ceiling) or "relay"
    case: Case
    messages: int
    seconds: float  # until the sink has every copy
    accept_seconds: float  # until smtp-source is done
    cpu: float | None = None  # relay user + system seconds during the load
    peak_rss_kb: int | None = None

    @property
    def copies(self) -> int:
        return self.messages * self.case.rcpts

    def row(self) -> str:
        cpu = f"{self.cpu / self.copies * 1000:>9.2f}" if self.cpu is not None else f"{'-':>9}"
        rss = f"{self.peak_rss_kb / KB:>8.1f}" if self.peak_rss_kb is not None else f"{'-':>8}"
        return (
            f"{self.case.label:<16} {self.target:<6} {self.messages:>6} {self.copies:>7}"
            f" {self.messages / self.seconds:>9.1f} {self.copies / self.seconds:>10.1f}"
            f" {self.messages / self.accept_seconds:>10.1f} {cpu} {rss}"
        )


HEADER = (
    f"{'case':<16} {'target':<6} {'msgs':>6} {'copies':>7} {'msg/s':>9} {'copies/s':>10}"
    f" {'accept/s':>10} {'cpu s/1k':>9} {'RSS MB':>8}"
)


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
    """``smtp-sink -c`` on a free port; ``count`` is its running total of messages."""

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
        """Block until the sink has ``target`` messages; return the time, raise on timeout."""
        deadline = time.perf_counter() + timeout
        while self.count < target:
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"smtp-sink has {self.count} of {target} after {timeout} s")
            time.sleep(0.002)
        return time.perf_counter()

    def close(self) -> None:
        stop(self.process)


class Relay:
    """The relay as a subprocess, queue mode, delivering to ``upstream_port``."""

    def __init__(self, upstream_port: int, pool_size: int) -> None:
        self.spool = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
        self.port = free_port()
        env = {
            **os.environ,
            "RELAY_LISTEN": f"127.0.0.1:{self.port}",
            "RELAY_METRICS_LISTEN": "127.0.0.1:0",
            "RELAY_SPOOL_DIR": str(self.spool),
            "RELAY_SPOOL_MIN_FREE_BYTES": "0",
            "RELAY_UPSTREAM": f"smtp+plain://127.0.0.1:{upstream_port}",
            "RELAY_UPSTREAM_POOL_SIZE": str(pool_size),
            "RELAY_SMTP_MAX_CONNECTIONS": "1000",
            "RELAY_SMTP_MAX_RECIPIENTS": "10000",
            "RELAY_LOG_LEVEL": "warning",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"], env=env, cwd=ROOT, stderr=subprocess.PIPE
        )
        self.log: collections.deque[bytes] = collections.deque(maxlen=20)
        # Keep reading its log, or a full pipe would stall the relay mid-benchmark.
        threading.Thread(target=self._drain, daemon=True).start()
        wait_listening(self.port, self.process, "the relay")

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the relay process, from ``/proc/PID/stat``."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # fields from 3 (state) on
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM in /proc/PID/status")

    def close(self) -> None:
        stop(self.process)
        shutil.rmtree(self.spool, ignore_errors=True)


def source(binary: str, port: int, sessions: int, messages: int, case: Case) -> None:
    command = [
        binary,
        "-d",  # keep the session open for the next message
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


def measure_sink(tools: dict[str, str], case: Case, sessions: int, messages: int) -> Result:
    sink = Sink(tools["smtp-sink"])
    try:
        started = time.perf_counter()
        source(tools["smtp-source"], sink.port, sessions, messages, case)
        accepted = time.perf_counter()
        done = sink.wait_for(messages, timeout=60)
    finally:
        sink.close()
    return Result("sink", case, messages, done - started, accepted - started)


def measure_relay(
    tools: dict[str, str], case: Case, sessions: int, messages: int, *, pool: int, timeout: float
) -> Result:
    sink = Sink(tools["smtp-sink"])
    relay: Relay | None = None
    try:
        relay = Relay(sink.port, pool)
        cpu = relay.cpu_seconds()
        started = time.perf_counter()
        source(tools["smtp-source"], relay.port, sessions, messages, case)
        accepted = time.perf_counter()
        done = sink.wait_for(messages * case.rcpts, timeout=timeout)
        cpu = relay.cpu_seconds() - cpu
        peak = relay.peak_rss_kb()
        time.sleep(0.2)  # any copy delivered twice would show up now
        if sink.count != messages * case.rcpts:
            raise RuntimeError(f"smtp-sink has {sink.count} copies, {messages * case.rcpts} sent")
    except Exception:
        if relay is not None:
            sys.stderr.write(b"".join(relay.log).decode(errors="replace"))
        raise
    finally:
        if relay is not None:
            relay.close()
        sink.close()
    return Result("relay", case, messages, done - started, accepted - started, cpu, peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="messages in the 5 KB cases")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s")
    parser.add_argument("--pool-size", type=int, default=20, help="RELAY_UPSTREAM_POOL_SIZE")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a case may take")
    parser.add_argument("--install", action="store_true", help="apt-get install postfix if needed")
    args = parser.parse_args()

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

    print(
        f"smtp-source -s {args.sessions} -d into smtp-sink (the ceiling) and into the relay"
        f" (queue mode, upstream pool {args.pool_size}) delivering to smtp-sink;"
        f" {os.cpu_count()} CPUs"
    )
    print(HEADER)
    ratios: list[str] = []
    for case in CASES:
        messages = max(args.sessions, args.messages // case.share)
        ceiling = measure_sink(tools, case, args.sessions, messages)
        print(ceiling.row(), flush=True)
        relay = measure_relay(
            tools, case, args.sessions, messages, pool=args.pool_size, timeout=args.timeout
        )
        print(relay.row(), flush=True)
        ours, best = relay.messages / relay.seconds, ceiling.messages / ceiling.seconds
        ratios.append(f"{case.label:<16} {ours:>9.1f} / {best:>9.1f} msg/s = {ours / best:.3f}")
    print("\nratios relay / sink (end-to-end messages per second):")
    print("\n".join(ratios))
    print("postfix relay: not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
