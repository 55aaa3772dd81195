"""Shared limits' cost: one relay's throughput with its limits on Redis, against the local limiter.

Run from the repository root (a script, not a test)::

    .venv/bin/python tests/benchmarks/bench_fleet.py                 # the issue's run
    .venv/bin/python tests/benchmarks/bench_fleet.py --messages 200  # a smoke run

It needs Postfix's ``smtp-source`` and ``smtp-sink`` (``bench_throughput.py --install``)
and ``redis-server`` (Debian package ``redis-server``). Issue 17's goal: with the shared
store on, single-relay throughput within 10% of the local limiter's.

Each case drives ``solo-relay serve`` (its defaults, one worker) with ``smtp-source``
into a fresh ``smtp-sink``, three ways, in the same run:

``upstream``
    ``[upstream]`` alone, no limit: the relay as most users run it (the reference).
``local``
    ``[[upstreams]]`` of one, with a rate and a daily quota far above the load: the
    router and its local limiter take a token for every copy.
``shared``
    the same on ``fleet.store`` (a ``redis-server`` on a free loopback port): every
    grant is a Lua script on Redis, ``fleet.batch`` tokens a round trip.

Printed: copies/s end to end and CPU seconds per 1,000 copies (the relay's process;
Redis's own CPU on the line below), and the ratio shared / local.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_throughput import (
    CASES,
    HEADER,
    Relay,
    Result,
    Sink,
    find_tools,
    free_port,
    source,
    stop,
    wait_listening,
)

HIGH_RATE = "1000000"  # copies per second and per day far above any load here


def redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: apt-get install redis-server")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
    )
    wait_listening(port, process, "redis-server")
    return process, port


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mode_env(mode: str, sink_port: int, store_port: int) -> dict[str, str | None]:
    if mode == "upstream":
        return {}
    env: dict[str, str | None] = {
        "RELAY_UPSTREAM": None,
        "RELAY_UPSTREAMS": "provider",
        "RELAY_UPSTREAMS_PROVIDER_URL": f"smtp+plain://127.0.0.1:{sink_port}",
        "RELAY_UPSTREAMS_PROVIDER_RATE_PER_SECOND": HIGH_RATE,
        "RELAY_UPSTREAMS_PROVIDER_RATE_PER_DAY": HIGH_RATE,
    }
    if mode == "shared":
        env["RELAY_FLEET_STORE"] = f"redis://127.0.0.1:{store_port}/0"
    return env


def run(
    tools: dict[str, str], case_index: int, mode: str, *, messages: int, reuse: bool, store: int
) -> Result:
    case = CASES[case_index]
    sink = Sink(tools["smtp-sink"])
    relay = Relay(sink.port, None, None, extra_env=mode_env(mode, sink.port, store))
    try:
        cpu = relay.cpu_seconds()
        started = time.perf_counter()
        source(tools["smtp-source"], relay.port, 20, messages, case, reuse=reuse)
        accepted = time.perf_counter()
        done = sink.wait_for(messages * case.rcpts, timeout=600)
        cpu = relay.cpu_seconds() - cpu
    finally:
        relay.close()
        sink.close()
    return Result(
        mode, case, messages, messages * case.rcpts, done - started, accepted - started, [], cpu
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per case (default 2000)")
    args = parser.parse_args()
    tools = find_tools()
    if tools is None:
        print(
            "smtp-source and smtp-sink are missing: bench_throughput.py --install", file=sys.stderr
        )
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    store, store_port = redis(scratch)
    try:
        print(HEADER + "  connections")
        for case_index in (0, 1):  # 1 and 10 recipients, 5 KB
            for reuse in (False, True):
                results = {}
                for mode in ("upstream", "local", "shared"):
                    redis_cpu = cpu_seconds(store.pid)
                    result = run(
                        tools,
                        case_index,
                        mode,
                        messages=args.messages,
                        reuse=reuse,
                        store=store_port,
                    )
                    redis_cpu = cpu_seconds(store.pid) - redis_cpu
                    results[mode] = result
                    print(result.row() + ("  reused" if reuse else "  new per message"))
                    if mode == "shared":
                        print(
                            f"{'':<15} redis    cpu/1k copies"
                            f" {redis_cpu / result.copies * 1000:.3f}"
                        )
                ratio = results["shared"].copies_per_second / results["local"].copies_per_second
                cpu = (results["shared"].cpu or 0) / max(results["local"].cpu or 0, 1e-9)
                print(f"{'':<15} shared/local: copies/s {ratio:.2f}x, relay CPU {cpu:.2f}x\n")
    finally:
        stop(store)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
