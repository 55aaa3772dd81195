"""Who may hold an SMTP session: the connection limits, overload mode, client networks.

Rule 1: at most ``max_connections`` sessions; off loopback, at most
``per_client`` from one address (Postfix's anvil,
``smtpd_client_connection_count_limit``).
Rule 2: overload (Postfix's stress mode, ``smtpd_timeout =
${stress?{10}:{300}}s``): from ``overload_at`` open sessions on, a session
that has not begun a transaction (no MAIL yet) may idle only
``overload_idle_timeout`` seconds, counted from its last command, so idle
clients cannot lock the application out.
Rule 3: at the limit, a new connection closes the session that has idled
longest before MAIL (idle ``EVICT_MIN_IDLE`` seconds at least) instead of
being refused; only when every session is in a transaction, or fresh, is
the newcomer refused with ``421 4.7.0``.

The sessions are ``relay.inbound.smtp``'s; this module sees them through
``GatedSession`` and holds no socket itself.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

from relay.core.errors import Reply
from relay.inbound.auth import FailureDelays
from relay.ops.logs import AddressTokens
from relay.ops.metrics import ConnectionResult, Metrics, SessionClosed

# A session idle less than this is a client still reading its greeting: closing it
# would let a burst of connects close each other instead of the idle ones.
EVICT_MIN_IDLE = 1.0

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "Too many connections from your address")
EVICTED = Reply(421, "4.7.0", "Server busy, closing idle connection")


class GatedSession(Protocol):
    """What the gate needs of a session."""

    client: str  # the peer's address, as text

    def idle_since(self) -> float | None:
        """The loop time of its last command while it has no transaction, else None."""

    def shrink_idle_timer(self, timeout: float) -> None:
        """Make its idle timer run out ``timeout`` after its last command, if idle."""

    def evict(self, reply: Reply) -> None:
        """Send ``reply`` and close the connection."""


class Gate:
    """Connection limits and client networks, shared by every session of one listener."""

    def __init__(
        self,
        max_connections: int,
        networks: Sequence[str],
        metrics: Metrics | None = None,
        *,
        per_client: int | None = None,
        overload_at: int | None = None,
        overload_idle_timeout: float = 10.0,
        auth_failures: FailureDelays | None = None,
        tokens: AddressTokens | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.metrics = metrics
        self.per_client = per_client  # None: no per-client limit (a loopback listener)
        self.overload_at = overload_at if overload_at is not None else max_connections
        self.overload_idle_timeout = overload_idle_timeout
        self.auth_failures = auth_failures or FailureDelays(1.0, 30.0)
        self.tokens = tokens or AddressTokens(os.urandom(32))
        self.sessions: set[Any] = set()  # GatedSession; Any so relay.inbound.smtp keeps its type
        self._clients: collections.Counter[str] = collections.Counter()
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.overloaded = False

    def __repr__(self) -> str:
        return (
            f"<Gate open={self.open} max={self.max_connections}"
            f" overloaded={self.overloaded} clients={len(self._clients)}>"
        )

    @property
    def open(self) -> int:
        return len(self.sessions)

    def admit(self, session: GatedSession, now: float) -> Reply | None:
        """Take ``session`` in (None), or the reply that refuses it (Rules 1 and 3)."""
        if self.per_client is not None and self._clients[session.client] >= self.per_client:
            self._count(ConnectionResult.REFUSED_CLIENT_LIMIT)
            return TOO_MANY_FROM_CLIENT
        if self.open >= self.max_connections:
            victim = self._longest_idle(now)
            if victim is None:
                self._count(ConnectionResult.REFUSED_LIMIT)
                return TOO_MANY_CONNECTIONS
            self.release(victim)
            victim.evict(EVICTED)
            if self.metrics is not None:
                self.metrics.session_closed(SessionClosed.OVERLOAD)
        self.sessions.add(session)
        self._clients[session.client] += 1
        self._count(ConnectionResult.ACCEPTED)
        self._check_overload()
        return None

    def release(self, session: GatedSession) -> None:
        """``session`` is over (once or more: only the first counts)."""
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self._clients[session.client] -= 1
        if self._clients[session.client] <= 0:
            del self._clients[session.client]
        if self.metrics is not None:
            self.metrics.connection_closed()
        self._check_overload()

    def close_all(self) -> None:
        for session in list(self.sessions):
            transport = getattr(session, "transport", None)
            if transport is not None:
                transport.close()

    def allows(self, peer: Any) -> bool:
        try:
            ip = ipaddress.ip_address(peer[0] if isinstance(peer, tuple) else str(peer))
        except (ValueError, IndexError, TypeError):
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)

    def _longest_idle(self, now: float) -> GatedSession | None:
        best: GatedSession | None = None
        best_since = math.inf
        for session in self.sessions:
            since = session.idle_since()
            if since is not None and now - since >= EVICT_MIN_IDLE and since < best_since:
                best, best_since = session, since
        return best

    def _check_overload(self) -> None:
        overloaded = self.open >= self.overload_at
        if overloaded == self.overloaded:
            return
        self.overloaded = overloaded
        if self.metrics is not None:
            self.metrics.overload(overloaded)
        if overloaded:
            for session in list(self.sessions):
                session.shrink_idle_timer(self.overload_idle_timeout)

    def _count(self, result: ConnectionResult) -> None:
        if self.metrics is not None:
            self.metrics.connection(result)


def overload_at(max_connections: int, threshold: float) -> int:
    """Open sessions from which overload begins: ``threshold`` of the limit, at least 1."""
    return max(1, math.ceil(max_connections * threshold))
