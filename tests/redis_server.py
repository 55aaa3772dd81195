"""A real redis-server on a free loopback port (Debian's package; .ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS = shutil.which("redis-server")


def _unverified() -> ssl.SSLContext:
    """For the readiness PING only: the test's own server, whatever its certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One redis-server process; ``stop`` and ``start`` again on the same port (an outage)."""

    def __init__(
        self, directory: Path, *, password: str = "", tls: tuple[Path, Path] | None = None
    ) -> None:
        self.directory = directory
        self.password = password  # requirepass: clients must AUTH
        self.tls = tls  # (certificate chain, key): TLS only, rediss://
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        self.process = subprocess.Popen(
            [
                REDIS,
                *(
                    [
                        "--port",
                        "0",
                        "--tls-port",
                        str(self.port),
                        "--tls-cert-file",
                        str(self.tls[0]),
                        "--tls-key-file",
                        str(self.tls[1]),
                        "--tls-auth-clients",
                        "no",
                    ]
                    if self.tls
                    else ["--port", str(self.port)]
                ),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                    conn = _unverified().wrap_socket(raw) if self.tls else raw
                    conn.sendall(b"PING\r\n")
                    answer = conn.recv(64)
                    if answer.startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            assert self.process.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: .ci/run installs it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
