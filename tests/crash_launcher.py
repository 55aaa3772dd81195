"""Test-only entry point: ``solo-relay serve``, SIGKILLed at one named point (SPEC 9).

``python tests/crash_launcher.py POINT`` takes the same environment as ``python
-m relay serve``. It patches one relay internal so that the process kills itself
with SIGKILL (no handler, no cleanup, no flush) when it reaches ``POINT``, then
runs the relay as ``serve`` would. It lives under ``tests/`` and is never
installed: nothing in ``relay/`` can crash a production relay on purpose.

Points (the fifth, ``during-upstream``, is driven from the test: the recording
upstream holds the final dot's reply and the test kills the process):

- ``during-data``: the DATA collector gets its second block (part of the message is in).
- ``after-spool-write``: the spool write is durable, before the reply is written.
- ``after-250``: right after ``250 2.0.0 OK: queued as ...`` is written to the client.
- ``after-upstream-250``: the upstream answered 250, before the ``delivered`` state write.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from relay.cli import main as cli
from relay.core.dotstream import DataCollector
from relay.custody.spool import CopyState, NewMessage, Spool
from relay.inbound.smtp import RelaySMTP


def die() -> NoReturn:
    """SIGKILL this process now: what a power cut or the OOM killer does."""
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL cannot be caught")


def during_data() -> None:
    feed = DataCollector.feed
    blocks = 0

    def killing_feed(self: DataCollector, block: bytes) -> bytes | None:
        nonlocal blocks
        blocks += 1
        if blocks == 2:
            die()
        return feed(self, block)

    DataCollector.feed = killing_feed  # type: ignore[method-assign]


def after_spool_write() -> None:
    store = Spool.store

    async def killing_store(self: Spool, message: NewMessage) -> None:
        await store(self, message)
        die()

    Spool.store = killing_store  # type: ignore[method-assign]


def after_250() -> None:
    push = RelaySMTP.push

    async def killing_push(self: RelaySMTP, status: Any) -> None:
        await push(self, status)
        if isinstance(status, str) and status.startswith("250 2.0.0 OK: queued"):
            die()

    RelaySMTP.push = killing_push  # type: ignore[method-assign]


def after_upstream_250() -> None:
    record = Spool.record

    async def killing_record(self: Spool, copy_id: int, state: CopyState, **kwargs: Any) -> None:
        if state is CopyState.DELIVERED:
            die()
        await record(self, copy_id, state, **kwargs)

    async def killing_record_delivered(self: Spool, copy_id: int, **kwargs: Any) -> None:
        die()

    Spool.record = killing_record  # type: ignore[method-assign]
    Spool.record_delivered = killing_record_delivered  # type: ignore[method-assign]


POINTS: dict[str, Callable[[], None]] = {
    "during-data": during_data,
    "after-spool-write": after_spool_write,
    "after-250": after_250,
    "after-upstream-250": after_upstream_250,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in POINTS:
        print(f"usage: crash_launcher.py {{{','.join(POINTS)}}}", file=sys.stderr)
        return 2
    POINTS[argv[0]]()
    return cli.main(["serve"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
