"""Start-up validation: every check ``serve`` makes before it opens a port.

Rule 1: ``solo-relay serve`` and ``solo-relay check`` both run ``prepare``, so
``check`` says OK exactly when ``serve`` would start (short of a port being
taken, which only binding it can tell).
Rule 2: it changes nothing: no spool, key file or outbox is created here.
Rule 3: every failure is one ``ConfigError`` naming the key, and the path or
the value at fault; the command line prints it as one line and exits 2.

Not here: the pure checks of single values (``relay.config.validate`` runs them
when the configuration is loaded), and the spool itself (opened by the server).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from relay.config import AuthMode, Config, RouteConfig, StartTLS
from relay.core.errors import ConfigError
from relay.core.model import IsolationOptions
from relay.files import check_readable
from relay.inbound.auth import Users
from relay.inbound.tls import server_context
from relay.ops.logs import check_key
from relay.upstream.target import (
    Target,
    configured_credentials,
    dsn_credentials,
    parse_upstream_url,
    tls_context,
)


@dataclass(frozen=True, slots=True)
class Prepared:
    """What start-up validation produced: the parsed upstream and the isolation options."""

    targets: tuple[tuple[str, Target], ...]  # each upstream's name and parsed URL, in order
    options: IsolationOptions
    tls: ssl.SSLContext | None
    users: Users

    @property
    def target(self) -> Target:
        """The first upstream's (the only one's, without ``[[upstreams]]``)."""
        return self.targets[0][1]


def prepare(config: Config) -> Prepared:
    """Run every start-up check on ``config``; raise ``ConfigError`` at the first failure."""
    smtp = config.smtp
    if smtp.starttls is StartTLS.CERTIFICATE:
        check_readable("smtp.tls_cert_file", smtp.tls_cert_file)
        check_readable("smtp.tls_key_file", smtp.tls_key_file)
    tls = server_context(smtp)
    users = Users.load(smtp.users_file) if smtp.auth is AuthMode.USERS else Users({})
    options = config.isolation_options()  # loads and tries the DKIM key
    targets = tuple((route.name, _check_upstream(config, route)) for route in config.routes)
    dsn_credentials(config.delivery)  # the bounce login's password file, if any
    if config.fleet.password_file:
        check_readable("fleet.password_file", config.fleet.password_file)
    if config.fleet.ca_file:
        check_readable("fleet.ca_file", config.fleet.ca_file)
    _writable_directory("spool.dir", config.spool.dir)
    check_key(config.log, Path(config.spool.dir))
    return Prepared(targets, options, tls, users)


def _check_upstream(config: Config, upstream: RouteConfig) -> Target:
    """One upstream's URL, password and CA files (keys ``upstream.*`` or ``upstreams.NAME.*``)."""
    key = f"upstreams.{upstream.name}" if config.upstreams else "upstream"
    try:
        target = parse_upstream_url(upstream.url, insecure=upstream.insecure)
    except ConfigError as exc:
        raise ConfigError(f"{key}.url", exc.problem) from None
    if target.scheme == "outbox":
        _writable_directory(f"{key}.url", target.outbox_dir)
        return target
    if upstream.password_file:
        check_readable(f"{key}.password_file", upstream.password_file)
    configured_credentials(upstream, target)
    if target.scheme != "smtp+plain":
        if upstream.ca_file:
            check_readable(f"{key}.ca_file", upstream.ca_file)
        tls_context(upstream.ca_file)
    return target


def _writable_directory(key: str, directory: str) -> None:
    """``directory`` is a writable directory, or can be made in the nearest one that exists."""
    path = Path(directory).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"{existing} is not a directory (for {directory})")
    if not os.access(existing, os.W_OK | os.X_OK):
        shown = directory if existing == path else f"{existing} (to create {directory})"
        raise ConfigError(key, f"cannot write to {shown}: permission denied")
