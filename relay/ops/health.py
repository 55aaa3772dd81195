"""The operations HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``.

Rule 1: one request per connection. The server reads a request head (request
line and header fields), answers, and closes; it never keeps a connection
alive, so a client holds at most one read timeout of the server's time.
Rule 2: bounded. A request head larger than ``max_request`` bytes gets 431
and one slower than ``read_timeout`` seconds gets 408, then the connection
closes; nothing a client sends is kept past its response.
Rule 3: ``GET`` and ``HEAD`` only (405 otherwise, with ``Allow``); unknown
paths get 404; a query string is ignored.

Standard library only (``asyncio.start_server``): this is an HTTP/1.1 subset
that Prometheus, kubelet probes, ``curl`` and Docker's ``HEALTHCHECK`` need,
not a general web server. It does not decide readiness: the relay passes a
callable that does, and this module only reports its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("relay.health")

Ready = Callable[[], tuple[bool, str]]

# The request head bound: nginx's large_client_header_buffers and Node's
# --max-http-header-size default to 8 KiB and 16 KiB; a probe sends about 100 bytes.
MAX_REQUEST_BYTES = 8192
# Seconds for the whole request head: Prometheus's default scrape timeout is 10 s,
# kubelet's probe timeout 1 s; a client that cannot send 100 bytes in 5 s is not one of them.
READ_TIMEOUT = 5.0
# Seconds to hand a response to the kernel before giving up on the client.
WRITE_TIMEOUT = 10.0
ALLOWED_METHODS = ("GET", "HEAD")
STATUS_SECONDS = 1.0  # how often a worker writes its status file (``relay.ops.workers``)
STATUS_STALE = 5.0  # a status file older than this: that worker is not answering
TEXT = "text/plain; charset=utf-8"


class _Refused(Exception):
    """The request cannot be served; ``status`` says why."""

    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


class HealthServer:
    """Serves the metrics in ``registry`` and the answers of ``ready``.

    ``ready`` returns ``(True, reason)`` when the relay can take mail, else
    ``(False, reason)``; the reason is the body of ``/readyz``, so it must
    name a condition, never an address.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Ready,
        *,
        max_request: int = MAX_REQUEST_BYTES,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.max_request = max_request
        self.read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def __repr__(self) -> str:
        state = f"port={self.port}" if self._server is not None else "stopped"
        return f"<HealthServer {state} open={len(self._writers)}>"

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port) and return the bound port.

        Raises ``OSError`` when the address cannot be bound.
        """
        # The stream limit bounds readline(): one line can never exceed the request bound.
        self._server = await asyncio.start_server(self._handle, host, port, limit=self.max_request)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every connection still open."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        method = "GET"  # until the request line says otherwise: errors carry a body
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    method, path = await self._read_request(reader)
                status, content_type, body = self._respond(method, path)
            except _Refused as refused:
                status = refused.status
                content_type, body = TEXT, f"{status.phrase}\n".encode()
            except TimeoutError:
                status = HTTPStatus.REQUEST_TIMEOUT
                content_type, body = TEXT, f"{status.phrase}\n".encode()
            await self._write(writer, method, status, content_type, body)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: nobody to answer
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT)

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        """Read the request head; return (method, path). Raises ``_Refused``."""
        total = 0
        lines: list[bytes] = []
        while True:
            try:
                line = await reader.readline()
            except ValueError as exc:  # one line longer than the stream limit
                raise _Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from exc
            total += len(line)
            if total > self.max_request:
                raise _Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)  # EOF inside the head
            if line in (b"\r\n", b"\n"):
                if lines:
                    break
                continue  # RFC 9112 2.2: ignore empty lines before the request line
            lines.append(line)
        method, path = _parse_request_line(lines[0])
        length = _content_length(lines[1:])
        if 0 < length <= self.max_request:
            # Drain a small body so closing does not reset the connection under the reply.
            await reader.readexactly(length)
        return method, path

    def _respond(self, method: str, path: str) -> tuple[HTTPStatus, str, bytes]:
        if method not in ALLOWED_METHODS:
            raise _Refused(HTTPStatus.METHOD_NOT_ALLOWED)
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return HTTPStatus.OK, TEXT, b"ok\n"
        if path == "/readyz":
            try:
                ok, reason = self.ready()
            except Exception:
                log.exception("readiness check failed")
                ok, reason = False, "readiness check failed"
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            return status, TEXT, f"{reason}\n".encode()
        raise _Refused(HTTPStatus.NOT_FOUND)

    async def _write(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        status: HTTPStatus,
        content_type: str,
        body: bytes,
    ) -> None:
        head = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if status is HTTPStatus.METHOD_NOT_ALLOWED:
            head.append("Allow: " + ", ".join(ALLOWED_METHODS))
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii"))
        if method != "HEAD":
            writer.write(body)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


def _parse_request_line(line: bytes) -> tuple[str, str]:
    """``METHOD SP request-target SP HTTP-version`` (RFC 9112 3). Raises ``_Refused``."""
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise _Refused(HTTPStatus.BAD_REQUEST) from exc
    parts = text.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise _Refused(HTTPStatus.BAD_REQUEST)
    method, target, _ = parts
    path = urlsplit(target).path  # origin-form or absolute-form (RFC 9112 3.2)
    if not path.startswith("/"):
        raise _Refused(HTTPStatus.BAD_REQUEST)
    return method, path


def _content_length(lines: list[bytes]) -> int:
    for line in lines:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"content-length":
            text = value.strip()
            return int(text) if text.isdigit() else 0
    return 0


def write_status(path: Path, ready: bool, reason: str) -> None:
    """A worker's readiness for its supervisor, written whole (a temporary file, renamed)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"ready": ready, "reason": reason, "pid": os.getpid()}))
    temporary.replace(path)


def read_status(path: Path) -> tuple[bool, str]:
    """A worker's readiness as its last status file says, if that is recent."""
    try:
        status = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return False, "starting"
    if age > STATUS_STALE:
        return False, "not answering"
    if not isinstance(status, dict) or status.get("ready") is not True:
        reason = status.get("reason") if isinstance(status, dict) else None
        return False, str(reason or "not ready")
    return True, "ready"


UPSTREAMS_FILE = "upstreams.json"  # beside spool.db: each upstream's state, for queue stats


def write_upstreams(path: Path, upstreams: list[dict[str, object]], store: str) -> None:
    """What the relay knows of its upstreams now (``queue stats`` reads it), written whole."""
    temporary = path.with_suffix(".tmp")
    document = {"pid": os.getpid(), "at": time.time(), "store": store, "upstreams": upstreams}
    temporary.write_text(json.dumps(document))
    temporary.replace(path)


def read_upstreams(path: Path) -> dict[str, object] | None:
    """The last ``write_upstreams`` document in ``path``, or None; ``age`` added, in seconds."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("upstreams"), list):
        return None
    at = document.get("at")
    document["age"] = time.time() - at if isinstance(at, int | float) else None
    return document
