"""Message bodies in memory, by queue id, for the copies still to be sent.

Every copy of a message shares one body object, so the upstream prepares the
body (scan, dot-stuffing) once per message and the spool is read at most once
per message. The least recently used bodies go first once the total passes
the byte limit; a body larger than the limit is never kept.
"""

from __future__ import annotations

from collections import OrderedDict


class BodyCache:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._views: OrderedDict[str, memoryview] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._views)

    def __repr__(self) -> str:
        return f"<BodyCache {len(self._views)} bodies, {self.bytes} of {self.limit} bytes>"

    def get(self, key: str) -> memoryview | None:
        view = self._views.get(key)
        if view is not None:
            self._views.move_to_end(key)
        return view

    def put(self, key: str, view: memoryview) -> None:
        self.discard(key)
        if len(view) > self.limit:
            return
        self._views[key] = view
        self.bytes += len(view)
        while self.bytes > self.limit:
            _, oldest = self._views.popitem(last=False)
            self.bytes -= len(oldest)

    def discard(self, key: str) -> None:
        view = self._views.pop(key, None)
        if view is not None:
            self.bytes -= len(view)
