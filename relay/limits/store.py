"""The shared store's client (Redis or Valkey), made from ``[fleet]``."""

from __future__ import annotations

import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay import files
from relay.config import FleetConfig


def open_store(fleet: FleetConfig) -> Redis:
    """A client with ``fleet.timeout`` on every call and connect; TLS for ``rediss://``.

    Raises ``ConfigError`` for an unreadable password or CA file. No connection is
    made here: the first grant connects (and a store that is away is Rule 3).
    """
    password = (
        files.read_secret("fleet.password_file", fleet.password_file)
        if fleet.password_file
        else None
    )
    if fleet.store.startswith("rediss://") and fleet.ca_file:
        files.check_readable("fleet.ca_file", fleet.ca_file)
        return Redis.from_url(
            fleet.store,
            password=password,
            socket_timeout=fleet.timeout,
            socket_connect_timeout=fleet.timeout,
            ssl_ca_certs=fleet.ca_file,
        )
    return Redis.from_url(
        fleet.store,
        password=password,
        socket_timeout=fleet.timeout,
        socket_connect_timeout=fleet.timeout,
    )


async def check_store(fleet: FleetConfig) -> tuple[bool, str]:
    """``solo-relay check --upstream``: the store answers PING within its timeout."""
    client = open_store(fleet)
    started = time.monotonic()
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return False, f"{_redacted(fleet.store)}: {type(exc).__name__}: {exc}"
    finally:
        await client.aclose()
    return (
        True,
        f"{_redacted(fleet.store)} answered in {(time.monotonic() - started) * 1000:.1f} ms",
    )


def _redacted(url: str) -> str:
    """The store's URL without a password in it."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user + '@' if user else ''}{host}"
