"""The relay process: start, serve, stop gracefully (uvicorn's ``Server`` is the model).

Rule 1: start-up does every check that can fail before the port opens; a
bad key stops it with one line.
Rule 2: SIGTERM and SIGINT only ask for a stop: the listener closes (no new
sessions), sessions in progress may finish until the grace time, then the
rest are closed and the upstream pool is shut.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from relay import __version__
from relay.config import LISTEN_BACKLOG, SHUTDOWN_GRACE, Config
from relay.core.errors import ConfigError, Reply
from relay.custody.spool import Spool, SpoolError
from relay.delivery import Deliverer
from relay.inbound.gate import Gate
from relay.inbound.smtp import make_protocol_factory
from relay.inbound.tls import server_context
from relay.intake import Intake
from relay.ops.health import STATUS_SECONDS, UPSTREAMS_FILE, HealthServer, write_status
from relay.ops.logs import AddressTokens, Verbatim, flush_periodically, load_key
from relay.ops.logs import flush as flush_logs
from relay.ops.metrics import Metrics
from relay.upstream.router import Router, describe, open_routes, states
from relay.upstream.smtp import Upstream

if TYPE_CHECKING:
    from relay.ops.workers import WorkerArgs

log = logging.getLogger("relay.server")

# asyncio's default of 100 drops a burst of connects in the kernel, where they wait for
# SYN retransmits; a deep queue lets each one reach the 421 4.7.0 of the connection limit.
FREE_SPACE_SECONDS = 1.0  # how long a reading of the spool's free space stands
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
QUEUE_FULL = Reply(451, "4.3.2", "Queue is full, try again later")
# RFC 5321 3.8: a server that must shut down may answer any command 421 and close.
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
# Seconds the spool writes still being retried get at a stop, even when the sessions
# used up their grace (messages being taken get their own time: relay.intake).
INTAKE_GRACE = 1.0


class Relay:
    """One relay: the SMTP listener, the upstream, metrics and health endpoints."""

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry | None = None,
        tokens: AddressTokens | None = None,
        *,
        worker: WorkerArgs | None = None,
        orphans: Sequence[Path] = (),
    ) -> None:
        self.config = config
        self._tokens = tokens
        self._worker = worker  # one of several processes (relay.ops.workers), or None
        # Spools of workers beyond the configured count: delivered here, no new mail.
        self._orphans = tuple(orphans)
        self._orphan_delivery: list[tuple[Spool, Deliverer, asyncio.Task[None]]] = []
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.smtp_port = 0
        self.metrics_port = 0
        self._free, self._free_at = 0, -FREE_SPACE_SECONDS
        self._stop = asyncio.Event()
        self._stopping = False  # new MAIL gets 421 4.3.2 (``_admit``)
        self._server: asyncio.Server | None = None
        self._gate: Gate | None = None
        self._health: HealthServer | None = None
        self._upstream: Upstream | None = None
        self.spool: Spool | None = None
        self.deliverer: Deliverer | None = None
        self._intake: Intake | None = None
        self._delivering: asyncio.Task[None] | None = None
        self._log_flusher: asyncio.Task[None] | None = None
        self._status: asyncio.Task[None] | None = None
        self._upstreams: asyncio.Task[None] | None = None
        self._started = 0.0

    @property
    def open_sessions(self) -> int:
        """SMTP sessions open now (each holds one of ``smtp.max_connections``)."""
        return self._gate.open if self._gate else 0

    def upstream_states(self) -> dict[str, str]:
        """Each upstream's state now: up, down or spent (one alone, on local limits: up)."""
        return states(self._upstream, self.config)

    @property
    def stopping(self) -> bool:
        """A stop has begun: new transactions get 421 4.3.2, sessions drain."""
        return self._stopping

    def __repr__(self) -> str:
        open_sessions = self.open_sessions
        return f"<Relay smtp={self.smtp_port} metrics={self.metrics_port} sessions={open_sessions}>"

    async def start(self) -> None:
        """Open the upstream, the listener and the health server; raises ``ConfigError``."""
        config = self.config
        tls = server_context(config.smtp)
        options = config.isolation_options()  # loads and tries the DKIM key
        try:
            Path(config.spool.dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                "spool.dir", f"cannot create {config.spool.dir}: {exc.strerror}"
            ) from exc
        tokens = self._tokens or AddressTokens(
            load_key(config.log, Path(config.spool.dir)), show=config.log.show_addresses
        )
        self._upstream = open_routes(config, metrics=self.metrics)
        self.spool = self._new_spool(Path(config.spool.dir))
        self.spool.open()
        self.deliverer = Deliverer(config, self.spool, self._upstream, self.metrics, tokens)
        await self.deliverer.refresh_gauges(time.time())
        for directory in self._orphans:
            self._deliver_orphan(directory, tokens)
        self._intake = intake = Intake(
            config,
            upstream=self._upstream,
            metrics=self.metrics,
            tokens=tokens,
            spool=self.spool,
            deliverer=self.deliverer,
            options=options,
        )
        factory, self._gate = make_protocol_factory(
            config, intake.accept, tls, self.metrics, admit=self._admit, tokens=tokens
        )
        listen = config.listen_address
        self._server = await self._listen(factory)
        self.smtp_port = self._server.sockets[0].getsockname()[1]
        self._health = HealthServer(self.registry, self._ready)
        metrics = config.metrics_address
        self.metrics_port = await self._health.start(metrics.host, metrics.port)
        self._started = time.monotonic()
        self._delivering = asyncio.create_task(self.deliverer.run(), name="deliverer")
        self._log_flusher = asyncio.create_task(flush_periodically(), name="log flusher")
        if isinstance(self._upstream, Router):
            path = Path(config.spool.dir) / UPSTREAMS_FILE
            self._upstreams = asyncio.create_task(
                self._upstream.report_periodically(path, STATUS_SECONDS), name="upstreams"
            )
        self._log_listening(
            f"{listen.host}:{self.smtp_port}", f"{metrics.host}:{self.metrics_port}"
        )

    async def _listen(self, factory: Callable[[], asyncio.BaseProtocol]) -> asyncio.Server:
        """The SMTP listener: on the supervisor's socket, shared by every worker, or its own."""
        loop = asyncio.get_running_loop()
        if self._worker is not None:
            shared = socket.socket(fileno=self._worker.listen_fd)
            return await loop.create_server(factory, sock=shared)
        listen = self.config.listen_address
        return await loop.create_server(factory, listen.host, listen.port, backlog=LISTEN_BACKLOG)

    def _log_listening(self, smtp: str, metrics: str) -> None:
        log.info(
            "listening",
            extra={
                "fields": {
                    "smtp": smtp,
                    "metrics": metrics,
                    "upstream": Verbatim(describe(self.config)),  # user shown, password not
                    "version": __version__,
                    "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                    **(
                        {"worker": f"{self._worker.index}/{self._worker.count}"}
                        if self._worker
                        else {}
                    ),
                }
            },
        )

    def _ready(self) -> tuple[bool, str]:
        """SPEC 7: listening, spool directory writable, not paused for refused credentials,
        upstream reached at the last try."""
        if self._server is None or not self._server.is_serving():
            return False, "not listening"
        if not os.access(self.config.spool.dir, os.W_OK):
            return False, "spool directory not writable"
        if self.deliverer is not None and self.deliverer.paused_until > time.time():
            # SPEC 5's pause after a 535: nothing is delivered until it ends (issue 14.8).
            return False, "delivery paused: the upstream refused the relay's credentials"
        if self.deliverer is not None and not self.deliverer.upstream_reachable:
            return False, "upstream unreachable at the last delivery attempt"
        return True, "ready"

    def _admit(self) -> Reply | None:
        """SPEC 5: refuse new mail (at MAIL) when custody cannot be taken, or the relay
        is stopping (a message begun now might not end before the stop's deadline)."""
        if self._stopping:
            return SHUTTING_DOWN
        now = time.monotonic()
        if now - self._free_at >= FREE_SPACE_SECONDS:  # a statfs per MAIL is waste
            try:
                self._free = shutil.disk_usage(self.config.spool.dir).free
            except OSError:
                self._free = 0
            self._free_at = now
        if self._free < self.config.spool.min_free_bytes:
            return SPOOL_FULL
        if self.spool is not None and self.spool.live >= self.config.delivery.max_queued:
            return QUEUE_FULL
        return None

    def request_stop(self) -> None:
        self._stop.set()

    def _new_spool(self, directory: Path) -> Spool:
        """A spool at ``directory`` with the configuration's [spool] settings."""
        spool = self.config.spool
        return Spool(
            directory,
            fsync=spool.fsync,
            max_bytes=spool.max_bytes,
            history_days=spool.history_days,
            reserve_bytes=spool.reserve_bytes,
        )

    def _deliver_orphan(self, directory: Path, tokens: AddressTokens) -> None:
        """Deliver what a spool no worker serves any more holds (mail already acknowledged)."""
        assert self._upstream is not None
        config = self.config
        spool = self._new_spool(directory)
        try:
            spool.open()
        except SpoolError:
            log.exception(
                "cannot open a left-over spool", extra={"fields": {"spool": str(directory)}}
            )
            return
        deliverer = Deliverer(
            config, spool, self._upstream, self.metrics, tokens, reports_gauges=False
        )
        task = asyncio.create_task(deliverer.run(), name=f"left-over spool {directory}")
        self._orphan_delivery.append((spool, deliverer, task))
        log.warning(
            "delivering a spool left by a larger worker count",
            extra={"fields": {"spool": str(directory), "live": spool.live}},
        )

    async def _report(self, path: Path) -> None:
        """A worker's readiness for its supervisor, every ``STATUS_SECONDS``."""
        while True:
            ready, reason = self._ready()
            try:
                write_status(path, ready, reason)
            except OSError:
                log.exception("cannot write the worker status file")
            await asyncio.sleep(STATUS_SECONDS)

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or ``request_stop``), then stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        if self._worker is not None:
            # The supervisor holds the other end: readable (EOF) once it is gone.
            lifeline = self._worker.lifeline_fd

            def orphaned() -> None:
                loop.remove_reader(lifeline)  # EOF stays readable: once is enough
                self.request_stop()

            loop.add_reader(lifeline, orphaned)
            self._status = asyncio.create_task(self._report(self._worker.status_file))
        try:
            await self._stop.wait()
        finally:
            # The handlers stay through the stop: a second signal (Ctrl-C again, or a
            # supervisor passing SIGTERM on) must not kill a drain in progress.
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, let sessions finish until ``grace``, then close everything.

        From the stop on, a new MAIL is answered ``421 4.3.2`` and the session closed:
        only transactions begun before it are finished. A message whose final dot has
        arrived gets its own time (``Intake.drain``: a direct-mode delivery its whole
        ``delivery.direct_deadline``), and its session stays open to hear the reply.
        """
        log.info("stopping", extra={"fields": {"grace": grace}})
        self._stopping = True
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._gate is not None and self._gate.open and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._intake is not None:  # before the sessions close: they await its replies
            await self._intake.drain(max(deadline - loop.time(), INTAKE_GRACE))
        if self._gate is not None:
            self._gate.close_all()
        if self._server is not None:
            await self._server.wait_closed()
        drains = [d.drain(self.config.delivery.drain_grace) for _, d, _ in self._orphan_delivery]
        if self.deliverer is not None:
            drains.append(self.deliverer.drain(self.config.delivery.drain_grace))
        # A drain that cannot write (a full disk) leaves its copies ``delivering``: the
        # next start puts them back in the queue. The stop goes on either way (exit 0).
        for result in await asyncio.gather(*drains, return_exceptions=True):
            if isinstance(result, Exception):
                log.error(
                    "drain could not write to the spool; the next start requeues what is left",
                    extra={"fields": {"error": str(result)}},
                )
        if self._delivering is not None:
            await asyncio.gather(self._delivering, return_exceptions=True)
        for spool, _, task in self._orphan_delivery:
            await asyncio.gather(task, return_exceptions=True)
            spool.close()
        if self.spool is not None:
            self.spool.close()
        if self._upstream is not None:
            await self._upstream.aclose()
        if self._health is not None:
            await self._health.stop()
        if self._log_flusher is not None:
            self._log_flusher.cancel()
        if self._status is not None:
            self._status.cancel()
        if self._upstreams is not None:
            self._upstreams.cancel()
        log.info("stopped")
        flush_logs()
