"""Message bodies in memory, by queue id, while copies of them wait or are in flight.

Every copy of a message shares one body object, so the upstream prepares the
body (scan, dot-stuffing) once per message and the spool is read at most once
per message. A body is held from the moment copies of it are expected
(handed over by intake, or claimed from the spool) until the last of those
copies is done, and dropped then: the cache never evicts a body that copies
are still waiting for (an LRU did, and under a backlog of large messages
re-read almost every body from the spool), and never keeps one nobody needs.
"""

from __future__ import annotations


class BodyCache:
    def __init__(self) -> None:
        self._views: dict[str, memoryview] = {}
        self._pending: dict[str, int] = {}
        self.bytes = 0  # of the bodies held

    def __repr__(self) -> str:
        return f"<BodyCache {len(self._views)} bodies, {self.bytes} bytes>"

    def expect(self, key: str, copies: int = 1) -> None:
        """``copies`` more copies of message ``key`` will want its body."""
        self._pending[key] = self._pending.get(key, 0) + copies

    def put(self, key: str, view: memoryview) -> None:
        """The body of an expected message (ignored when no copy expects it any more)."""
        if key in self._pending and key not in self._views:
            self._views[key] = view
            self.bytes += len(view)

    def get(self, key: str) -> memoryview | None:
        return self._views.get(key)

    def done(self, key: str) -> None:
        """One expected copy of ``key`` is finished; the body goes with the last."""
        left = self._pending.get(key, 0) - 1
        if left > 0:
            self._pending[key] = left
            return
        self._pending.pop(key, None)
        view = self._views.pop(key, None)
        if view is not None:
            self.bytes -= len(view)
