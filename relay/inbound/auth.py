"""Inbound AUTH: the users file, password checks, and the delay owed after each failure.

Rule 1: a users file line is ``name:secret``; a secret that starts ``$2a$``,
``$2b$`` or ``$2y$`` is a bcrypt hash (checked with the ``bcrypt`` library, in
a thread: a check costs a quarter of a second by design), anything else is a
plain-text password (compared in constant time, and warned about at start).
Rule 2: each failure from one client costs more than the one before: the
first ``initial`` seconds, doubling up to ``maximum`` (Postfix's
``smtpd_error_sleep_time``, grown as its soft error limit does). A client's
count is forgotten after ``FAILURE_MEMORY`` quiet seconds or a success.
Rule 3: the tracker holds at most ``MAX_CLIENTS`` addresses (the least
recently failed go first), whatever a scanner does.

No SMTP here: ``relay.inbound.smtp`` speaks it and applies these values.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

import bcrypt

from relay import files
from relay.core.errors import ConfigError
from relay.core.policy import Backoff

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
BCRYPT_LENGTH = 60  # "$2b$" cost "$" 22 salt + 31 hash characters
FAILURE_MEMORY = 900.0  # seconds: fail2ban's findtime is 600, Postfix's anvil_rate_time_unit 60
MAX_CLIENTS = 10_000  # addresses tracked at once; an entry is a few dozen bytes


@dataclass(frozen=True, slots=True)
class Secret:
    value: bytes
    hashed: bool


class Users:
    """The configured users (``smtp.users_file``), loaded once at start."""

    def __init__(self, secrets: dict[str, Secret]) -> None:
        self._secrets = secrets
        # An unknown name is checked against a real hash too, so a guess at a
        # name takes as long as a guess at a password (no list of names by timing).
        self._decoy = next((s.value for s in secrets.values() if s.hashed), None)

    def __repr__(self) -> str:
        return f"<Users count={len(self._secrets)} plain={self.plain}>"

    @property
    def plain(self) -> int:
        """How many entries hold a plain-text password."""
        return sum(not s.hashed for s in self._secrets.values())

    @classmethod
    def load(cls, path: str) -> Users:
        """Read ``path`` (``read_users``): each secret a bcrypt hash or plain text."""
        return cls(
            {
                name: Secret(secret.encode("utf-8"), secret.startswith(BCRYPT_PREFIXES))
                for name, secret in read_users(path).items()
            }
        )

    async def verify(self, name: str, password: bytes) -> bool:
        """True when ``password`` is ``name``'s; a bcrypt check runs in a thread."""
        secret = self._secrets.get(name)
        if secret is None:
            if self._decoy is not None:
                await asyncio.to_thread(_checkpw, password, self._decoy)
            return False
        if not secret.hashed:
            return hmac.compare_digest(secret.value, password)
        return await asyncio.to_thread(_checkpw, password, secret.value)


def read_users(path: str) -> dict[str, str]:
    """The ``smtp.users_file``: ``user:secret`` lines; ``#`` comments and blank lines.

    A secret is a bcrypt hash (``$2b$...``) or a plain-text password. Raises
    ``ConfigError("smtp.users_file", ...)`` naming the file and the line (never the
    line's content, which holds a secret).
    """
    key = "smtp.users_file"
    lines = files.read_text(key, path).splitlines()
    users: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, secret = line.partition(":")
        where = f"{path} line {number}"
        if not colon:
            raise ConfigError(key, f"{where}: expected user:password, found no ':'")
        if not name or name != name.strip():
            raise ConfigError(key, f"{where}: the user name is empty or has spaces around it")
        if not secret:
            raise ConfigError(key, f"{where}: user {name!r} has an empty password")
        if name in users:
            raise ConfigError(key, f"{where}: user {name!r} is listed twice")
        if secret.startswith(BCRYPT_PREFIXES) and len(secret) != BCRYPT_LENGTH:
            raise ConfigError(key, f"{where}: a malformed bcrypt hash")
        users[name] = secret
    if not users:
        raise ConfigError(key, f"{path} lists no user:password line")
    return users


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # bcrypt 5 refuses passwords over 72 bytes instead of cutting them
        return False


class FailureDelays:
    """Per-client AUTH failure counts and the delay each new failure costs (Rule 2)."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        memory: float = FAILURE_MEMORY,
        capacity: int = MAX_CLIENTS,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._clock = clock
        self._memory = memory
        self._capacity = capacity
        self._clients: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"<FailureDelays clients={len(self._clients)}>"

    def failed(self, client: str) -> float:
        """Count a failure from ``client``; the seconds to wait before answering it."""
        now = self._clock()
        count, last = self._clients.pop(client, (0, now))
        if now - last > self._memory:
            count = 0
        count += 1
        self._clients[client] = (count, now)
        while len(self._clients) > self._capacity:
            self._clients.popitem(last=False)
        return delay(count, self.initial, self.maximum)

    def succeeded(self, client: str) -> None:
        """``client`` authenticated: its count starts again."""
        self._clients.pop(client, None)


def delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds owed for a client's ``failures``-th failure: ``initial`` doubling, capped
    (the one backoff, ``relay.core.policy``, without jitter: a delay a client can count on)."""
    if failures < 1:
        return 0.0
    return Backoff(initial, maximum).delay(failures)
