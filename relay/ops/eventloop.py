"""The event loop the relay runs on: uvloop when it is installed, else asyncio's own.

uvloop (a dependency wherever it builds: Linux and macOS) runs the same
asyncio code with its transports and scheduling in C; on this relay it cuts
CPU per copy by about a fifth (``tests/benchmarks/bench_throughput.py``).
The relay's own code never depends on which loop it has: transports are
duck-typed, since uvloop's are not subclasses of ``asyncio.Transport``.
Also here: ``finish_within``, how a stop ends the tasks it cannot wait for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Coroutine
from typing import Any, TypeVar

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")

new_event_loop: Callable[[], asyncio.AbstractEventLoop] = (
    asyncio.new_event_loop if uvloop is None else uvloop.new_event_loop
)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the relay's loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


async def finish_within(
    tasks: Collection[asyncio.Future[Any]], timeout: float
) -> set[asyncio.Future[Any]]:
    """Wait up to ``timeout`` seconds for ``tasks``, then cancel the rest and wait for them
    to end (their ``finally`` clauses run). Returns the tasks that were cancelled."""
    if not tasks:
        return set()
    _, pending = await asyncio.wait(tasks, timeout=max(timeout, 0.0))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return pending
