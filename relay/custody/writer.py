"""Rule 2 of ``relay.custody.spool``: the writer thread and its group commit.

Every write waiting when the thread comes free goes into one transaction, each
in its own savepoint so that one bad operation fails alone; callers are answered
from the thread, one wake-up per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from relay.custody.errors import SpoolError, SpoolFull, full
from relay.custody.queries import count_live
from relay.custody.reserve import Reserve
from relay.custody.rows import Rows
from relay.custody.schema import PAGE_SIZE

log = logging.getLogger("relay.spool")


T = TypeVar("T")
MAX_BATCH = 512  # writes per transaction; bounded so one commit never holds the lock for long
# ``live`` follows this process's own writes exactly; it is also recounted (a scan of the
# index) at most this often, for what other processes (`solo-relay queue`) changed.
LIVE_RECOUNT_SECONDS = 1.0
# Errors about one operation's own data, not the file or the disk: that operation fails alone.
_OWN_FAULT = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError)
MAINTAIN_IDLE_SECONDS = 2.0  # a writer idle this long checkpoints and vacuums
VACUUM_MIN_FREE_PAGES = 64  # fewer free pages than this (1 MiB) are not worth a vacuum
CONVERT_MAX_BYTES = 64 * 1024 * 1024  # live data a one-time VACUUM may rewrite (Rule 7)
VACUUM_MAX_PAGES = 4096  # pages given back per idle moment (64 MiB), so a write never waits long


class Item(NamedTuple):
    """One operation for the writer thread, and the caller's future."""

    operation: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    outcome: bool  # may use the reserve (``submit``)


class Writer:
    """The spool's writer thread: all SQLite work for the relay happens on it (Rule 2)."""

    def __init__(self, rows: Rows, reserve: Reserve) -> None:
        self._rows = rows
        self._reserve = reserve
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.live = 0  # copies queued, delivering or deferred (see LIVE_RECOUNT_SECONDS)
        self._counted_at = 0.0
        self.commits = 0  # transactions committed (each one fsync): group commit at work
        self.maintained = 0  # idle checkpoints and vacuums done (Rule 7)

    def start(self, conn: sqlite3.Connection, live: int) -> None:
        """Run the thread on ``conn`` (opened and recovered: ``live`` copies are live)."""
        self.live = live
        self._thread = threading.Thread(target=self._run, args=(conn,), name="spool", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, close the connection and end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self, conn: sqlite3.Connection) -> None:
        stopping = False
        dirty = False  # written since the last maintenance (Rule 7)
        while not stopping:
            try:
                item = self._queue.get(timeout=MAINTAIN_IDLE_SECONDS if dirty else None)
            except queue.Empty:
                self._maintain(conn)
                dirty = False
                continue
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            try:
                self._commit(conn, batch)
            except Exception as exc:  # the thread must live: every later caller waits on it
                log.exception("spool writer error")
                failure = SpoolError(f"spool writer error: {exc}")
                _answer([(item.future, None, failure) for item in batch])
            dirty = True
        conn.close()

    def _maintain(self, conn: sqlite3.Connection) -> None:
        """Rule 7, on an idle writer: free pages back to the file system, the WAL cut to 0.

        Failures (a full disk, a ``solo-relay queue`` reader holding the WAL) are left
        for the next idle moment: nothing here is needed for custody.
        """
        try:
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            mode = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            # A spool made before Rule 7 (auto_vacuum off): one VACUUM, when it is mostly
            # free pages and small, turns incremental vacuum on from then on.
            used = (pages - free) * PAGE_SIZE
            if (
                not mode
                and free >= VACUUM_MIN_FREE_PAGES
                and free * 2 >= pages
                and (used <= CONVERT_MAX_BYTES)
            ):
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("VACUUM")
                free, mode = 0, 2
            if free >= VACUUM_MIN_FREE_PAGES and mode:
                # Python's sqlite3 steps a statement that returns no row once, and each
                # step of incremental_vacuum frees one page: one statement a page, all in
                # one transaction (one fsync).
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for _ in range(min(free, VACUUM_MAX_PAGES)):
                        conn.execute("PRAGMA incremental_vacuum")
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            self._reserve.ensure()  # made again once the disk has room (relay.custody.reserve)
            self.maintained += 1
        except sqlite3.Error as exc:
            log.info("spool maintenance postponed", extra={"fields": {"error": str(exc)}})

    def _commit(self, conn: sqlite3.Connection, batch: Sequence[Item]) -> None:
        results: list[_Answer] = []
        self._rows.added = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            for operation, future, _ in batch:
                # A caller cancelled before its turn (a dropped session, a drain) is gone:
                # its write is skipped. (Read from this thread, the flag can only be late:
                # a caller cancelled from now on finds its write done, unanswered.)
                if future.cancelled():
                    continue
                conn.execute("SAVEPOINT op")
                files = self._rows.files.mark()
                try:
                    result = operation(conn)
                except _OWN_FAULT as exc:  # this operation's data (a duplicate id): it alone
                    conn.execute("ROLLBACK TO op")
                    self._rows.files.rollback_to(files)
                    own = SpoolError(str(exc))
                    own.__cause__ = exc
                    results.append((future, None, own))
                except sqlite3.DatabaseError:
                    raise  # the disk or the file: the whole transaction is suspect
                except Exception as exc:  # a bad operation fails alone
                    conn.execute("ROLLBACK TO op")
                    self._rows.files.rollback_to(files)
                    results.append((future, None, exc))
                else:
                    results.append((future, result, None))
                conn.execute("RELEASE op")
            self._rows.files.before_commit()
            conn.execute("COMMIT")
            self._rows.files.committed()
        except (sqlite3.DatabaseError, OSError) as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._rows.files.rolled_back()
            failure = SpoolFull(str(exc)) if full(exc) else SpoolError(str(exc))
            if isinstance(failure, SpoolFull) and self._into_reserve(conn, batch, failure):
                return
            log.error("spool write failed", extra={"fields": {"error": str(exc)}})
            results = [(item.future, None, failure) for item in batch]
        else:
            self.commits += 1
            now = time.monotonic()
            if now - self._counted_at < LIVE_RECOUNT_SECONDS:
                self.live += self._rows.added
            else:
                with contextlib.suppress(sqlite3.Error):  # committed: a count never undoes that
                    self.live = count_live(conn)
                    self._counted_at = now
        _answer(results)

    def _into_reserve(
        self, conn: sqlite3.Connection, batch: Sequence[Item], failure: SpoolFull
    ) -> bool:
        """Rule 1 of relay.custody.reserve: a group that failed for want of space and holds outcomes
        gives up the reserve, and the outcomes go again, alone, into the room it gave
        back; new mail in the group fails as it would have. False: no reserve to give."""
        outcomes = [item for item in batch if item.outcome]
        if not outcomes or not self._reserve.release():
            return False
        _answer([(item.future, None, failure) for item in batch if not item.outcome])
        self._commit(conn, outcomes)
        return True

    async def submit(
        self, operation: Callable[[sqlite3.Connection], T], *, outcome: bool = False
    ) -> T:
        """Queue ``operation`` for the writer; ``outcome``: it ends (or hands back) a copy's
        custody after the upstream's reply, and may use the reserve (relay.custody.reserve)."""
        if self._thread is None:
            raise SpoolError("spool is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(Item(operation, future, outcome))
        return await future


_Answer = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _answer(results: Sequence[_Answer]) -> None:
    """Answer a transaction's callers from the writer thread: one wake-up per loop, not each."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
    for answer in results:
        by_loop.setdefault(answer[0].get_loop(), []).append(answer)
    for loop, answers in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is listening
            loop.call_soon_threadsafe(_resolve, answers)


def _resolve(answers: Sequence[_Answer]) -> None:
    """On the callers' loop: answer each, unless it was cancelled meanwhile."""
    for future, result, error in answers:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
