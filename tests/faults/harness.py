"""The fault suite's tools: a small tmpfs to fill, a restartable recording upstream, load.

Real processes only: ``solo-relay serve`` subprocesses (``tests/test_crash.py``
starts them), a recording upstream in the test's loop, and a file system of
a few megabytes that the test fills to 100 % (``mount -t tmpfs -o size=...``:
root only; without it the tests that need it are skipped, saying why).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.relay_harness import submit
from tests.upstream_server import UpstreamServer

SENDER = "app@example.org"
RECIPIENTS = ("alice@example.com", "bob@example.net")
_MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "6m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``; skips the test when mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill ``directory``'s file system to 100 % with one file; returns it (remove to free)."""
    filler = directory / f"filler-{len(list(directory.glob('filler-*')))}"
    block = b"\0" * 65536
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(descriptor, block[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(descriptor)
    return filler


def free(filler: Path, room: int | None = None) -> None:
    """Give the space back: all of it, or only ``room`` bytes (space that comes back partly)."""
    if room is None:
        filler.unlink(missing_ok=True)
    else:
        os.truncate(filler, max(filler.stat().st_size - room, 0))


class RestartableUpstream(UpstreamServer):
    """A recording upstream that can be killed and started again on the same port."""

    async def start(self) -> RestartableUpstream:
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                self._protocol, self.host, self.port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for protocol in self._protocols:
            if protocol.transport is not None:
                protocol.transport.abort()
        self._protocols.clear()
        await self._server.wait_closed()
        self._server = None

    def counts(self) -> Counter[tuple[str, str]]:
        """Copies received, by (Message-ID, recipient)."""
        seen: Counter[tuple[str, str]] = Counter()
        for t in self.transactions:
            found = _MESSAGE_ID.search(t.content.split(b"\r\n\r\n", 1)[0])
            name = found.group(1).decode() if found else "?"
            for rcpt in t.rcpt_tos:
                seen[(name, rcpt)] += 1
        return seen


def check_repeats(upstream: UpstreamServer, marks: list[int]) -> int:
    """How many copies arrived more than once; fails unless each repeat has a fault between.

    ``marks`` are ``len(upstream.transactions)`` at each fault (a relay killed, the
    upstream gone): a copy may arrive again only after a fault that came after it
    arrived, the one window SPEC 5 allows (the relay never saw, or never wrote down,
    the upstream's 250).
    """
    arrivals: dict[tuple[str, str], list[int]] = {}
    for index, t in enumerate(upstream.transactions):
        found = _MESSAGE_ID.search(t.content.split(b"\r\n\r\n", 1)[0])
        name = found.group(1).decode() if found else "?"
        for rcpt in t.rcpt_tos:
            arrivals.setdefault((name, rcpt), []).append(index)
    repeats = 0
    for key, indices in arrivals.items():
        for before, after in itertools.pairwise(indices):
            assert any(before < mark <= after for mark in marks), (key, indices, marks)
            repeats += 1
    return repeats


def message(name: str, recipients: tuple[str, ...] = RECIPIENTS, size: int = 2000) -> bytes:
    line = b"A line of the body, to make the message the size it should be.\r\n"
    return (
        f"From: App <{SENDER}>\r\nTo: {', '.join(recipients)}\r\n"
        f"Subject: fault suite\r\nMessage-ID: <{name}>\r\n\r\n"
    ).encode() + line * max(1, size // len(line))


async def send(
    port: int, name: str, recipients: tuple[str, ...] = RECIPIENTS, size: int = 2000
) -> str:
    """One message named ``name`` over one connection; its final reply ("" when cut)."""
    return await submit(port, message(name, recipients, size), recipients, sender=SENDER)


@dataclass
class Load:
    """Messages sent one after another to whichever relay is up; what each one was told."""

    port: int = 0
    acknowledged: set[tuple[str, str]] = field(default_factory=set)
    replies: Counter[str] = field(default_factory=Counter)
    sent: int = 0

    async def run(self, stop: asyncio.Event, prefix: str = "load") -> None:
        while not stop.is_set():
            self.sent += 1
            name = f"{prefix}-{self.sent}@example.org"
            reply = await send(self.port, name) if self.port else ""
            self.replies[reply[:3] or "none"] += 1
            assert not reply.startswith("5"), reply
            if reply.startswith("250"):
                self.acknowledged.update((name, rcpt) for rcpt in RECIPIENTS)
            elif not reply:
                await asyncio.sleep(0.01)  # the relay is down: try again soon


def run_to_exit(
    env: dict[str, str], cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``solo-relay serve`` expected to stop by itself (a start-up refused)."""
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def quarantined(spool: Path) -> list[str]:
    directory = spool / "quarantine"
    return sorted(os.listdir(directory)) if directory.is_dir() else []
