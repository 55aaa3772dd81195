"""Body sharing: one body object per message, loaded from the spool at most once at a time."""

from __future__ import annotations

import asyncio

from relay.custody.bodycache import BodyCache
from relay.custody.spool import Spool


class SharedBodies:
    """The bodies of copies waiting or in flight (``cache``), and loads in progress."""

    def __init__(self, spool: Spool, cache: BodyCache) -> None:
        self._spool = spool
        # Bodies by message: one object per message, so the upstream's per-body
        # preparation (scan, stuffing) happens once, not per copy; loads in progress.
        self.cache = cache
        self._loading: dict[str, asyncio.Future[memoryview | None]] = {}

    def __repr__(self) -> str:
        return f"<SharedBodies {self.cache!r} loading={len(self._loading)}>"

    async def body(self, message_id: str) -> memoryview | None:
        """The message body as one shared view: the upstream prepares it once per message.

        Copies of one message are claimed together and start together: the first
        one loads the body, and the others wait for that load instead of repeating it.
        """
        view = self.cache.get(message_id)
        if view is not None:
            return view
        loading = self._loading.get(message_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load_body(message_id))
            self._loading[message_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(message_id, None))
        return await asyncio.shield(loading)

    async def _load_body(self, message_id: str) -> memoryview | None:
        body = await self._spool.body(message_id)
        if body is None:
            return None
        view = memoryview(body)
        self.cache.put(message_id, view)
        return view
