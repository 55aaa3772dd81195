"""Delivered copies recorded in batches: one operation for every copy that reports
while a batch waits for the writer.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from dataclasses import dataclass, field

from relay.core.model import Outcome
from relay.custody.records import LIVE_BYTES, CopyState
from relay.custody.rows import Rows
from relay.custody.writer import Writer


@dataclass(slots=True)
class _DeliveredBatch:
    """Copies delivered, waiting to be recorded in one operation (``record_delivered``)."""

    items: list[tuple[int, float, int, Outcome]] = field(default_factory=list)
    task: asyncio.Future[set[int]] | None = None


class DeliveredBatches:
    """``Spool.record_delivered``: the open batch, and the one write of each batch."""

    def __init__(self, writer: Writer, rows: Rows) -> None:
        self._writer = writer
        self._rows = rows
        self._delivered: _DeliveredBatch | None = None  # the open batch
        self._delivered_lock = threading.Lock()  # shared with the writer thread

    async def record(self, copy_id: int, *, now: float, attempts: int, outcome: Outcome) -> bool:
        """``record(copy_id, DELIVERED, ...)``, batched with other copies delivered meanwhile.

        The workers finish hundreds of copies a second: every copy that reports while
        a batch waits for the writer joins it, and the batch is one operation (a
        few statements for all its copies) instead of one each.
        """
        with self._delivered_lock:
            batch = self._delivered
            # A batch whose write already ended (it failed before closing itself: a lock
            # held too long, the disk full for another write of its group) takes no more.
            if batch is None or (batch.task is not None and batch.task.done()):
                batch = self._delivered = _DeliveredBatch()
            batch.items.append((copy_id, now, attempts, outcome))
        if batch.task is None:  # the first in this batch (all callers are on one loop)
            batch.task = asyncio.ensure_future(
                self._writer.submit(functools.partial(self._write, batch), outcome=True)
            )
        found = await asyncio.shield(batch.task)
        return copy_id in found

    def _write(self, batch: _DeliveredBatch, conn: sqlite3.Connection) -> set[int]:
        with self._delivered_lock:  # closed: later copies start the next batch
            if self._delivered is batch:
                self._delivered = None
            items = list(batch.items)
        found: dict[int, tuple[str, bytes]] = {}
        for start in range(0, len(items), 500):  # within SQLite's limit on parameters
            ids = [item[0] for item in items[start : start + 500]]
            marks = ",".join("?" * len(ids))
            for copy_id, message_id, state in conn.execute(
                f"SELECT id, message, CAST(state AS BLOB) FROM copies WHERE id IN ({marks})",
                ids,
            ):
                found[copy_id] = (message_id, state)
        conn.executemany(
            "UPDATE copies SET state = ?, next_try = 0, attempts = ?, last_code = ?,"
            " last_enhanced = ?, last_text = ?, updated = ? WHERE id = ?",
            [
                (
                    CopyState.DELIVERED.value,
                    attempts,
                    outcome.code,
                    outcome.enhanced,
                    outcome.text[:500],
                    now,
                    copy_id,
                )
                for copy_id, now, attempts, outcome in items
                if copy_id in found
            ],
        )
        self._rows.added -= sum(state in LIVE_BYTES for _, state in found.values())
        if found:
            self._rows.keep_history(conn, sorted(found), max(item[1] for item in items))
        for message_id in {message_id for message_id, _ in found.values()}:
            self._rows.drop_if_done(conn, message_id)
        return set(found)
