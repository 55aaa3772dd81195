"""The event loop the relay runs on: uvloop when it is installed, else asyncio's own.

uvloop (a dependency wherever it builds: Linux and macOS) runs the same
asyncio code with its transports and scheduling in C; on this relay it cuts
CPU per copy by about a fifth (``tests/benchmarks/bench_throughput.py``).
The relay's own code never depends on which loop it has: transports are
duck-typed, since uvloop's are not subclasses of ``asyncio.Transport``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
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
