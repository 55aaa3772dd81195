"""`solo-relay serve` and `solo-relay check` as processes, the way a user starts them."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    """The relay with the embedded defaults, but on free ports, in an empty directory."""
    env = {**os.environ, "RELAY_LISTEN": "127.0.0.1:0", "RELAY_METRICS_LISTEN": "127.0.0.1:0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    try:
        yield process, json.loads(line)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def wait_for_files(directory: Path, count: int, timeout: float = 15.0) -> list[Path]:
    """Queue mode answers before it delivers: wait (bounded) for the copies to land."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(directory.glob("*.eml"))
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_serve_with_defaults_writes_copies_to_the_outbox(
    tmp_path: Path, relay_process: tuple[subprocess.Popen[str], dict[str, object]]
) -> None:
    """No configuration: queued, then each recipient's copy appears in ./outbox; SIGTERM stops."""
    process, listening = relay_process
    assert listening["event"] == "listening" and listening["upstream"] == "outbox:./outbox"
    # uvloop is a dependency: the relay runs on it (relay/eventloop.py), asyncio's loop otherwise.
    expected_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    assert listening["loop"] == expected_loop
    port = int(str(listening["smtp"]).rsplit(":", 1)[1])
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(
            "news@example.org",
            ["alice@example.com", "bob@example.com"],
            b"From: news@example.org\r\nTo: alice@example.com, bob@example.com\r\n"
            b"Subject: first message\r\n\r\nHello\r\n",
        )
    copies = wait_for_files(tmp_path / "outbox", 2)
    to_lines = sorted(
        line
        for path in copies
        for line in path.read_bytes().split(b"\r\n")
        if line.startswith(b"To:")
    )
    assert to_lines == [b"To: alice@example.com", b"To: bob@example.com"]
    assert not any(b"example" in path.name.encode() for path in copies)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert process.stderr is not None
    events = [json.loads(line)["event"] for line in process.stderr.read().splitlines()]
    # The files can appear before the spool records them delivered: that line may
    # come after "stopping", as the drain lets a delivery in flight finish.
    assert events[-1] == "stopped" and "stopping" in events
    assert events.count("copy delivered") == 2


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_check_reports_the_configuration(tmp_path: Path) -> None:
    """`check` validates and prints what would be used; the password never shows."""
    result = run_cli(
        "check",
        env={
            "RELAY_UPSTREAM": "smtps://app@smtp.example.net:465",
            "RELAY_UPSTREAM_PASSWORD": "hunter2",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    assert "smtp.example.net" in result.stdout and "hunter2" not in result.stdout


def test_check_upstream_with_the_outbox(tmp_path: Path) -> None:
    """`check --upstream` on an outbox reports its steps and succeeds."""
    result = run_cli("check", "--upstream", env={"RELAY_UPSTREAM": f"outbox:{tmp_path / 'box'}"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_check_upstream_that_is_down_fails(tmp_path: Path) -> None:
    """`check --upstream` against a closed port says which step failed and exits 1."""
    result = run_cli("check", "--upstream", env={"RELAY_UPSTREAM": "smtp+plain://127.0.0.1:9"})
    assert result.returncode == 1
    assert "FAIL" in result.stdout


def test_bad_configuration_stops_the_start_with_one_line() -> None:
    """A bad key: exit 2 and one line on stderr that names it; no traceback."""
    result = run_cli("serve", env={"RELAY_SMTP_MAX_RECIPIENTS": "lots"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "RELAY_SMTP_MAX_RECIPIENTS" in result.stderr and "Traceback" not in result.stderr
