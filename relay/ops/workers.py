"""Several worker processes behind one listener (``workers`` above 1).

One Python process is one core at most. With ``workers = N`` the ``serve``
process becomes a supervisor that binds the SMTP socket and starts N worker
processes (``solo-relay serve --worker K/N``), each a complete relay on that
shared socket: the kernel hands each new connection to one of them.

Rule 1: shared nothing but the socket. Each worker has its own spool
(``spool_dir``), its own delivery and upstream pool, and its share of the
limits (``share``), so custody, recovery and ordering are exactly those of a
single relay, once per worker. Spools of workers beyond the count (a run with
more workers before) are delivered by the first worker (``orphaned_spools``).
Rule 2: one operations endpoint. Workers record metrics in
``PROMETHEUS_MULTIPROC_DIR`` and report readiness in a status file there,
once a second; the supervisor serves ``/metrics`` (their sum), ``/healthz``
and ``/readyz`` (ready when every worker is) on ``metrics.listen``.
Rule 3: workers live and die with the supervisor. A worker that exits on its
own is started again after ``RESTART_DELAY`` (its spool is recovered as after
any crash); a worker whose supervisor is gone (its lifeline pipe closed) stops
as on SIGTERM; SIGTERM to the supervisor is passed on, and it waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from relay import __version__
from relay.config import LISTEN_BACKLOG, SHUTDOWN_GRACE, Config, Mode
from relay.custody.spool import check_unlocked
from relay.ops.health import HealthServer, read_status
from relay.ops.logs import flush as flush_logs
from relay.ops.logs import flush_periodically

log = logging.getLogger("relay.workers")

RESTART_DELAY = 1.0  # seconds before a worker that exited is started again
STOP_MARGIN = 15.0  # beyond the workers' own grace and drain times, then SIGKILL
WORKER_DIR = "worker-{}"


def spool_dir(config: Config, index: int) -> Path:
    """Worker ``index``'s spool: ``spool.dir`` for the first (as with one process)."""
    base = Path(config.spool.dir)
    return base if index == 0 else base / WORKER_DIR.format(index)


def spool_dirs(config: Config) -> list[Path]:
    """Every spool under ``spool.dir``: its own, then each worker's (``solo-relay queue``)."""
    base = Path(config.spool.dir)
    found = [base]
    if base.is_dir():
        numbered = ((_worker_index(p), p) for p in base.glob(WORKER_DIR.format("*")))
        found += [p for _, p in sorted((i, p) for i, p in numbered if i is not None)]
    return found


def _worker_index(path: Path) -> int | None:
    """K for a directory named ``worker-K``, else None."""
    number = path.name.removeprefix(WORKER_DIR.format(""))
    return int(number) if number.isdigit() else None


def share(config: Config, index: int, count: int) -> Config:
    """Worker ``index`` of ``count``'s configuration: its spool and its share of the limits."""

    def part(total: int) -> int:
        return max(1, math.ceil(total / count))

    delivery = config.delivery
    shared = bool(config.fleet.store)  # the store counts for every worker: no division
    upstreams = tuple(
        replace(
            r,
            pool_size=part(r.pool_size),
            rate_per_second=r.rate_per_second if shared else r.rate_per_second / count,
            rate_per_day=r.rate_per_day if shared or not r.rate_per_day else part(r.rate_per_day),
        )
        for r in config.upstreams
    )
    return replace(
        config,
        workers=1,
        upstreams=upstreams,
        # Each worker is one more replica to the store: its local share while it is away.
        fleet=replace(config.fleet, expected_replicas=config.fleet.expected_replicas * count),
        smtp=replace(config.smtp, max_connections=part(config.smtp.max_connections)),
        upstream=replace(config.upstream, pool_size=part(config.upstream.pool_size)),
        delivery=replace(
            delivery,
            concurrency=part(delivery.concurrency) if delivery.concurrency else 0,
            max_queued=part(delivery.max_queued),
            rate_per_second=delivery.rate_per_second / count,
            rate_per_day=part(delivery.rate_per_day) if delivery.rate_per_day else 0,
        ),
        metrics=replace(config.metrics, listen="127.0.0.1:0"),  # the supervisor serves these
        spool=replace(config.spool, dir=str(spool_dir(config, index))),
    )


def orphaned_spools(config: Config) -> list[Path]:
    """Spools of workers beyond ``workers`` (left by a run with more); the first worker
    delivers what they hold (``Relay(orphans=...)``) and sends them no new mail.
    """
    return [
        path
        for path in spool_dirs(config)[1:]
        if (_worker_index(path) or 0) >= config.workers and (path / "spool.db").exists()
    ]


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    """What ``serve --worker`` is given by its supervisor."""

    index: int
    count: int
    listen_fd: int
    lifeline_fd: int
    status_file: Path


class Supervisor:
    """Starts, watches and stops the workers; serves their operations endpoint."""

    def __init__(self, config: Config, config_path: str | None) -> None:
        self.config = config
        self._config_path = config_path
        self._stop = asyncio.Event()
        self._workers: dict[int, asyncio.subprocess.Process] = {}
        self._directory = Path(tempfile.mkdtemp(prefix="solo-relay-workers-"))
        self._sock: socket.socket | None = None
        self._lifeline: tuple[int, int] | None = None
        self._health: HealthServer | None = None
        self.smtp_port = 0
        self.metrics_port = 0

    def __repr__(self) -> str:
        return f"<Supervisor workers={len(self._workers)} smtp={self.smtp_port}>"

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            watchers = [asyncio.create_task(self._watch(i)) for i in range(self.config.workers)]
            flusher = asyncio.create_task(flush_periodically())
            await self._stop.wait()
            log.info("stopping", extra={"fields": {"workers": len(self._workers)}})
            await self._stop_workers()  # the handlers stay: a second signal changes nothing
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for task in (*watchers, flusher):
                task.cancel()
        finally:
            await self._close()
        log.info("stopped")
        flush_logs()

    async def _start(self) -> None:
        config = self.config
        for index in range(config.workers):  # another relay on a worker's spool: one line
            check_unlocked(spool_dir(config, index))
        listen = config.listen_address
        self._sock = socket.create_server(
            (listen.host, listen.port), backlog=LISTEN_BACKLOG, reuse_port=False
        )
        self._sock.set_inheritable(True)
        self.smtp_port = int(self._sock.getsockname()[1])
        read_end, write_end = os.pipe()  # the workers' lifeline: EOF when we are gone
        os.set_inheritable(read_end, True)
        self._lifeline = (read_end, write_end)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._directory))  # type: ignore[no-untyped-call]
        self._health = HealthServer(registry, self._ready)
        metrics = config.metrics_address
        self.metrics_port = await self._health.start(metrics.host, metrics.port)
        for index in range(config.workers):
            await self._spawn(index)
        log.info(
            "listening",
            extra={
                "fields": {
                    "smtp": f"{listen.host}:{self.smtp_port}",
                    "metrics": f"{metrics.host}:{self.metrics_port}",
                    "workers": config.workers,
                    "version": __version__,
                }
            },
        )

    def _status_file(self, index: int) -> Path:
        return self._directory / f"worker-{index}.status"

    async def _spawn(self, index: int) -> None:
        assert self._sock is not None and self._lifeline is not None
        command = [sys.executable, "-m", "relay", "serve"]
        if self._config_path:
            command += ["--config", self._config_path]
        command += [
            f"--worker={index}/{self.config.workers}",
            f"--listen-fd={self._sock.fileno()}",
            f"--lifeline-fd={self._lifeline[0]}",
            f"--status-file={self._status_file(index)}",
        ]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._directory)}
        # A session of its own: a Ctrl-C to the terminal's process group reaches the
        # supervisor, which passes SIGTERM on, not every worker at once.
        self._workers[index] = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            pass_fds=(self._sock.fileno(), self._lifeline[0]),
            start_new_session=True,
        )

    async def _watch(self, index: int) -> None:
        """Start worker ``index`` again whenever it exits while the relay is running."""
        while True:
            process = self._workers[index]
            status = await process.wait()
            mark_process_dead(process.pid, str(self._directory))  # type: ignore[no-untyped-call]
            if self._stop.is_set():
                return
            log.error(
                "worker exited; starting it again",
                extra={"fields": {"worker": index, "status": status, "pid": process.pid}},
            )
            await asyncio.sleep(RESTART_DELAY)
            while not self._stop.is_set():
                try:
                    await self._spawn(index)
                    break
                except OSError:  # no process to be had now (memory, limits): try again
                    log.exception("cannot start a worker", extra={"fields": {"worker": index}})
                    await asyncio.sleep(RESTART_DELAY)

    def _ready(self) -> tuple[bool, str]:
        for index in range(self.config.workers):
            ready, reason = read_status(self._status_file(index))
            if not ready:
                return False, f"worker {index}: {reason}"
        return True, "ready"

    async def _stop_workers(self) -> None:
        running = [p for p in self._workers.values() if p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        delivery = self.config.delivery
        limit = SHUTDOWN_GRACE + delivery.drain_grace + STOP_MARGIN
        if self.config.mode is Mode.DIRECT:
            limit += delivery.direct_deadline
        waits = [asyncio.ensure_future(p.wait()) for p in running]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=limit)
            for process in running:
                if process.returncode is None:
                    log.error(
                        "worker did not stop; killing it", extra={"fields": {"pid": process.pid}}
                    )
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if pending:
                await asyncio.wait(pending)

    async def _close(self) -> None:
        if self._health is not None:
            await self._health.stop()
        if self._sock is not None:
            self._sock.close()
        if self._lifeline is not None:
            for fd in self._lifeline:
                with contextlib.suppress(OSError):
                    os.close(fd)
        shutil.rmtree(self._directory, ignore_errors=True)
