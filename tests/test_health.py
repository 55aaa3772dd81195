"""The health endpoint: a real HealthServer on loopback, queried by real HTTP clients."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from relay.ops.health import HealthServer
from relay.ops.metrics import MessageResult, Metrics

T = TypeVar("T")
Response = tuple[int, dict[str, str], bytes]

# The opener ignores any proxy in the environment: these requests are for loopback.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one async test body in a fresh event loop (no pytest-asyncio here)."""
    return asyncio.run(asyncio.wait_for(factory(), 30))


def always_ready() -> tuple[bool, str]:
    return True, "ready"


@asynccontextmanager
async def serving(
    ready: Callable[[], tuple[bool, str]] = always_ready, **options: Any
) -> AsyncIterator[tuple[HealthServer, CollectorRegistry]]:
    registry = CollectorRegistry()
    Metrics(registry).message_received(MessageResult.ACCEPTED, 1500, 2)
    server = HealthServer(registry, ready, **options)
    await server.start("127.0.0.1", 0)
    try:
        yield server, registry
    finally:
        await server.stop()


def fetch(port: int, path: str, method: str = "GET", data: bytes | None = None) -> Response:
    """One request with urllib; 4xx and 5xx come back as responses, not errors."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with OPENER.open(request, timeout=10) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, response.read()
    except urllib.error.HTTPError as error:
        headers = {k.lower(): v for k, v in error.headers.items()}
        return error.code, headers, error.read()


async def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a raw connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def test_metrics_serves_the_registry_exposition() -> None:
    """GET /metrics answers 200 with the registry's series in Prometheus text format."""

    async def body() -> Response:
        async with serving() as (server, _):
            return await asyncio.to_thread(fetch, server.port, "/metrics")

    status, headers, content = run(body)
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert b'solo_relay_messages_received_total{result="accepted"} 1.0' in content
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(content)


def test_healthz_is_ok_while_the_process_runs() -> None:
    """GET /healthz answers 200 "ok", whatever readiness says."""

    async def body() -> Response:
        async with serving(lambda: (False, "spool not writable")) as (server, _):
            return await asyncio.to_thread(fetch, server.port, "/healthz")

    status, _, content = run(body)
    assert (status, content) == (200, b"ok\n")


def test_readyz_follows_the_readiness_callable() -> None:
    """GET /readyz is 200 when ready and 503 with the reason when not."""
    state = {"ready": True}

    def ready() -> tuple[bool, str]:
        return (True, "ready") if state["ready"] else (False, "upstream unreachable for 120 s")

    async def body() -> tuple[Response, Response]:
        async with serving(ready) as (server, _):
            first = await asyncio.to_thread(fetch, server.port, "/readyz")
            state["ready"] = False
            second = await asyncio.to_thread(fetch, server.port, "/readyz")
            return first, second

    (ok, _, ok_text), (down, _, down_text) = run(body)
    assert (ok, ok_text) == (200, b"ready\n")
    assert (down, down_text) == (503, b"upstream unreachable for 120 s\n")


def test_readyz_is_503_when_the_callable_raises() -> None:
    """A readiness callable that raises makes /readyz answer 503, not crash the server."""

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    async def body() -> tuple[Response, Response]:
        async with serving(broken) as (server, _):
            first = await asyncio.to_thread(fetch, server.port, "/readyz")
            second = await asyncio.to_thread(fetch, server.port, "/healthz")
            return first, second

    (status, _, content), (after, _, _) = run(body)
    assert (status, content) == (503, b"readiness check failed\n")
    assert after == 200


def test_unknown_path_is_404_and_query_is_ignored() -> None:
    """An unknown path answers 404; a query string on a known path is ignored."""

    async def body() -> tuple[Response, Response]:
        async with serving() as (server, _):
            missing = await asyncio.to_thread(fetch, server.port, "/admin")
            query = await asyncio.to_thread(fetch, server.port, "/healthz?verbose=1")
            return missing, query

    (missing, _, _), (query, _, _) = run(body)
    assert missing == 404
    assert query == 200


def test_methods_other_than_get_and_head_are_405() -> None:
    """POST, PUT and DELETE answer 405 with Allow: GET, HEAD."""

    async def body() -> list[Response]:
        async with serving() as (server, _):
            return [
                await asyncio.to_thread(fetch, server.port, "/metrics", "POST", b"x=1"),
                await asyncio.to_thread(fetch, server.port, "/healthz", "PUT", b"{}"),
                await asyncio.to_thread(fetch, server.port, "/readyz", "DELETE"),
            ]

    for status, headers, _ in run(body):
        assert status == 405
        assert headers["allow"] == "GET, HEAD"


def test_head_has_the_get_headers_and_no_body() -> None:
    """HEAD answers like GET, with the same Content-Length and no body."""

    async def body() -> tuple[Response, bytes]:
        async with serving() as (server, _):
            head = await asyncio.to_thread(fetch, server.port, "/healthz", "HEAD")
            wire = await raw(server.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return head, wire

    (status, headers, content), wire = run(body)
    assert status == 200
    assert headers["content-length"] == "3"
    assert content == b""
    assert wire.endswith(b"\r\n\r\n")  # the head, then nothing, then the server closed


def test_the_server_closes_after_each_response() -> None:
    """A keep-alive request still gets one response and then the connection closes."""

    async def body() -> bytes:
        async with serving() as (server, _):
            request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
            return await raw(server.port, request * 2)

    wire = run(body)
    assert wire.startswith(b"HTTP/1.1 200 OK\r\n")
    assert wire.count(b"HTTP/1.1") == 1
    assert wire.endswith(b"\r\n\r\nok\n")


def test_an_oversized_request_is_cut_off_with_431() -> None:
    """A request head over the size bound answers 431 and the connection closes."""

    async def body() -> tuple[bytes, bytes]:
        async with serving(max_request=1024) as (server, _):
            long_line = b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n"
            many = b"GET /healthz HTTP/1.1\r\n" + (b"X-Pad: " + b"b" * 100 + b"\r\n") * 20
            return await raw(server.port, long_line), await raw(server.port, many)

    long_reply, many_reply = run(body)
    assert long_reply.startswith(b"HTTP/1.1 431 ")
    assert many_reply.startswith(b"HTTP/1.1 431 ")


def test_a_slow_request_is_cut_off_with_408() -> None:
    """A client that never finishes its request head gets 408 and is disconnected."""

    async def body() -> tuple[bytes, bytes, Response]:
        async with serving(read_timeout=0.2) as (server, _):
            partial = await raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            silent = await raw(server.port, b"")
            after = await asyncio.to_thread(fetch, server.port, "/healthz")
            return partial, silent, after

    partial, silent, (after, _, _) = run(body)
    assert partial.startswith(b"HTTP/1.1 408 ")
    assert silent.startswith(b"HTTP/1.1 408 ")
    assert after == 200


def test_a_malformed_request_line_is_400() -> None:
    """A request line that is not METHOD SP target SP HTTP/1.x answers 400."""

    async def body() -> list[bytes]:
        async with serving() as (server, _):
            return [
                await raw(server.port, b"GET /healthz\r\n\r\n"),
                await raw(server.port, b"GET healthz HTTP/1.1\r\n\r\n"),
                await raw(server.port, b"\xff\xfe /healthz HTTP/1.1\r\n\r\n"),
            ]

    for reply in run(body):
        assert reply.startswith(b"HTTP/1.1 400 ")


def test_start_returns_the_bound_port_and_stop_releases_it() -> None:
    """start on port 0 returns a real port; after stop nothing listens there."""

    async def body() -> int:
        server = HealthServer(CollectorRegistry(), always_ready)
        port = await server.start("127.0.0.1", 0)
        assert port == server.port > 0
        await server.stop()
        return port

    port = run(body)
    with pytest.raises(ConnectionRefusedError):
        run(lambda: asyncio.open_connection("127.0.0.1", port))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_healthz_and_head() -> None:
    """curl, as Docker's HEALTHCHECK runs it, gets 200 from /healthz with GET and HEAD."""

    async def body() -> tuple[str, str]:
        async with serving() as (server, _):
            url = f"http://127.0.0.1:{server.port}/healthz"
            get = await asyncio.to_thread(
                subprocess.run,
                ["curl", "-fsS", "--noproxy", "*", "-m", "10", url],
                capture_output=True,
                text=True,
                check=True,
            )
            head = await asyncio.to_thread(
                subprocess.run,
                ["curl", "-fsSI", "--noproxy", "*", "-m", "10", url],
                capture_output=True,
                text=True,
                check=True,
            )
            return get.stdout, head.stdout

    get, head = run(body)
    assert get == "ok\n"
    assert head.splitlines()[0] == "HTTP/1.1 200 OK"
